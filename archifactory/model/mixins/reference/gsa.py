"""Gated slot attention in plain PyTorch: two gated linear-attention passes through a bank of M slots.

Per head, with slot gates α_t = exp(g_t) [M] (log g <= 0) and slot writes s_t = 1 − α_t:

    H^k_t = H^k_{t−1} diag(α_t) + k_t s_tᵀ      [K, M]   (the decay is on the slot, i.e. value, side)
    o^k_t = scale · q_tᵀ H^k_t,     p_t = softmax(o^k_t)  (a read distribution over the slots)
    H^v_t = diag(α_t) H^v_{t−1} + s_t v_tᵀ      [M, V]   (GLA with the slots as keys)
    o_t = H^v_tᵀ p_t

The second pass is GLA (`reference/gla.py`). The first decays its value side, so it gets its own chunked
form here: in a chunk, o^k_t[m] = Σ_{j<=t} (q_t·k_j) s_j[m] exp(B_t[m] − B_j[m]) (B the chunk-local
cumulative log gate, masked before the exp), plus the entering state read as (q_t H^k) ⊙ exp(B_t).
Layout as fla's `chunk_gsa`: q/k [B, T, H, K], v [B, T, H, V], s/g [B, T, H, M]; states
H^k [B, H, K, M] and H^v [B, H, M, V]. Runs in fp32 (fp64 when the inputs are fp64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from archifactory.model.mixins.kit import fla_op
from archifactory.model.mixins.reference.common import carry_chunks, compute_dtype
from archifactory.model.mixins.reference.delta_rule import Chunker, pair_decay
from archifactory.model.mixins.reference.gla import chunk_gla

FUSED_KERNEL = ("gsa", "chunk_gsa")  # fla.ops.gsa.chunk_gsa


def chunk_slot_pass(
    q: Tensor, k: Tensor, s: Tensor, g: Tensor, scale: float, state: Tensor, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """The first pass (module docstring): returns o^k [B, T, H, M] and the final H^k [B, H, K, M]."""
    dtype = compute_dtype(q.dtype)
    chunk = Chunker(q.shape[1], chunk_size, dtype)
    qc, kc, sc, gc = chunk(q) * scale, chunk(k), chunk(s), chunk(g)  # [B, H, N, C, *]
    cum = gc.cumsum(-2)  # [B, H, N, C, M]
    scores = qc @ kc.transpose(-1, -2)  # [B, H, N, C, C]
    intra = torch.einsum("...ts,...tsm,...sm->...tm", scores, pair_decay(cum, cum, strict=False), sc)
    last = cum[..., -1:, :]
    chunk_kv = kc.transpose(-1, -2) @ (sc * (last - cum).exp())  # [B, H, N, K, M]
    entering, state = carry_chunks(state.to(dtype), chunk_kv, last.exp())  # decay [B, H, N, 1, M]
    out = (qc @ entering) * cum.exp() + intra
    return chunk.unchunk(out), state


def gsa_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    s: Tensor,
    g: Tensor,
    scale: float,
    state: tuple[Tensor, Tensor] | None,
    backend: str,
    chunk_size: int,
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """The mixin's entry point. `backend` is resolved already; fla's `chunk_gsa` runs the training path
    (no state). With a state (H^k, H^v) the new one is returned in its dtype, without one None."""
    if backend == "fused" and state is None:
        out, _ = fla_op(*FUSED_KERNEL)(q=q, k=k, v=v, s=s, g=g.float(), scale=scale)
        return out.to(v.dtype), None
    dtype = compute_dtype(q.dtype)
    batch, _, heads, key_dim = q.shape
    slots, value_dim = s.shape[-1], v.shape[-1]
    if state is None:
        hk = q.new_zeros(batch, heads, key_dim, slots, dtype=dtype)
        hv = q.new_zeros(batch, heads, slots, value_dim, dtype=dtype)
    else:
        hk, hv = state
    scores, new_hk = chunk_slot_pass(q, k, s, g, scale, hk, chunk_size)
    read = scores.softmax(-1)  # [B, T, H, M]
    out, new_hv = chunk_gla(read, s.to(dtype), v.to(dtype), g.to(dtype), 1.0, hv, True, chunk_size)
    if state is None:
        return out.to(v.dtype), None
    return out.to(v.dtype), (new_hk.to(state[0].dtype), new_hv.to(state[1].dtype))

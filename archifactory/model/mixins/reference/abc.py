"""Attention with bounded-memory control (ABC) in plain PyTorch: two passes through M normalised slots.

Per head, with slot logits s_t [M] and their running log-normaliser z_t = log Σ_{j<=t} exp(s_j) (per slot),
the slot memories are softmax-weighted sums over time (ABC's "control" is this normalisation):

    H^k_t = Σ_{j<=t} k_j exp(s_j − z_t)ᵀ     [K, M],   p_t = softmax(scale · q_tᵀ H^k_t)   (slots to read)
    H^v_t = Σ_{j<=t} exp(s_j − z_t) v_jᵀ     [M, V],   o_t = H^v_tᵀ p_t

i.e. gated slot attention with the forget gate α_t = exp(z_{t−1} − z_t) and the write 1 − α_t = exp(s_t − z_t)
(fla's naive `naive_recurrent_abc` derives exactly these). Every weight exp(s_j − z_t) is <= 1 and the
decays exp(z_{c} − z_t) telescope, so the chunked form below never subtracts large cumulative sums: in a
chunk, o^k_t[m] = scale Σ_{j<=t} (q_t·k_j) exp(s_j[m] − z_t[m]) + exp(z_enter[m] − z_t[m]) · scale(q_tᵀ H^k)[m],
and the second pass likewise with p_t. The decode state is (H^k, H^v, z) — the normaliser is part of it,
so a prefill followed by decoding equals the full forward. An empty state has z = VOID_LOGIT, a logit
whose exp underflows to exactly 0 against any clamped slot logit; a pad step carries the slot logit
VOID_LOGIT (and k = v = 0), which leaves H^k, H^v and z exactly as they were.
Layout as fla's `chunk_abc`: q/k [B, T, H, K], v [B, T, H, V], s [B, T, H, M]; scale K^−1/2 (fixed, as
fla). Runs in fp32 (fp64 when the inputs are fp64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from archifactory.model.mixins.kit import fla_op
from archifactory.model.mixins.reference.common import carry_chunks, compute_dtype
from archifactory.model.mixins.reference.delta_rule import Chunker, pair_decay

FUSED_KERNEL = ("abc", "chunk_abc")  # fla.ops.abc.chunk_abc
VOID_LOGIT = -1.0e4  # exp(VOID_LOGIT − s) is exactly 0 in fp32/fp64 for any slot logit s >= −1e3

AbcState = tuple[Tensor, Tensor, Tensor]  # H^k [B, H, K, M], H^v [B, H, M, V], z [B, H, M]


def slot_normaliser(s: Tensor, z_enter: Tensor) -> Tensor:
    """z_t = log(exp(z_enter) + Σ_{j<=t} exp(s_j)) for s [B, T, H, M] from z_enter [B, H, M]: [B, T, H, M]."""
    return torch.cat([z_enter[:, None], s], dim=1).logcumsumexp(1)[:, 1:]


def chunked_normaliser(
    logits: Tensor, z_enter: Tensor, chunk: Chunker
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Logits [B, T, H, W] and their running log-normaliser from z_enter [B, H, W], laid out in `chunk`'s
    chunks: (logits, z) [B, H, N, C, W], z entering each chunk [B, H, N, 1, W] (the previous chunk's last,
    z_enter for the first) and the final z [B, H, W]. The tail up to a whole chunk gets the void logit,
    which leaves z — and so the last chunk's end state — unchanged."""
    logits = F.pad(logits.to(chunk.dtype), (0, 0, 0, 0, 0, chunk.pad), value=VOID_LOGIT)
    z = slot_normaliser(logits, z_enter.to(chunk.dtype))  # [B, T + pad, H, W]
    whole = Chunker(logits.shape[1], chunk.size, chunk.dtype)  # no further padding
    lc, zc = whole(logits), whole(z)
    z_first = torch.cat([z_enter.to(chunk.dtype)[:, :, None, None], zc[:, :, :-1, -1:]], dim=2)
    return lc, zc, z_first, z[:, -1]


def chunk_abc(q: Tensor, k: Tensor, v: Tensor, s: Tensor, state: AbcState, chunk_size: int):
    """Both passes (module docstring) from `state`; returns (o [B, T, H, V], the final state)."""
    dtype = compute_dtype(q.dtype)
    hk, hv, z_enter = (t.to(dtype) for t in state)
    chunk = Chunker(q.shape[1], chunk_size, dtype)
    sc, zc, z_first, z_final = chunked_normaliser(s, z_enter, chunk)  # [B, H, N, C, M], ...
    qc, kc, vc = chunk(q) * q.shape[-1] ** -0.5, chunk(k), chunk(v)
    weights = pair_decay(-zc, -sc, strict=False)  # exp(s_j − z_t) for j <= t: [B, H, N, C, C, M]
    carried = (z_first - zc).exp()  # exp(z_enter − z_t): how much of the entering state survives
    to_end = (sc - zc[..., -1:, :]).exp()  # exp(s_j − z_last): each token's weight at the chunk end
    decay = (z_first - zc[..., -1:, :]).exp()  # [B, H, N, 1, M]

    scores = qc @ kc.transpose(-1, -2)  # [B, H, N, C, C]
    entering_k, hk = carry_chunks(hk, kc.transpose(-1, -2) @ to_end, decay)  # [B, H, N, K, M]
    logits = torch.einsum("...ts,...tsm->...tm", scores, weights) + (qc @ entering_k) * carried
    read = logits.softmax(-1)  # [B, H, N, C, M]

    entering_v, hv = carry_chunks(hv, to_end.transpose(-1, -2) @ vc, decay.transpose(-1, -2))
    mixed = torch.einsum("...tm,...tsm->...ts", read, weights)  # [B, H, N, C, C]
    out = mixed @ vc + (read * carried) @ entering_v
    return chunk.unchunk(out), (hk, hv, z_final)


def empty_state(q: Tensor, v: Tensor, slots: int) -> AbcState:
    """Zero memories and a void normaliser for q [B, T, H, K], v [B, T, H, V] and M slots."""
    batch, _, heads, key_dim = q.shape
    dtype = compute_dtype(q.dtype)
    return (
        q.new_zeros(batch, heads, key_dim, slots, dtype=dtype),
        q.new_zeros(batch, heads, slots, v.shape[-1], dtype=dtype),
        q.new_full((batch, heads, slots), VOID_LOGIT, dtype=dtype),
    )


def abc_forward(
    q: Tensor, k: Tensor, v: Tensor, s: Tensor, state: AbcState | None, backend: str, chunk_size: int
) -> tuple[Tensor, AbcState | None]:
    """The mixin's entry point. `backend` is resolved already; fla's `chunk_abc` runs the training path
    (no state: its normaliser starts afresh each call). With a state the new one is returned in its
    dtype, without one None."""
    if backend == "fused" and state is None:
        out, _ = fla_op(*FUSED_KERNEL)(q=q, k=k, v=v, s=s.to(q.dtype))
        return out.to(v.dtype), None
    start = empty_state(q, v, s.shape[-1]) if state is None else state
    out, new = chunk_abc(q, k, v, s, start, chunk_size)
    if state is None:
        return out.to(v.dtype), None
    return out.to(v.dtype), tuple(n.to(old.dtype) for n, old in zip(new, state))

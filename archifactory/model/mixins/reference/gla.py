"""Gated linear attention with a per-channel decay (GLA, HGRN2) in plain PyTorch: chunked form and step.

Per head, with state S [K, V] and log-decay g_t [K] (<= 0):

    S_t = diag(exp g_t) S_{t-1} + k_t v_tᵀ        o_t = scale · S_tᵀ q_t

Chunked like `delta_rule.py` (whose chunking and pairwise-decay helpers it shares): inside a chunk the
decay from s to t is exp(B_t − B_s) with B the chunk-local cumulative log-decay, masked to s <= t before
the exp, so no exponent is positive; across chunks the state is carried by one loop step per chunk.
Layout as fla: q/k/g [B, T, H, K], v [B, T, H, V], state [B, H, K, V].
"""

from __future__ import annotations

from torch import Tensor

from archifactory.model.mixins.reference.common import carry_chunks, compute_dtype
from archifactory.model.mixins.reference.delta_rule import Chunker, initial_state_or_zeros
from archifactory.model.mixins.reference.per_channel import per_channel_scores, sub_chunk_length


def chunk_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 16,
    sub_chunk_size: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Chunked GLA (sub-chunks of `sub_chunk_size` inside each chunk, default about sqrt(chunk_size)).
    Returns o [B, T, H, V] in q's dtype and, if asked, the final state (compute dtype)."""
    dtype = compute_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    sub = sub_chunk_length(chunk_size, sub_chunk_size)
    chunk = Chunker(q.shape[1], chunk_size, dtype, sub)
    qc, kc, vc, gc = chunk(q) * scale, chunk(k), chunk(v), chunk(g)  # [B, H, N, C, *]
    cum = gc.cumsum(-2)  # B_t, non-increasing down the chunk
    intra = per_channel_scores([qc], [kc], cum, cum, sub)[0, 0] @ vc  # [B, H, N, C, V]
    last = cum[..., -1:, :]
    chunk_kv = (kc * (last - cum).exp()).transpose(-1, -2) @ vc  # [B, H, N, K, V]
    chunk_decay = last.transpose(-1, -2).exp()  # [B, H, N, K, 1]
    state = initial_state_or_zeros(q, v.shape[-1], initial_state, dtype)
    entering, state = carry_chunks(state, chunk_kv, chunk_decay)
    out = (qc * cum.exp()) @ entering + intra
    return chunk.unchunk(out).to(q.dtype), state if output_final_state else None


def gla_step(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """One decode step. q/k/g [B, H, K], v [B, H, V], state [B, H, K, V] -> (o [B, H, V], state)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = state.dtype
    q, k, v, g = (t.to(dtype) for t in (q, k, v, g))
    state = g.exp()[..., None] * state + k[..., :, None] * v[..., None, :]
    return scale * (q[..., None, :] @ state).squeeze(-2), state

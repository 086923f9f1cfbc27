"""Simple gated linear attention: a linear recurrence with one scalar decay per head and time step.

    S_t = exp(g_t) · S_{t-1} + k_tᵀ v_t        S [K, V] per head, g_t <= 0 (log-decay)
    o_t = scale · q_t S_t

RetNet's retention is the special case of a constant g = log(gamma_h) per head; Mamba2's SSD is the case
q = C, k = B, v = x·dt, g = A·dt (Dao & Gu, "Transformers are SSMs", 2024). Layout follows fla:
q/k [B, T, H, K] (or [B, T, G, K] shared by groups of H / G heads), v [B, T, H, V],
g [B, T, H], state [B, H, K, V].

Numerics: everything is computed in fp32 (fp64 when the inputs are fp64). Within a chunk the log-decays
are summed (b = cumsum g, non-increasing) and only *differences* b_i - b_j with i >= j, or b_i itself, are
exponentiated: every exponent is <= 0, so nothing overflows however long the sequence or strong the decay
(at worst a decay underflows to 0, which is its true value to fp32 precision).

`simple_gla_forward` picks the path: fla's Triton `chunk_simple_gla` (`FUSED_KERNEL`, through the kit's
loader) when the caller resolved the backend to `fused`, otherwise the chunked reference below; a single
decode token always takes `simple_gla_step`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from archifactory.model.mixins.kit import fla_op
from archifactory.model.mixins.reference.common import carry_chunks, compute_dtype

FUSED_KERNEL = ("simple_gla", "chunk_simple_gla")  # fla.ops.simple_gla.chunk_simple_gla


def chunk_simple_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Chunked (parallel within a chunk, recurrent across chunks) simple GLA.

    q/k may have G heads shared by groups of H / G consecutive heads of v/g (Mamba2's B and C groups):
    the q·kᵀ scores are then computed once per group and only the per-head decays are applied per head,
    and the heads of a group are folded into one matmul's columns ([K, (H/G)·V]) for the state terms.
    Returns o [B, T, H, V] in q's dtype and, if asked, the final state [B, H, K, V] in the compute dtype.
    """
    batch, seq_len, groups, key_dim = q.shape
    heads, value_dim = v.shape[2], v.shape[3]
    assert k.shape[2] == groups and heads % groups == 0, "q/k heads must divide v's heads"
    rep = heads // groups  # heads per q/k group
    scale = key_dim**-0.5 if scale is None else scale
    dtype = compute_dtype(q.dtype)
    size = max(1, min(chunk_size, seq_len))
    pad = (-seq_len) % size
    chunks = (seq_len + pad) // size
    # padding with k = v = 0 and g = 0 (no decay) leaves the final state exact

    def split(t: Tensor) -> Tensor:  # [B, T, ...] -> [B, N, C, ...] in the compute dtype (no copy if it is)
        t = t.to(dtype)
        if pad:
            t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(batch, chunks, size, *t.shape[2:])

    qc = split(q).permute(0, 3, 1, 2, 4)  # [B, G, N, C, K]
    if scale != 1.0:
        qc = qc * scale
    kc = split(k).permute(0, 3, 1, 2, 4)  # [B, G, N, C, K]
    vc = split(v).reshape(batch, chunks, size, groups, rep, value_dim)  # [B, N, C, G, r, V]
    gc = split(g).reshape(batch, chunks, size, groups, rep).permute(0, 3, 1, 4, 2)  # [B, G, N, r, C]
    b = gc.cumsum(-1)  # [B, G, N, r, C], non-increasing within each chunk
    causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    # exp(b_i - b_j) for j <= i; the upper triangle is masked *before* exp so no exponent is positive
    decay = (
        (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    )  # [B, G, N, r, C, C]
    scores = qc @ kc.transpose(-1, -2)  # [B, G, N, C, C], once per group
    v_heads = vc.permute(0, 3, 1, 4, 2, 5)  # [B, G, N, r, C, V]
    intra = (scores[:, :, :, None] * decay) @ v_heads  # [B, G, N, r, C, V]

    # heads of a group side by side: v, states and inter-chunk outputs as [..., r, V] = [..., r·V] columns
    v_cols = vc.permute(0, 3, 1, 2, 4, 5)  # [B, G, N, C, r, V]
    b_cols = b.transpose(-1, -2)[..., None]  # [B, G, N, C, r, 1]
    last = b_cols[:, :, :, -1:]  # [B, G, N, 1, r, 1]: total log-decay of each chunk
    to_end = (last - b_cols).exp()  # [B, G, N, C, r, 1]: decay from each position to the chunk's end
    if rep == 1:  # per-head q/k: decay the keys (and below the queries), the narrower side when K <= V
        weighted_k = kc * to_end[..., 0]
        chunk_kv = (weighted_k.transpose(-1, -2) @ v_cols.flatten(-2)).unflatten(-1, (1, value_dim))
    else:
        weighted = (v_cols * to_end).flatten(-2)  # [B, G, N, C, r·V]
        chunk_kv = (kc.transpose(-1, -2) @ weighted).unflatten(-1, (rep, value_dim))  # [B, G, N, K, r, V]
    chunk_decay = last.exp()  # [B, G, N, 1, r, 1]
    if initial_state is None:
        state = q.new_zeros(batch, groups, key_dim, rep, value_dim, dtype=dtype)
    else:  # [B, H, K, V] -> [B, G, K, r, V]
        state = initial_state.to(dtype).reshape(batch, groups, rep, key_dim, value_dim).transpose(2, 3)
    entering, state = carry_chunks(state, chunk_kv, chunk_decay)
    entering = entering.reshape(batch, groups, chunks, key_dim, rep * value_dim)
    # inter-chunk: the state entering the chunk, decayed to each position (exp(b_i) <= 1)
    if rep == 1:
        inter = ((qc * b_cols[..., 0].exp()) @ entering).unflatten(-1, (1, value_dim))
    else:
        inter = (qc @ entering).unflatten(-1, (rep, value_dim)) * b_cols.exp()  # [B, G, N, C, r, V]
    out = inter.permute(0, 2, 3, 1, 4, 5) + intra.permute(0, 2, 4, 1, 3, 5)  # [B, N, C, G, r, V]
    out = out.reshape(batch, chunks * size, heads, value_dim)[:, :seq_len].to(q.dtype)
    if not output_final_state:
        return out, None
    return out, state.transpose(2, 3).reshape(batch, heads, key_dim, value_dim)


def expand_heads(t: Tensor, heads: int, dim: int) -> Tensor:
    """Repeat each of t's G heads (along `dim`) for its H / G consecutive heads; no copy when G == H."""
    groups = t.shape[dim]
    if groups == heads:
        return t
    shape = list(t.shape)
    shape[dim : dim + 1] = [heads]
    return (
        t.unsqueeze(dim + 1).expand(*t.shape[: dim + 1], heads // groups, *t.shape[dim + 1 :]).reshape(shape)
    )


def simple_gla_step(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """One decode step. q/k [B, H, K], v [B, H, V], g [B, H], state [B, H, K, V] -> (o [B, H, V], state)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = state.dtype
    state = state * g.to(dtype).exp()[..., None, None] + k.to(dtype)[..., :, None] * v.to(dtype)[..., None, :]
    out = scale * (q.to(dtype)[..., None, :] @ state).squeeze(-2)
    return out.to(q.dtype), state


def simple_gla_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float,
    state: Tensor | None,
    backend: str,
    chunk_size: int,
) -> tuple[Tensor, Tensor | None]:
    """The mixins' entry point. `backend` is already resolved (`reference` or `fused`). With a state the
    new state is returned (in the state's dtype), without one None."""
    heads = v.shape[2]
    if state is not None and q.shape[1] == 1:
        q, k = expand_heads(q, heads, 2), expand_heads(k, heads, 2)
        out, new_state = simple_gla_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], state, scale)
        return out[:, None], new_state
    if backend == "fused":
        out, new_state = fla_op(*FUSED_KERNEL)(
            expand_heads(q, heads, 2),  # the kernel takes per-head q/k
            expand_heads(k, heads, 2),
            v.to(q.dtype),
            g.float().contiguous(),
            scale=scale,
            initial_state=None if state is None else state.float(),
            output_final_state=state is not None,
        )
        return out, None if state is None else new_state.to(state.dtype)
    return chunk_simple_gla(q, k, v, g, scale, state, state is not None, chunk_size)

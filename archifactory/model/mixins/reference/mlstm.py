"""The mLSTM cell (xLSTM's matrix memory), stabilised, in chunkwise-parallel form and as a decode step.

Per head, with input-gate pre-activation ĩ_t, log forget gate f_t = logsigmoid(f̃_t) <= 0, a max-state m:
    m_t = max(f_t + m_{t-1}, ĩ_t)
    C_t = exp(f_t + m_{t-1} − m_t) C_{t-1} + exp(ĩ_t − m_t) k_tᵀ v_t        C [K, V]
    n_t = exp(f_t + m_{t-1} − m_t) n_{t-1} + exp(ĩ_t − m_t) k_t              n [K]
    h_t = (q̂_t C_t) / (max(|q̂_t · n_t|, exp(−m_t)) + eps),   q̂ = q / √K
(Beck et al., "xLSTM", 2024, eqs. 19-27 with the max-state of appendix A; mlstm_kernels' step). C and n
are the true memory and normaliser scaled by exp(−m), so h is the paper's C q / max(|n·q|, 1) up to eps;
the initial state is C = 0, n = 0, m = 0, as xLSTM's kernels. Layout: q/k [B, T, H, K], v [B, T, H, V],
gates [B, T, H]; state (C [B, H, K, V], n [B, H, K], m [B, H]).

Chunked form (xLSTM 7B's chunkwise kernels, Beck et al. 2025): within a chunk b = cumsum f, the log weight
of key j at query i >= j is b_i − b_j + ĩ_j, of the state entering the chunk b_i + m; m at position i is the
max of those, the same max the recurrence takes, so every exponent is <= 0 and the outputs are the
recurrence's. Across chunks one scalar max per chunk and head carries m, and `carry_chunks` the
stabilised (C | n) — n rides along as an extra value column of ones. An input gate of −inf writes
nothing and leaves m unchanged (padding; the zero-padded tail of the last chunk).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from archifactory.model.mixins.reference.common import carry_chunks, compute_dtype

MLSTMState = tuple[Tensor, Tensor, Tensor]  # C [B, H, K, V], n [B, H, K], m [B, H]


def mlstm_step(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, state: MLSTMState, eps: float
) -> tuple[Tensor, MLSTMState]:
    """One token: q/k [B, H, K], v [B, H, V], input-gate pre-activation i and log forget gate f [B, H]
    -> (h [B, H, V] in the state's dtype, the new state)."""
    memory, normaliser, m = state
    dtype = memory.dtype
    q, k, v, i, f = (t.to(dtype) for t in (q, k, v, i, f))
    m_new = torch.maximum(f + m, i)
    decay, write = (f + m - m_new).exp(), (i - m_new).exp()  # both <= 1
    memory = decay[..., None, None] * memory + write[..., None, None] * k[..., :, None] * v[..., None, :]
    normaliser = decay[..., None] * normaliser + write[..., None] * k
    q = q * q.shape[-1] ** -0.5
    numerator = (q[..., None, :] @ memory).squeeze(-2)  # [B, H, V]
    denominator = torch.maximum((q * normaliser).sum(-1).abs(), (-m_new).exp()) + eps
    return numerator / denominator[..., None], (memory, normaliser, m_new)


def empty_state(q: Tensor, v: Tensor) -> MLSTMState:
    """C = 0, n = 0, m = 0 for q [B, T, H, K], v [B, T, H, V], in the compute dtype."""
    batch, _, heads, key_dim = q.shape
    dtype = compute_dtype(q.dtype)
    return (
        q.new_zeros(batch, heads, key_dim, v.shape[-1], dtype=dtype),
        q.new_zeros(batch, heads, key_dim, dtype=dtype),
        q.new_zeros(batch, heads, dtype=dtype),
    )


def chunk_mlstm(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    i: Tensor,
    f: Tensor,
    state: MLSTMState | None = None,
    chunk_size: int = 64,
    eps: float = 1e-6,
) -> tuple[Tensor, MLSTMState]:
    """The chunkwise-parallel mLSTM from `state` (None = empty). Returns (h [B, T, H, V] in the compute
    dtype, the final state)."""
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    dtype = compute_dtype(q.dtype)
    size = max(1, min(chunk_size, seq_len))
    pad = (-seq_len) % size
    chunks = (seq_len + pad) // size

    def split(t: Tensor, fill: float = 0.0) -> Tensor:  # [B, T, H, ...] -> [B, H, N, C, ...]
        t = t.to(dtype)
        if pad:
            t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad), value=fill)
        t = t.reshape(batch, chunks, size, *t.shape[2:])
        return t.permute(0, 3, 1, 2, *range(4, t.dim()))

    qc = split(q) * key_dim**-0.5  # [B, H, N, C, K]
    kc = split(k)
    vc = split(
        torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
    )  # [B, H, N, C, V + 1]: (v | 1) -> (C | n)
    ic, b = split(i, float("-inf")), split(f).cumsum(-1)  # [B, H, N, C]: the tail writes nothing
    memory, normaliser, m = empty_state(q, v) if state is None else (s.to(dtype) for s in state)
    last = b[..., -1]  # [B, H, N]: log forget of each whole chunk
    to_end = last[..., None] - b + ic  # [B, H, N, C]: log weight of key j in the chunk's final state
    best = to_end.amax(-1)  # [B, H, N]
    entering_m = []
    for n in range(chunks):  # one scalar per head and chunk
        entering_m.append(m)
        m = torch.maximum(last[:, :, n] + m, best[:, :, n])
    m_in = torch.stack(entering_m, dim=2)  # [B, H, N]
    m_out = torch.cat([m_in[:, :, 1:], m[:, :, None]], dim=2)
    weighted_k = kc * (to_end - m_out[..., None]).exp()[..., None]
    chunk_kv = weighted_k.transpose(-1, -2) @ vc  # [B, H, N, K, V + 1]
    start = torch.cat([memory, normaliser[..., None]], dim=-1)  # [B, H, K, V + 1]
    entering, final = carry_chunks(start, chunk_kv, (last + m_in - m_out)[..., None, None].exp())
    causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    log_w = (b[..., :, None] - b[..., None, :] + ic[..., None, :]).masked_fill(~causal, float("-inf"))
    from_state = b + m_in[..., None]  # [B, H, N, C]: log weight of the entering state at each position
    m_pos = torch.maximum(from_state, log_w.amax(-1))  # [B, H, N, C]: the recurrence's m_t
    weights = (qc @ kc.transpose(-1, -2)) * (log_w - m_pos[..., None]).exp()  # [B, H, N, C, C]
    both = (from_state - m_pos).exp()[..., None] * (qc @ entering) + weights @ vc  # [B, H, N, C, V + 1]
    denominator = torch.maximum(both[..., value_dim:].abs(), (-m_pos).exp()[..., None]) + eps
    h = both[..., :value_dim] / denominator  # [B, H, N, C, V]
    h = h.permute(0, 2, 3, 1, 4).reshape(batch, chunks * size, heads, value_dim)[:, :seq_len]
    return h, (final[..., :value_dim], final[..., value_dim], m)


def mlstm_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    i: Tensor,
    f: Tensor,
    state: MLSTMState | None,
    chunk_size: int,
    eps: float,
) -> tuple[Tensor, MLSTMState]:
    """The mixin's entry point: a single token with a state takes `mlstm_step`, anything else the chunks."""
    if state is not None and q.shape[1] == 1:
        h, state = mlstm_step(q[:, 0], k[:, 0], v[:, 0], i[:, 0], f[:, 0], state, eps)
        return h[:, None], state
    return chunk_mlstm(q, k, v, i, f, state, chunk_size, eps)

"""Simple gated linear attention: a linear recurrence with one scalar decay per head and time step.

    S_t = exp(g_t) · S_{t-1} + k_tᵀ v_t        S [K, V] per head, g_t <= 0 (log-decay)
    o_t = scale · q_t S_t

RetNet's retention is the special case of a constant g = log(gamma_h) per head; Mamba2's SSD is the case
q = C, k = B, v = x·dt, g = A·dt (Dao & Gu, "Transformers are SSMs", 2024). Layout follows fla:
q/k [B, T, H, K], v [B, T, H, V], g [B, T, H], state [B, H, K, V].

Numerics: everything is computed in fp32 (fp64 when the inputs are fp64). Within a chunk the log-decays
are summed (b = cumsum g, non-increasing) and only *differences* b_i - b_j with i >= j, or b_i itself, are
exponentiated: every exponent is <= 0, so nothing overflows however long the sequence or strong the decay
(at worst a decay underflows to 0, which is its true value to fp32 precision).

`simple_gla_forward` picks the path: fla's Triton `chunk_simple_gla` when the caller resolved the backend
to `fused` (imported lazily so CPU never needs triton), otherwise the chunked reference below; a single
decode token always takes `simple_gla_step`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (tests), everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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

    Returns o [B, T, H, V] in q's dtype and, if asked, the final state [B, H, K, V] in the compute dtype.
    """
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    scale = key_dim**-0.5 if scale is None else scale
    dtype = compute_dtype(q.dtype)
    size = max(1, min(chunk_size, seq_len))
    pad = (-seq_len) % size
    # padding with k = v = 0 and g = 0 (no decay) leaves the final state exact

    def to_chunks(t: Tensor) -> Tensor:  # [B, T, H, D] -> [B, H, N, C, D]
        t = F.pad(t.to(dtype).transpose(1, 2), (0, 0, 0, pad))
        return t.reshape(batch, heads, -1, size, t.shape[-1])

    qc, kc, vc = to_chunks(q) * scale, to_chunks(k), to_chunks(v)
    gc = F.pad(g.to(dtype).transpose(1, 2), (0, pad)).reshape(batch, heads, -1, size)  # [B, H, N, C]
    b = gc.cumsum(-1)  # [B, H, N, C], non-increasing within each chunk
    causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    # exp(b_i - b_j) for j <= i; the upper triangle is masked *before* exp so no exponent is positive
    decay = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # [B, H, N, C, C]
    out = ((qc @ kc.transpose(-1, -2)) * decay) @ vc  # intra-chunk, [B, H, N, C, V]

    last = b[..., -1:]  # [B, H, N, 1]: total log-decay of each chunk
    chunk_kv = (kc * (last - b).exp()[..., None]).transpose(-1, -2) @ vc  # [B, H, N, K, V]
    chunk_decay = last.exp()[..., None]  # [B, H, N, 1, 1]
    state = (
        q.new_zeros(batch, heads, key_dim, value_dim, dtype=dtype)
        if initial_state is None
        else initial_state.to(dtype)
    )
    states_before = []
    # unbind, not chunk_kv[:, :, n]: indexing in a loop makes autograd build a full-size zero gradient per
    # chunk (quadratic in the number of chunks); unbind's backward stacks the per-chunk gradients once
    for kv_n, decay_n in zip(chunk_kv.unbind(2), chunk_decay.unbind(2)):
        states_before.append(state)
        state = state * decay_n + kv_n
    # inter-chunk: the state entering the chunk, decayed to each position (exp(b_i) <= 1)
    out = out + (qc * b.exp()[..., None]) @ torch.stack(states_before, dim=2)
    out = out.reshape(batch, heads, -1, value_dim)[:, :, :seq_len].transpose(1, 2).to(q.dtype)
    return out, state if output_final_state else None


def simple_gla_step(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """One decode step. q/k [B, H, K], v [B, H, V], g [B, H], state [B, H, K, V] -> (o [B, H, V], state)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = state.dtype
    state = state * g.to(dtype).exp()[..., None, None] + k.to(dtype)[..., :, None] * v.to(dtype)[..., None, :]
    out = scale * (q.to(dtype)[..., None, :] @ state).squeeze(-2)
    return out.to(q.dtype), state


def recurrent_simple_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Token-by-token recurrence (a Python loop over T): the slow form, for tests only."""
    batch, seq_len, heads, key_dim = q.shape
    dtype = compute_dtype(q.dtype)
    state = q.new_zeros(batch, heads, key_dim, v.shape[-1], dtype=dtype)
    if initial_state is not None:
        state = initial_state.to(dtype)
    outputs = []
    for t in range(seq_len):
        out, state = simple_gla_step(q[:, t], k[:, t], v[:, t], g[:, t], state, scale)
        outputs.append(out)
    return torch.stack(outputs, dim=1), state


@functools.cache
def fla_chunk_simple_gla() -> Callable | None:
    """fla's Triton kernel, or None when fla/triton is not installed. Imported on first use only."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla as kernel
    except Exception:  # ImportError, or triton failing to initialise
        return None
    return kernel


def fused_available(x: Tensor) -> bool:
    """The fused path runs on CUDA tensors when fla imports."""
    return x.is_cuda and fla_chunk_simple_gla() is not None


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
    if state is not None and q.shape[1] == 1:
        out, new_state = simple_gla_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], state, scale)
        return out[:, None], new_state
    if backend == "fused":
        kernel = fla_chunk_simple_gla()
        assert kernel is not None, "backend resolved to fused without fla"
        out, new_state = kernel(
            q,
            k,
            v.to(q.dtype),
            g.float().contiguous(),
            scale=scale,
            initial_state=None if state is None else state.float(),
            output_final_state=state is not None,
        )
        return out, None if state is None else new_state.to(state.dtype)
    return chunk_simple_gla(q, k, v, g, scale, state, state is not None, chunk_size)

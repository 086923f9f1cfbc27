"""What every chunked reference shares: the accumulation dtype and the chunk-to-chunk state carry."""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype recurrences and their states accumulate in: at least fp32 (bf16/fp16 are promoted),
    fp64 stays fp64 (the tests run the math in fp64)."""
    return torch.promote_types(dtype, torch.float32)


def carry_chunks(state: Tensor, chunk_kv: Tensor, chunk_decay: Tensor) -> tuple[Tensor, Tensor]:
    """The recurrence across chunks, S_{n+1} = decay_n · S_n + kv_n, with chunks along dim 2 of
    `chunk_kv` / `chunk_decay` (broadcastable against the state). Returns (the state entering each chunk,
    stacked along dim 2; the state after the last chunk)."""
    entering = []
    # unbind, not chunk_kv[:, :, n]: indexing in a loop makes autograd build a full-size zero gradient per
    # chunk (quadratic in the number of chunks); unbind's backward stacks the per-chunk gradients once
    for kv_n, decay_n in zip(chunk_kv.unbind(2), chunk_decay.unbind(2)):
        entering.append(state)
        state = decay_n * state + kv_n
    return torch.stack(entering, dim=2), state

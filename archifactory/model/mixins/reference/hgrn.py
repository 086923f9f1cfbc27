"""The element-wise (diagonal) gated linear recurrence of HGRN and of Mamba's selective scan:

    h_t = exp(g_t) ⊙ h_{t-1} + x_t        o_t = h_t        x, g, h [B, T, D], g <= 0 (log-decay)

in plain PyTorch as a two-level scan: the sequence is cut into chunks of `chunk_size`; every chunk is
scanned from a zero state at once (one vectorised step per offset inside a chunk), then the chunk-to-chunk
carry runs once per chunk, and the state entering each chunk is added decayed by exp(cumsum g) (<= 1, so
nothing overflows). chunk_size + T / chunk_size Python steps instead of T, and O(T·D) work like the
sequential scan (no pairwise [C, C] decay: Mamba's D is d_inner · d_state channels).

`diagonal_scan` picks the path: fla's Triton `chunk_hgrn` (`FUSED_KERNEL`) when the caller resolved the
backend to `fused`, otherwise `chunk_hgrn` below; one decode token takes `hgrn_step`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from archifactory.model.mixins.kit import fla_op
from archifactory.model.mixins.reference.common import carry_chunks, compute_dtype

FUSED_KERNEL = ("hgrn", "chunk_hgrn")  # fla.ops.hgrn.chunk_hgrn


def chunk_hgrn(
    x: Tensor,
    g: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """The two-level scan. Returns o [B, T, D] in x's dtype and, if asked, the final state [B, D] in the
    compute dtype."""
    batch, seq_len, width = x.shape
    dtype = compute_dtype(x.dtype)
    size = max(1, min(chunk_size, seq_len))
    pad = (-seq_len) % size  # x = 0 and g = 0 (no decay) past the end: the final state stays exact
    chunks = (seq_len + pad) // size
    xc, gc = (F.pad(t.to(dtype), (0, 0, 0, pad)) if pad else t.to(dtype) for t in (x, g))
    xc, gc = xc.view(batch, chunks, size, width), gc.view(batch, chunks, size, width)
    # 1. every chunk from a zero state, all chunks at once (unbind: one gradient buffer, not one per step)
    steps, log_decays = xc.unbind(2), gc.unbind(2)
    decays = gc.exp().unbind(2)
    h = steps[0]
    local = [h]
    for x_j, a_j in zip(steps[1:], decays[1:]):
        h = torch.addcmul(x_j, a_j, h)  # a_j ⊙ h + x_j
        local.append(h)
    local_h = torch.stack(local, dim=2)  # [B, N, C, D]
    if initial_state is None and chunks == 1:  # nothing enters the only chunk
        final = local_h[:, 0, seq_len - 1] if output_final_state else None
        return local_h[:, 0, :seq_len].to(x.dtype), final
    # 2. the carry: chunk n's state enters chunk n + 1 decayed by the chunk's total decay. The log-decay
    # from the chunk's start to each position (inclusive) is summed step by step: torch's cumsum along a
    # middle dimension is several times slower on CPU
    cum_j = log_decays[0]
    running = [cum_j]
    for g_j in log_decays[1:]:
        cum_j = cum_j + g_j
        running.append(cum_j)
    cum = torch.stack(running, dim=2)  # [B, N, C, D]
    state = x.new_zeros(batch, width, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    entering, final = carry_chunks(
        state, local_h[:, :, -1].transpose(1, 2), cum[:, :, -1].exp().transpose(1, 2)
    )  # entering [B, D, N]
    out = torch.addcmul(local_h, cum.exp(), entering.transpose(1, 2)[:, :, None])
    out = out.reshape(batch, chunks * size, width)[:, :seq_len].to(x.dtype)
    return out, final if output_final_state else None


def hgrn_step(x: Tensor, g: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """One decode step: x, g [B, D], state [B, D] -> (o [B, D] in x's dtype, state)."""
    state = g.to(state.dtype).exp() * state + x.to(state.dtype)
    return state.to(x.dtype), state


def diagonal_scan(
    x: Tensor, g: Tensor, state: Tensor | None, backend: str, chunk_size: int
) -> tuple[Tensor, Tensor | None]:
    """The mixins' entry point. `backend` is already resolved (`reference` or `fused`). With a state the
    new state is returned (in the state's dtype), without one None."""
    if state is not None and x.shape[1] == 1:
        out, new_state = hgrn_step(x[:, 0], g[:, 0], state)
        return out[:, None], new_state
    if backend == "fused":
        out, new_state = fla_op(*FUSED_KERNEL)(
            x.contiguous(),
            g.float().contiguous(),
            initial_state=None if state is None else state.float(),
            output_final_state=state is not None,
        )
        return out, None if state is None else new_state.to(state.dtype)
    return chunk_hgrn(x, g, state, state is not None, chunk_size)

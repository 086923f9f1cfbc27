"""The state loop of chunked rules whose chunk update reads the state (the delta rule, DPLR/RWKV-7).

Per chunk n, with the state S_n [K, V] entering it:

    U_n = W_n + A_n S_n                       (the chunk's rows: [C, V])
    S_{n+1} = D_n ⊙ S_n + E_nᵀ U_n + X_n      (D_n [K, 1] or [1, 1] broadcast over V; X_n optional)

For the delta rule A_n = −W_k, E_n = the keys decayed to the chunk end and X = 0; for DPLR A_n = W_state,
E_n = the decayed b and X_n = the chunk's decayed k vᵀ. Autograd over the plain loop records every
state and product of every chunk; `ReadCarry` keeps only the states entering each chunk and the rows U
(both outputs anyway) and runs the reverse loop by hand:

    dU_n = ∂U_n + E_n dS_{n+1},   dW_n = dU_n,   dA_n = dU_n S_nᵀ,   dE_n = U_n dS_{n+1}ᵀ,
    dX_n = dS_{n+1},   dD_n = Σ_V dS_{n+1} ⊙ S_n,   dS_n = D_n ⊙ dS_{n+1} + A_nᵀ dU_n + ∂S_n.

Layout: chunks along dim 2, [B, H, N, ...]; state [B, H, K, V].
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def carry_with_readout(
    rows: Tensor, read: Tensor, write: Tensor, decay: Tensor, extra: Tensor | None, state: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """rows W [B, H, N, C, V], read A [B, H, N, C, K], write E [B, H, N, C, K], decay D [B, H, N, K or 1, 1],
    extra X [B, H, N, K, V] or None, state S₀ [B, H, K, V] -> (the state entering each chunk
    [B, H, N, K, V], the rows U [B, H, N, C, V], the final state [B, H, K, V])."""
    return ReadCarry.apply(rows, read, write, decay, state, extra)


class ReadCarry(torch.autograd.Function):
    """`carry_with_readout` with the hand-written backward of the module docstring."""

    @staticmethod
    def forward(
        ctx: Any,
        rows: Tensor,
        read: Tensor,
        write: Tensor,
        decay: Tensor,
        state: Tensor,
        extra: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        entering, updates, state = carry_forward(rows, read, write, decay, state, extra)
        ctx.save_for_backward(read, write, decay, entering, updates)
        ctx.has_extra = extra is not None
        return entering, updates, state

    @staticmethod
    def backward(
        ctx: Any, d_entering: Tensor, d_updates: Tensor, d_state: Tensor
    ) -> tuple[Tensor | None, ...]:
        return carry_backward(*ctx.saved_tensors, d_entering, d_updates, d_state, ctx.has_extra)


def carry_forward(
    rows: Tensor, read: Tensor, write: Tensor, decay: Tensor, state: Tensor, extra: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """The loop itself, no autograd: (the entering states, the rows U, the final state)."""
    chunks = rows.shape[2]
    entering = state.new_empty(*state.shape[:2], chunks, *state.shape[2:])
    updates = torch.empty_like(rows)
    for n in range(chunks):
        entering[:, :, n] = state
        update = torch.matmul(read[:, :, n], state).add_(rows[:, :, n])
        updates[:, :, n] = update
        state = decay[:, :, n] * state + write[:, :, n].transpose(-1, -2) @ update
        if extra is not None:
            state = state + extra[:, :, n]
    return entering, updates, state


def carry_backward(
    read: Tensor,
    write: Tensor,
    decay: Tensor,
    entering: Tensor,
    updates: Tensor,
    d_entering: Tensor,
    d_updates: Tensor,
    d_state: Tensor,
    has_extra: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """The reverse loop of the module docstring: (dW, dA, dE, dD, dS₀, dX or None)."""
    chunks = read.shape[2]
    d_rows = torch.empty_like(updates)
    d_read, d_write = torch.empty_like(read), torch.empty_like(write)
    d_decay = torch.empty_like(decay)
    d_extra = torch.empty_like(entering) if has_extra else None
    for n in reversed(range(chunks)):
        state_n, update_n = entering[:, :, n], updates[:, :, n]
        if d_extra is not None:
            d_extra[:, :, n] = d_state
        product = (d_state * state_n).sum(-1, keepdim=True)  # [B, H, K, 1]
        d_decay[:, :, n] = product if decay.shape[-2] > 1 else product.sum(-2, keepdim=True)
        d_write[:, :, n] = update_n @ d_state.transpose(-1, -2)
        d_update = torch.matmul(write[:, :, n], d_state).add_(d_updates[:, :, n])
        d_rows[:, :, n] = d_update
        d_read[:, :, n] = d_update @ state_n.transpose(-1, -2)
        d_state = decay[:, :, n] * d_state + read[:, :, n].transpose(-1, -2) @ d_update + d_entering[:, :, n]
    return d_rows, d_read, d_write, d_decay, d_state, d_extra

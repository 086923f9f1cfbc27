"""The hand-written state loop of the delta rule and DPLR against the same loop under autograd."""

from __future__ import annotations

import pytest
import torch

from archifactory.model.mixins.reference.read_carry import carry_with_readout
from tests.model.parity import assert_function_matches_autograd


def plain_loop(rows, read, write, decay, extra, state):
    entering, updates = [], []
    for n in range(rows.shape[2]):
        entering.append(state)
        update = rows[:, :, n] + read[:, :, n] @ state
        updates.append(update)
        state = decay[:, :, n] * state + write[:, :, n].transpose(-1, -2) @ update
        if extra is not None:
            state = state + extra[:, :, n]
    return torch.stack(entering, 2), torch.stack(updates, 2), state


def leaf(*shape: int) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float64) * 0.5).requires_grad_()


@pytest.mark.parametrize("decay_width", [1, 3])
@pytest.mark.parametrize("with_extra", [False, True])
def test_values_and_every_gradient_match_the_autograd_loop(decay_width: int, with_extra: bool) -> None:
    torch.manual_seed(decay_width + 2 * with_extra)
    batch, heads, chunks, size, keys, values = 2, 2, 5, 4, 3, 2
    rows = leaf(batch, heads, chunks, size, values)
    read, write = leaf(batch, heads, chunks, size, keys), leaf(batch, heads, chunks, size, keys)
    decay = torch.rand(batch, heads, chunks, decay_width, 1, dtype=torch.float64).requires_grad_()
    extra = leaf(batch, heads, chunks, keys, values) if with_extra else None
    state = leaf(batch, heads, keys, values)
    inputs = [t for t in (rows, read, write, decay, extra, state) if t is not None]
    ours = carry_with_readout(rows, read, write, decay, extra, state)
    assert_function_matches_autograd(ours, plain_loop(rows, read, write, decay, extra, state), inputs)


def test_gradcheck() -> None:
    torch.manual_seed(0)
    decay = torch.rand(1, 1, 3, 2, 1, dtype=torch.float64).requires_grad_()
    args = (
        leaf(1, 1, 3, 2, 2),
        leaf(1, 1, 3, 2, 2),
        leaf(1, 1, 3, 2, 2),
        decay,
        leaf(1, 1, 3, 2, 2),
        leaf(1, 1, 2, 2),
    )

    assert torch.autograd.gradcheck(carry_with_readout, args)

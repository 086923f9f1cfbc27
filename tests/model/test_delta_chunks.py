"""The delta rule's hand-written chunk Function against the same steps under autograd, in fp64."""

from __future__ import annotations

import pytest
import torch

from archifactory.model.mixins.reference.delta_chunks import delta_rule_chunks, unit_lower_inverse
from archifactory.model.mixins.reference.read_carry import carry_with_readout
from tests.model.parity import assert_function_matches_autograd


def plain_chunks(q, k, v, beta, cum, kk, qk, state, read_key):
    """The WY solve, the loop and the output as chunk_delta_rule wrote them before the Function."""
    r = k if read_key is None else read_key
    solve = unit_lower_inverse(beta * kk)
    w_v = solve @ (beta * v)
    w_k = solve @ (beta * r * cum.exp())
    last = cum[..., -1:, :]
    k_end = k * (last - cum).exp()
    chunk_decay = last.transpose(-1, -2).exp()
    entering, updates, state = carry_with_readout(w_v, -w_k, k_end, chunk_decay, None, state)
    return (q * cum.exp()) @ entering + qk @ updates, state


def leaf(*shape: int, scale: float = 0.5) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float64) * scale).requires_grad_()


def chunk_inputs(width: int, with_read_key: bool, seed: int) -> list[torch.Tensor | None]:
    torch.manual_seed(seed)
    batch, heads, chunks, size, keys, values = 2, 2, 3, 4, 3, 2
    shape = (batch, heads, chunks, size)
    cum = (-torch.rand(*shape, width, dtype=torch.float64)).cumsum(-2).requires_grad_()
    kk = (torch.randn(*shape, size, dtype=torch.float64) * 0.5).tril(-1).requires_grad_()
    qk = (torch.randn(*shape, size, dtype=torch.float64) * 0.5).tril().requires_grad_()
    return [
        leaf(*shape, keys),
        leaf(*shape, keys),
        leaf(*shape, values),
        torch.rand(*shape, 1, dtype=torch.float64).requires_grad_(),
        cum,
        kk,
        qk,
        leaf(batch, heads, keys, values),
        leaf(*shape, keys) if with_read_key else None,
    ]


@pytest.mark.parametrize("width", [1, 3])
@pytest.mark.parametrize("with_read_key", [False, True])
def test_values_and_every_gradient_match_autograd(width: int, with_read_key: bool) -> None:
    inputs = chunk_inputs(width, with_read_key, seed=width + 2 * with_read_key)
    leaves = [t for t in inputs if t is not None]
    assert_function_matches_autograd(delta_rule_chunks(*inputs), plain_chunks(*inputs), leaves)


@pytest.mark.parametrize("with_read_key", [False, True])
def test_gradcheck(with_read_key: bool) -> None:
    inputs = chunk_inputs(3, with_read_key, seed=7)
    assert torch.autograd.gradcheck(delta_rule_chunks, inputs)

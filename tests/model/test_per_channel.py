"""The sub-chunked per-channel decayed scores (and their hand-written backward) against the plain pairwise
[C, C, K] decay under autograd."""

from __future__ import annotations

import pytest
import torch

from archifactory.model.mixins.reference.delta_rule import decayed_scores, pair_decay
from archifactory.model.mixins.reference.per_channel import per_channel_scores, sub_chunk_length


def pairwise(
    x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, exclusive: bool, strict: bool
) -> torch.Tensor:
    cum = g.cumsum(-2)
    return decayed_scores(x, y, pair_decay(cum - g if exclusive else cum, cum, strict))


def leaves(*shape: int, count: int) -> list[torch.Tensor]:
    return [torch.randn(*shape, dtype=torch.float64, requires_grad=True) for _ in range(count)]


@pytest.mark.parametrize("sub", [1, 2, 4, 8])
@pytest.mark.parametrize(("exclusive", "strict"), [(False, False), (False, True), (True, True)])
def test_scores_and_gradients_match_pairwise_decay(sub: int, exclusive: bool, strict: bool) -> None:
    """Two x against two y (the stacked path a layer takes), values and every gradient (x, y and the
    log-decay through both the row and the column cumulative sums), fp64 to 1e-12."""
    torch.manual_seed(sub)
    g = (-torch.rand(2, 3, 8, 4, dtype=torch.float64) * 3).requires_grad_()
    xs, ys = leaves(2, 3, 8, 4, count=2), leaves(2, 3, 8, 4, count=2)
    expected = torch.stack([torch.stack([pairwise(x, y, g, exclusive, strict) for y in ys]) for x in xs])
    cum = g.cumsum(-2)
    got = per_channel_scores(xs, ys, cum - g if exclusive else cum, cum, sub, strict)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(expected)
    inputs = (g, *xs, *ys)
    want = torch.autograd.grad((expected * weights).sum(), inputs)
    have = torch.autograd.grad((got * weights).sum(), inputs)
    for name, a, b in zip(("g", "x0", "x1", "y0", "y1"), have, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"d{n}: {m}")


def test_gradcheck_one_x_one_y() -> None:
    torch.manual_seed(0)
    g = (-torch.rand(1, 8, 3, dtype=torch.float64)).requires_grad_()
    x, y = leaves(1, 8, 3, count=2)

    def scores(g: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cum = g.cumsum(-2)
        return per_channel_scores([x], [y], cum, cum, 4)

    assert torch.autograd.gradcheck(scores, (g, x, y))


def test_strong_decay_stays_finite_forward_and_backward() -> None:
    """Log-decays of -200 per step: any positive exponent would overflow fp32 to inf (and NaN gradients)."""
    g = torch.full((1, 16, 4), -200.0).requires_grad_()
    x, y = torch.randn(1, 16, 4, requires_grad=True), torch.randn(1, 16, 4, requires_grad=True)
    cum = g.cumsum(-2)
    scores = per_channel_scores([x], [y], cum, cum, 4)[0, 0]
    scores.sum().backward()
    assert torch.isfinite(scores).all() and all(torch.isfinite(t.grad).all() for t in (g, x, y))
    torch.testing.assert_close(scores, torch.diag_embed((x * y).sum(-1)))  # only s = t survives


def test_chunk_must_be_a_multiple_of_the_sub_chunk() -> None:
    cum = torch.zeros(1, 6, 2)
    with pytest.raises(ValueError, match="multiple of sub_chunk_size=4"):
        per_channel_scores([cum], [cum], cum, cum, 4)


def test_sub_chunk_length_defaults_to_sqrt() -> None:
    assert [sub_chunk_length(c, None) for c in (1, 16, 64, 256)] == [1, 4, 8, 16]
    assert sub_chunk_length(4, 16) == 4


def test_a_scalar_decay_per_head_broadcasts() -> None:
    """rows/cum [..., C, 1] (Comba's DPLR with one decay per head) against the same decay on every channel."""
    torch.manual_seed(1)
    g = (-torch.rand(2, 8, 1, dtype=torch.float64) * 2).requires_grad_()
    x, y = leaves(2, 8, 4, count=2)
    cum = g.cumsum(-2)
    got = per_channel_scores([x], [y], cum - g, cum, 4, strict=True)[0, 0]
    expected = pairwise(x, y, g.expand(2, 8, 4), exclusive=True, strict=True)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    have, want = (torch.autograd.grad(s.sum(), (g, x, y)) for s in (got, expected))
    for a, b in zip(have, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)

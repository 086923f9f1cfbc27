"""The sub-chunked per-channel decayed scores against the plain pairwise [C, C, K] decay."""

from __future__ import annotations

import pytest
import torch

from archifactory.model.mixins.reference.delta_rule import decayed_scores, pair_decay
from archifactory.model.mixins.reference.per_channel import SubChunkDecay, sub_chunk_length


@pytest.mark.parametrize("sub", [1, 2, 4, 8])
@pytest.mark.parametrize("exclusive", [False, True])
@pytest.mark.parametrize("strict", [False, True])
def test_scores_match_pairwise_decay(sub: int, exclusive: bool, strict: bool) -> None:
    torch.manual_seed(sub)
    g = -torch.rand(2, 3, 8, 4, dtype=torch.float64) * 3
    x, y = torch.randn(2, 3, 8, 4, dtype=torch.float64), torch.randn(2, 3, 8, 4, dtype=torch.float64)
    cum = g.cumsum(-2)
    expected = decayed_scores(x, y, pair_decay(cum - g if exclusive else cum, cum, strict))
    got = SubChunkDecay(g, sub).scores(x, y, exclusive, strict)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_strong_decay_stays_finite_forward_and_backward() -> None:
    """Log-decays of -200 per step: any positive exponent would overflow fp32 to inf (and NaN gradients)."""
    g = torch.full((1, 16, 4), -200.0).requires_grad_()
    x, y = torch.randn(1, 16, 4, requires_grad=True), torch.randn(1, 16, 4, requires_grad=True)
    scores = SubChunkDecay(g, 4).scores(x, y)
    scores.sum().backward()
    assert torch.isfinite(scores).all() and all(torch.isfinite(t.grad).all() for t in (g, x, y))
    torch.testing.assert_close(scores, torch.diag_embed((x * y).sum(-1)))  # only s = t survives


def test_sub_chunk_length_defaults_to_sqrt() -> None:
    assert [sub_chunk_length(c, None) for c in (1, 16, 64, 256)] == [1, 4, 8, 16]
    assert sub_chunk_length(4, 16) == 4

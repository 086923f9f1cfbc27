"""Validation loss and bits per byte against a hand computation."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from archifactory.eval.evaluate import evaluate


class FixedLoss(nn.Module):
    """Returns a preset mean loss per batch (in call order), like the model's `lm_loss`."""

    def __init__(self, losses: list[float]) -> None:
        super().__init__()
        self.losses = list(losses)
        self.modes: list[bool] = []

    def forward(self, inputs, targets=None, return_logits=True, **kwargs):  # noqa: ANN001, ANN003
        self.modes.append(self.training)
        return SimpleNamespace(lm_loss=torch.tensor(self.losses.pop(0)))


def test_val_loss_is_token_weighted_and_bpb_is_bits_per_utf8_byte() -> None:
    full = torch.zeros(2, 2, dtype=torch.long)  # 4 targets
    half = torch.tensor([[0, -100], [-100, 0]])  # 2 targets (padding ignored)
    batches = [(full, full), (full, half)]
    model = FixedLoss([2.0, 5.0])
    model.train()
    result = evaluate(model, batches, torch.device("cpu"), contextlib.nullcontext, bytes_per_token=1.5)
    # (4 · 2.0 + 2 · 5.0) / 6 = 3.0 nats per token; 3.0 / ln 2 = 4.328 bits per token; / 1.5 bytes per token
    assert result["val_loss"] == pytest.approx(3.0)
    assert result["val_bpb"] == pytest.approx(2.8853900817779268, rel=1e-12)
    assert model.modes == [False, False], "validation runs in eval mode"
    assert model.training, "and hands the model back in train mode"


@pytest.mark.parametrize("chunk_size", [None, 0, 4])  # None: from logits the model already has
def test_cross_entropy_is_the_mean_over_targets_that_are_not_ignored(chunk_size: int | None) -> None:
    from archifactory.model.loss import lm_cross_entropy, logits_cross_entropy

    hidden, weight = torch.randn(10, 8, dtype=torch.float64), torch.randn(12, 8, dtype=torch.float64)

    def loss(targets: torch.Tensor) -> torch.Tensor:
        if chunk_size is None:
            return logits_cross_entropy(hidden @ weight.t(), targets)
        return lm_cross_entropy(hidden, weight, targets, chunk_size)

    targets = torch.randint(0, 12, (10,))
    targets[[1, 4, 5, 9]] = -100  # 6 targets count
    log_probs = (hidden @ weight.t()).log_softmax(-1)
    by_hand = -sum(log_probs[i, t] for i, t in enumerate(targets.tolist()) if t != -100) / 6
    assert loss(targets).dtype == torch.float32, "the loss is computed in fp32"
    torch.testing.assert_close(loss(targets).double(), by_hand, rtol=1e-5, atol=1e-6)
    one = torch.full((10,), -100)
    one[7] = 3  # a single target: its own loss, not halved
    torch.testing.assert_close(loss(one).double(), -log_probs[7, 3], rtol=1e-5, atol=1e-6)
    assert float(loss(torch.full((10,), -100))) == 0.0, "nothing to predict: zero, not NaN"


def test_nothing_to_validate_gives_null_figures_never_zero() -> None:
    """No batch, or batches whose every target is ignored: the figures are None (written as null), not a
    loss of 0.0 that a report would rank best; the probe/chat path (no bytes) likewise."""
    from archifactory.eval.probe import probe_metrics

    ignored = torch.full((2, 3), -100)
    cpu = torch.device("cpu")
    for batches in ([], [(torch.zeros(2, 3, dtype=torch.long), ignored)]):
        text = evaluate(FixedLoss([0.0]), batches, cpu, contextlib.nullcontext, bytes_per_token=1.5)
        assert text == {"val_loss": None, "val_bpb": None}
    model = nn.Sequential()  # never called: no batch
    assert probe_metrics(model, [], cpu) == {"val_loss": None, "val_accuracy": None}
    assert evaluate(model, [], cpu, contextlib.nullcontext, None) == {"val_loss": None, "val_accuracy": None}

"""Validation loss and bits per byte against a hand computation."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from archifactory.train.loop import evaluate


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

"""Validation loss and bits per byte of a model over fixed batches: what training logs at every eval step
and what `archifactory eval perplexity` reports (one function, so the two figures are the same number)."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from archifactory.eval.probe import probe_metrics
from archifactory.model.documents import documents_for

Autocast = Callable[[], AbstractContextManager]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: list,
    device: torch.device,
    autocast: Autocast,
    bytes_per_token: float | None,
    document_eos: int | None = None,
) -> dict[str, float | None]:
    """Token-weighted validation loss (nats) and bits per byte over the fixed validation batches; for a
    dataset without bytes (a synthetic probe, `bytes_per_token` None): loss and accuracy on its answers.
    No target token at all: every figure is None (nothing was measured; never a loss of 0.0)."""
    if bytes_per_token is None:
        return probe_metrics(model, batches, device, autocast)
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for inputs, targets in batches:
        documents = documents_for(inputs, document_eos, device)
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast():
            out = model(inputs, targets=targets, return_logits=False, documents=documents)
        tokens = int((targets != -100).sum())
        total += out.lm_loss.float() * tokens
        count += tokens
    model.train()
    if count == 0:
        return {"val_loss": None, "val_bpb": None}
    loss = float(total) / count
    return {"val_loss": loss, "val_bpb": loss / math.log(2) / bytes_per_token}

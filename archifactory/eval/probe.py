"""Accuracy on answer positions: the score of the synthetic probes (MQAR, MAD).

A probe marks its answer positions by giving every other position the target -100. Accuracy is the
fraction of answer positions whose argmax prediction equals the target (micro-averaged over every answer
of every example, as Zoology reports it); positions marked -100 never count, so a model that is right at
the answers and wrong everywhere else scores 1.0. The loss reported next to it is the mean cross-entropy
over the same answer positions.

    from archifactory.eval.probe import probe_metrics
    probe_metrics(model, data.val_batches(64), device)   # {"val_loss": …, "val_accuracy": …}

`archifactory eval` calls `probe_metrics` on a run's model and its dataset's fixed validation set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


def answer_counts(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(correct, answers) over positions whose target is not -100. logits [B, T, V], targets [B, T]."""
    answers = targets != IGNORE_INDEX
    correct = (logits.argmax(dim=-1) == targets) & answers
    return correct.sum(), answers.sum()


def answer_accuracy(logits: Tensor, targets: Tensor) -> float:
    """Fraction of answer positions predicted exactly (argmax); nan when there is no answer."""
    correct, answers = answer_counts(logits, targets)
    return float(correct) / int(answers) if int(answers) else float("nan")


@torch.no_grad()
def probe_metrics(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device | str = "cpu",
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> dict[str, float]:
    """`val_loss` (nats, answer positions) and `val_accuracy` over fixed `(inputs, targets)` batches."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    answers = torch.zeros((), dtype=torch.long, device=device)
    for inputs, targets in batches:
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast():
            logits = model(inputs).logits
        logits = logits.float()
        loss_sum += F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        batch_correct, batch_answers = answer_counts(logits, targets)
        correct += batch_correct
        answers += batch_answers
    model.train(was_training)
    count = max(int(answers), 1)  # the one host sync
    return {"val_loss": float(loss_sum) / count, "val_accuracy": int(correct) / count}

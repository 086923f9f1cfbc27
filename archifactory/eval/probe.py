"""Accuracy on answer positions: the score of the synthetic probes (MQAR, MAD).

A probe marks its answer positions by giving every other position the target -100. Accuracy is the
fraction of answer positions whose argmax prediction equals the target (micro-averaged over every answer
of every example, as Zoology reports it); positions marked -100 never count, so a model that is right at
the answers and wrong everywhere else scores 1.0. The loss reported next to it is the mean cross-entropy
over the same answer positions.

    from archifactory.eval.probe import probe_metrics
    probe_metrics(model, data.val_batches(64), device)   # {"val_loss": …, "val_accuracy": …}

`archifactory eval accuracy run=…` (`run_accuracy`) scores a run's checkpoint on its probe's fixed
validation set, regenerated from the run's config and seed: the same examples its `val_accuracy` used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError

if TYPE_CHECKING:
    from archifactory.eval.job import EvalJob, TaskResult

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
) -> dict[str, float | None]:
    """`val_loss` (nats, answer positions) and `val_accuracy` over fixed `(inputs, targets)` batches; both
    None when there is no answer position at all (nothing measured, never 0.0)."""
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
    count = int(answers)  # the one host sync
    if count == 0:
        return {"val_loss": None, "val_accuracy": None}
    return {"val_loss": float(loss_sum) / count, "val_accuracy": int(correct) / count}


def run_accuracy(job: EvalJob) -> list[TaskResult]:
    """`archifactory eval accuracy`: the eval runner (`archifactory.eval.cli.RUNNERS`) for probe runs."""
    from archifactory.data.synthetic import SyntheticData
    from archifactory.eval.job import TaskResult

    cfg = job.run.config
    if cfg.dataset.get("source") != "synthetic":
        raise ArchiFactoryError(
            f"accuracy scores synthetic probes (dataset=mqar|mad); run {job.run.name} was trained on "
            f"{cfg.dataset.name}: use perplexity"
        )
    data = SyntheticData(cfg.dataset, seq_len=int(cfg.trainer.seq_len), seed=int(cfg.seed))
    batches = data.val_batches(job.options.batch_size)
    figures = probe_metrics(job.run.model, batches, job.device, job.autocast)
    job.run.model.eval()
    examples = len(data.val_inputs)
    details = {"dataset": cfg.dataset.name, "task": data.spec.task, "examples": examples, **figures}
    extra = {"loss": figures["val_loss"], "examples": examples, "dataset": cfg.dataset.name}
    return [TaskResult("accuracy", "acc", figures["val_accuracy"], None, details, extra)]

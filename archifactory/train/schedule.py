"""Learning-rate schedules and the token-budget recipe, all counted in optimizer steps.

The seed counted its cosine horizon in samples, so with gradient accumulation the schedule never reached
its floor. Here every quantity is an *optimizer step* (one `optimizer.step()`), and the number of steps is
derived from the token budget by `steps_from_token_budget`; `plan_steps` turns a run's trainer config
(token budget, epochs, max_steps) into the number of optimizer steps and the gradient accumulation.

Schedules (`trainer.schedule`), as a multiplier of each parameter group's base learning rate:

- `cosine`: linear warmup over `warmup_steps`, then a half-cosine from 1.0 down to `min_lr_ratio`, reached
  at step `total_steps` (Loshchilov & Hutter, "SGDR", 2017; the GPT-3 / Chinchilla recipe).
- `wsd`: warmup-stable-decay — linear warmup, constant 1.0, then the final `decay_fraction` of the steps
  decay *linearly* to `min_lr_ratio` (Hu et al., "MiniCPM", 2024; Hägele et al., "Scaling Laws and
  Compute-Optimal Training Beyond Fixed Training Durations", 2024).
- `wsd_sqrt`: the same with the "1 - sqrt" cooldown shape, which Hägele et al. (2024) found slightly better
  than linear.
- `constant`: linear warmup, then 1.0.

Warmup is `(step + 1) / warmup_steps`, so the very first update already moves (LambdaLR evaluates the
multiplier at step 0 for the first `optimizer.step()`), and the peak is reached at `step = warmup_steps - 1`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from archifactory.core.errors import ArchiFactoryError

SCHEDULES = ("cosine", "wsd", "wsd_sqrt", "constant")


def lr_multiplier(
    step: int,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    min_lr_ratio: float,
    decay_fraction: float,
) -> float:
    """The learning-rate multiplier for optimizer step `step` (0-based) of a `total_steps` run.

    Steps past `total_steps` stay at the final value. A warmup longer than the run is allowed (short smoke
    runs with the default warmup): the run then ends inside the warmup.
    """
    if schedule not in SCHEDULES:
        raise ArchiFactoryError(
            f"unknown trainer.schedule={schedule!r}; choose one of {', '.join(SCHEDULES)}"
        )
    if total_steps < 1:
        raise ArchiFactoryError(f"the run has {total_steps} optimizer steps; it needs at least 1")
    if warmup_steps < 0:
        raise ArchiFactoryError(f"trainer.warmup_steps={warmup_steps} must be >= 0")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ArchiFactoryError(f"trainer.min_lr_ratio={min_lr_ratio} must be in [0, 1]")
    if not 0.0 <= decay_fraction <= 1.0:
        raise ArchiFactoryError(f"trainer.decay_fraction={decay_fraction} must be in [0, 1]")

    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # wsd / wsd_sqrt: the decay phase never starts before warmup has ended.
    decay_steps = round(decay_fraction * total_steps)
    decay_start = max(warmup_steps, total_steps - decay_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    shape = progress if schedule == "wsd" else math.sqrt(progress)
    return 1.0 - (1.0 - min_lr_ratio) * shape


@dataclass
class ScheduleFn:
    """A picklable callable for LambdaLR; its fields travel in the scheduler's `state_dict()` (LambdaLR
    saves the `__dict__` of callable objects), so a resumed run keeps the schedule it started with."""

    total_steps: int
    warmup_steps: int
    schedule: str
    min_lr_ratio: float
    decay_fraction: float

    def __call__(self, step: int) -> float:
        return lr_multiplier(
            step, self.total_steps, self.warmup_steps, self.schedule, self.min_lr_ratio, self.decay_fraction
        )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over every parameter group of `optimizer` (each group keeps its own base lr, so Muon's
    matrix lr and AdamW's lr are scaled by the same multiplier). Call `scheduler.step()` once after each
    `optimizer.step()`. `cfg` needs `warmup_steps`, `schedule`, `min_lr_ratio`, `decay_fraction`."""
    fn = ScheduleFn(
        total_steps=int(total_steps),
        warmup_steps=int(cfg.warmup_steps),
        schedule=str(cfg.schedule),
        min_lr_ratio=float(cfg.min_lr_ratio),
        decay_fraction=float(cfg.decay_fraction),
    )
    fn(0)  # validate the options now, with the config's names in the message
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=fn)


def steps_from_token_budget(
    total_tokens: int, batch_tokens: int, micro_batch_size: int, seq_len: int, world_size: int
) -> tuple[int, int]:
    """(optimizer steps, gradient-accumulation steps) for a token budget.

    One optimizer step consumes `batch_tokens` tokens (the global batch) as `accum` micro-batches of
    `micro_batch_size × seq_len` tokens on each of `world_size` ranks. Steps are rounded down, so a run
    never sees more than `total_tokens` tokens.
    """
    for name, value in (
        ("trainer.total_tokens", total_tokens),
        ("trainer.batch_tokens", batch_tokens),
        ("trainer.micro_batch_size", micro_batch_size),
        ("trainer.seq_len", seq_len),
        ("world_size", world_size),
    ):
        if int(value) < 1:
            raise ArchiFactoryError(f"{name}={value} must be a positive integer")
    micro_tokens = micro_batch_size * seq_len * world_size
    if batch_tokens % micro_tokens != 0:
        lower = max(micro_tokens, batch_tokens // micro_tokens * micro_tokens)
        raise ArchiFactoryError(
            f"trainer.batch_tokens={batch_tokens} is not a multiple of micro_batch_size × seq_len × "
            f"world_size = {micro_batch_size} × {seq_len} × {world_size} = {micro_tokens}; "
            f"try trainer.batch_tokens={lower} or {lower + micro_tokens}"
        )
    if total_tokens < batch_tokens:
        raise ArchiFactoryError(
            f"trainer.total_tokens={total_tokens} is smaller than one global batch "
            f"(trainer.batch_tokens={batch_tokens}); the run would take no optimizer step"
        )
    return total_tokens // batch_tokens, batch_tokens // micro_tokens


def plan_steps(cfg: Any, world_size: int, examples_per_epoch: int | None = None) -> tuple[int, int]:
    """(optimizer steps, gradient-accumulation steps) from the token budget, `trainer.epochs` over
    `examples_per_epoch` rows (chat data) and/or max_steps: the smallest wins."""
    trainer = cfg.trainer
    accum = trainer.grad_accum_steps
    steps = trainer.max_steps
    if trainer.batch_tokens is not None:
        budget = (
            trainer.total_tokens
            if trainer.total_tokens is not None
            else trainer.batch_tokens * trainer.max_steps
        )
        budget_steps, accum = steps_from_token_budget(
            budget, trainer.batch_tokens, trainer.micro_batch_size, trainer.seq_len, world_size
        )
        steps = min(steps, budget_steps)
    elif trainer.total_tokens is not None:
        tokens_per_step = trainer.micro_batch_size * trainer.seq_len * accum * world_size
        steps = min(steps, max(1, trainer.total_tokens // tokens_per_step))
    if trainer.epochs is not None and examples_per_epoch is not None:
        rows_per_step = trainer.micro_batch_size * accum * world_size
        steps = min(steps, max(1, math.ceil(trainer.epochs * examples_per_epoch / rows_per_step)))
    return steps, accum

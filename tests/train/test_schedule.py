"""Learning-rate schedules (counted in optimizer steps) and the token-budget recipe."""

from __future__ import annotations

import math

import pytest
import torch

from archifactory.config.schema import TrainerConfig
from archifactory.core.errors import ArchiFactoryError
from archifactory.train.schedule import build_scheduler, lr_multiplier, steps_from_token_budget


def mult(
    step: int, schedule: str, total: int = 1000, warmup: int = 100, min_ratio: float = 0.1, decay: float = 0.2
):
    return lr_multiplier(step, total, warmup, schedule, min_ratio, decay)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "wsd_sqrt", "constant"])
def test_warmup_is_linear_and_ends_at_peak(schedule: str) -> None:
    assert mult(0, schedule) == pytest.approx(1 / 100)
    assert mult(49, schedule) == pytest.approx(0.5)
    assert mult(99, schedule) == pytest.approx(1.0)  # last warmup step
    assert mult(100, schedule) == pytest.approx(1.0)  # first step after warmup


def test_cosine_mid_and_end() -> None:
    # Halfway through the decay span (100..1000) the cosine is at the midpoint of [min, 1].
    assert mult(550, "cosine") == pytest.approx(0.1 + 0.9 * 0.5)
    # A quarter of the way: 0.5 * (1 + cos(pi/4)).
    assert mult(325, "cosine") == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert mult(1000, "cosine") == pytest.approx(0.1)
    assert mult(5000, "cosine") == pytest.approx(0.1)  # clamped past the horizon
    values = [mult(s, "cosine") for s in range(100, 1001)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay


def test_wsd_stable_then_linear_decay() -> None:
    # decay_fraction=0.2 of 1000 steps: stable until step 800, then linear to min at step 1000.
    assert mult(500, "wsd") == 1.0
    assert mult(799, "wsd") == 1.0
    assert mult(800, "wsd") == pytest.approx(1.0)
    assert mult(900, "wsd") == pytest.approx(1.0 - 0.9 * 0.5)
    assert mult(1000, "wsd") == pytest.approx(0.1)


def test_wsd_sqrt_cooldown_shape() -> None:
    assert mult(500, "wsd_sqrt") == 1.0
    assert mult(900, "wsd_sqrt") == pytest.approx(1.0 - 0.9 * math.sqrt(0.5))
    assert mult(1000, "wsd_sqrt") == pytest.approx(0.1)


def test_constant_after_warmup() -> None:
    assert mult(500, "constant") == 1.0
    assert mult(1000, "constant") == 1.0


def test_no_warmup_starts_at_peak() -> None:
    assert mult(0, "cosine", warmup=0) == pytest.approx(1.0)
    assert mult(0, "wsd", warmup=0) == pytest.approx(1.0)


def test_warmup_longer_than_run_stays_in_warmup() -> None:
    # A short smoke run with the default warmup: no division by zero, the lr just ramps.
    assert mult(4, "cosine", total=5, warmup=100) == pytest.approx(5 / 100)


def test_wsd_decay_never_overlaps_warmup() -> None:
    # decay_fraction=1.0 with warmup: the decay starts when the warmup ends.
    assert mult(99, "wsd", decay=1.0) == pytest.approx(1.0)
    assert mult(100, "wsd", decay=1.0) == pytest.approx(1.0)
    assert mult(550, "wsd", decay=1.0) == pytest.approx(1.0 - 0.9 * 0.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"schedule": "linear"}, "unknown trainer.schedule"),
        ({"min_ratio": 1.5}, "min_lr_ratio"),
        ({"decay": -0.1}, "decay_fraction"),
        ({"warmup": -1}, "warmup_steps"),
        ({"total": 0}, "at least 1"),
    ],
)
def test_bad_options_raise(kwargs: dict, match: str) -> None:
    args = {"schedule": "cosine", **kwargs}
    with pytest.raises(ArchiFactoryError, match=match):
        mult(10, **args)


def test_scheduler_counts_optimizer_steps_and_scales_every_group() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.1}], lr=1.0)
    cfg = TrainerConfig(schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    sched = build_scheduler(opt, cfg, total_steps=10)
    seen = []
    for _ in range(12):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for step, (lr_a, lr_b) in enumerate(seen):
        expected = lr_multiplier(step, 10, 2, "cosine", 0.1, 0.2)
        assert lr_a == pytest.approx(expected)
        assert lr_b == pytest.approx(0.1 * expected)
    assert seen[10][0] == pytest.approx(0.1)  # the floor is reached at total_steps


def test_scheduler_state_dict_round_trip() -> None:
    def make():
        p = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([p], lr=0.5)
        return opt, build_scheduler(
            opt, TrainerConfig(schedule="wsd", warmup_steps=3, decay_fraction=0.5), 20
        )

    opt, sched = make()
    for _ in range(7):
        opt.step()
        sched.step()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    reference = []
    for _ in range(10):
        opt.step()
        sched.step()
        reference.append(opt.param_groups[0]["lr"])

    opt2, sched2 = make()
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    resumed = []
    for _ in range(10):
        opt2.step()
        sched2.step()
        resumed.append(opt2.param_groups[0]["lr"])
    assert resumed == reference


def test_bad_schedule_name_fails_when_building() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ArchiFactoryError, match="trainer.schedule='cosin'"):
        build_scheduler(opt, TrainerConfig(schedule="cosin"), 10)


def test_steps_from_token_budget() -> None:
    # 0.5M-token global batch from 8 × 1024-token micro-batches on 2 ranks: 32 accumulation steps.
    steps, accum = steps_from_token_budget(
        total_tokens=1_000_000_000, batch_tokens=524_288, micro_batch_size=8, seq_len=1024, world_size=2
    )
    assert accum == 32
    assert steps == 1_000_000_000 // 524_288 == 1907
    assert steps * accum * 8 * 1024 * 2 <= 1_000_000_000  # never past the budget
    assert steps_from_token_budget(4096, 4096, 4, 256, 1) == (1, 4)


def test_token_budget_not_a_multiple_names_the_fix() -> None:
    with pytest.raises(
        ArchiFactoryError,
        match=r"batch_tokens=5000 is not a multiple .* = 1024; try trainer.batch_tokens=4096",
    ):
        steps_from_token_budget(1_000_000, 5000, 4, 256, 1)


def test_token_budget_smaller_than_a_batch() -> None:
    with pytest.raises(ArchiFactoryError, match="smaller than one global batch"):
        steps_from_token_budget(1000, 4096, 4, 256, 1)
    with pytest.raises(ArchiFactoryError, match="micro_batch_size=0"):
        steps_from_token_budget(1000, 4096, 0, 256, 1)

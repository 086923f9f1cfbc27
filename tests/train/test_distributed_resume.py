"""Checkpoints resume under another strategy and world size that keep the global batch (README, Distributed).

A run checkpointed by two FSDP2 (or DDP) processes continues in one process with gradient accumulation,
and a single-process checkpoint continues under torchrun, both on the loss trajectory of an uninterrupted
single-process run. The schedule is constant after warmup so that the short first leg (max_steps=4) has
the same learning rates as the long reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from archifactory.train.loop import train
from tests.helpers import compose_config
from tests.train.test_distributed import COMMON, losses, torchrun
from tests.train.test_loop import write_corpus

# the global batch as tokens (4 windows x 64): accumulation 2 in one process, 1 under two ranks; the
# saved config then differs only in trainer.strategy, which a resume may change
RECIPE = [
    *COMMON,
    "trainer.schedule=constant",
    "trainer.warmup_steps=2",
    "trainer.checkpoint_every=4",
    "trainer.batch_tokens=256",
]


def steps_and_losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["train_loss"] for m in lines if "train_loss" in m}


@pytest.mark.slow
@pytest.mark.parametrize("first,then", [("fsdp", "single"), ("single", "ddp")])
def test_resume_under_another_strategy_and_world_size(first: str, then: str, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    data = [f"dataset.path={corpus}", f"dataset.cache_dir={tmp_path / 'cache'}"]
    reference = tmp_path / "reference"
    train(compose_config([*RECIPE, *data]), reference)  # 8 steps, 1 process

    run_dir = tmp_path / "run"

    def leg(strategy: str, *extra: str) -> None:
        if strategy == "single":
            train(compose_config([*RECIPE, *data, *extra]), run_dir)
            return
        result = torchrun(
            [*RECIPE, *data, f"trainer.strategy={strategy}", f"hydra.run.dir={run_dir}", *extra], tmp_path
        )
        assert result.returncode == 0, result.stderr[-3000:]

    leg(first, "trainer.max_steps=4")
    assert (run_dir / "checkpoints" / "step_0000004").is_dir()
    leg(then, "trainer.resume=true")

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 8
    expected, got = steps_and_losses(reference), steps_and_losses(run_dir)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert abs(got[step] - expected[step]) < 2e-4, (step, got, expected)
    a = load_file(str(reference / "checkpoints/step_0000008/model.safetensors"))
    b = load_file(str(run_dir / "checkpoints/step_0000008/model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-4)
    assert losses(run_dir)[-1] == pytest.approx(expected[8], abs=2e-4)

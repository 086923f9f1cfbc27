"""torchrun on CPU (gloo): DDP and FSDP2 follow the single-process loss trajectory at the same global batch.

The corpus holds 30 training windows: the 8th step of 4 windows runs from the first epoch into the second,
where one process's micro-batches of 2 and two ranks' batches of 2 must take the same windows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from archifactory.train.loop import train
from tests.helpers import compose_config
from tests.train.test_loop import write_corpus

COMMON = [
    "dataset=text",
    "dataset.vocab_size=512",
    "model=tiny",
    "model.hidden_size=64",
    "model.num_layers=2",
    "trainer=smoke",
    "trainer.max_steps=8",
    "trainer.log_every=1",
    "trainer.eval_every=8",
    "trainer.checkpoint_every=8",
    "trainer.micro_batch_size=2",
    "trainer.lr=1e-2",
]


def losses(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m["train_loss"] for m in lines if "train_loss" in m]


def torchrun(overrides: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    torchrun_bin = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    command = [torchrun_bin, "--standalone", "--nproc_per_node=2", "-m", "archifactory", "train", *overrides]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "extra"), [("ddp", []), ("fsdp", []), ("fsdp", ["model.weights=hyper"])]
)  # model.weights=hyper: the blocks share block 0's weights, so FSDP shards the root unit alone
def test_two_process_run_matches_single_process(strategy: str, extra: list[str], tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", documents=100)
    data = [f"dataset.path={corpus}", f"dataset.cache_dir={tmp_path / 'cache'}", *extra]
    single_dir = tmp_path / "single"
    train(compose_config([*COMMON, *data, "trainer.grad_accum_steps=2"]), single_dir)

    result = torchrun(
        [*COMMON, *data, f"trainer.strategy={strategy}", f"hydra.run.dir={tmp_path / 'dist'}"], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "dist" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["tokens_seen"] == 8 * 2 * 2 * 64
    single, dist = losses(single_dir), losses(tmp_path / "dist")
    assert len(single) == len(dist) == 8
    for a, b in zip(single, dist):
        assert abs(a - b) < 2e-4, (single, dist)
    assert (tmp_path / "dist" / "checkpoints" / "step_0000008" / "model.safetensors").is_file()

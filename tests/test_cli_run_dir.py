"""The run directory a user gets from the command line: default name, `.hydra/`, `archifactory.log`, and
a SIGTERM that checkpoints and leaves `status: interrupted` with the step it stopped at."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.cli_helpers import run_cli
from tests.test_cli import ENV
from tests.train.test_loop import write_corpus


@pytest.fixture(scope="module")
def corpus_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("cli_run_dir")
    return [
        "dataset=text",
        f"dataset.path={write_corpus(root / 'corpus')}",
        f"dataset.cache_dir={root / 'cache'}",
        "dataset.vocab_size=512",
        "model=tiny",
        "model.hidden_size=64",
        "model.num_layers=2",
        "trainer=smoke",
    ]


def test_default_run_dir_holds_config_overrides_log_and_metrics(
    corpus_args: list[str], tmp_path: Path
) -> None:
    args = [*corpus_args, "trainer.max_steps=4", "trainer.eval_every=4", "trainer.log_every=2"]
    result = run_cli("train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    # <mixin>_<ffn>_<positional>_<model>_<dataset>-<digest of the dataset identity>_s<seed>
    (run_dir,) = (tmp_path / "outputs").glob("gqa_swiglu_rope_tiny_text-??????_s0")
    assert yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) == args
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert config["trainer"]["max_steps"] == 4 and config["mixin"]["name"] == "gqa"
    log = (run_dir / "archifactory.log").read_text()
    assert "plan: 4 optimizer steps" in log and "checkpoint:" in log
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in logged] == [2, 4]
    for key in ("tokens_seen", "lr", "grad_norm", "tokens_per_second", "mfu", "nonfinite_skipped"):
        assert all(key in r for r in logged), key
    assert [r["step"] for r in records if "val_bpb" in r] == [4]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_sigterm_checkpoints_and_the_summary_says_interrupted(corpus_args: list[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "archifactory", "train", *corpus_args, "trainer.max_steps=100000",
        "trainer.checkpoint_every=100000", "trainer.eval_every=100000", "trainer.log_every=1",
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 300
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130
    assert stderr.decode().strip().splitlines()[-1].startswith("interrupted: stopped by SIGTERM at step")
    summary = json.loads((run_dir / "summary.json").read_text())
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert summary["status"] == "interrupted" and len(checkpoints) == 1
    assert checkpoints[0] == f"step_{summary['steps']:07d}" and summary["steps"] >= 3
    assert summary["tokens_seen"] == summary["steps"] * 4 * 64

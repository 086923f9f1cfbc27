"""The `archifactory` command as a user runs it: list, compose errors, multirun, SIGKILL + resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from archifactory.config.compose import GROUPS, group_options
from tests.cli_helpers import run_cli
from tests.train.test_loop import write_corpus

ENV = os.environ | {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "OMP_NUM_THREADS": "1",
}


def cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m archifactory *args` in a subprocess (process behaviour: kills, launchers, start-up)."""
    return subprocess.run(
        [sys.executable, "-m", "archifactory", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def corpus_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(root / "corpus")
    return [
        "dataset=text",
        f"dataset.path={corpus}",
        f"dataset.cache_dir={root / 'cache'}",
        "dataset.vocab_size=512",
        "model=tiny",
        "model.hidden_size=64",
        "model.num_layers=2",
        "trainer=smoke",
    ]


def test_list_shows_every_group_and_option(tmp_path: Path) -> None:
    result = cli("list", cwd=tmp_path)
    assert result.returncode == 0
    for group in GROUPS:
        assert f"{group}:" in result.stdout
        for option, description in group_options(group).items():
            assert description, f"configs/{group}/{option}.yaml needs a description comment"
            assert f"{group}={option}" in result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["mixin=nope"], "unknown mixin 'nope'"),
        (["mixin.nonexistent_option=1"], "mixin.nonexistent_option"),  # an unknown key
        (["trainer.lr=fast"], "trainer.lr"),  # a wrong type
        (["-m", "trainer.lr=fast,1"], "trainer.lr"),  # inside a sweep
    ],
)
def test_compose_errors_are_short_and_fail(args: list[str], message: str, tmp_path: Path) -> None:
    """The README: an unknown key or a wrong type fails "with one line naming the key"."""
    result = run_cli("train", *args, cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("summary.json"))


def test_unknown_mixin_is_one_line(tmp_path: Path) -> None:
    result = run_cli("train", "mixin=nope", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0


def test_bad_input_errors_are_one_line(corpus_args: list[str], tmp_path: Path) -> None:
    bad_heads = run_cli("train", *corpus_args, "model.hidden_size=100", "model.num_heads=3", cwd=tmp_path)
    assert bad_heads.returncode == 1
    assert (
        bad_heads.stderr.strip().splitlines()[-1].startswith("error: model.hidden_size=100 is not divisible")
    )
    missing = run_cli(
        "train", "dataset=text", f"dataset.path={tmp_path / 'nowhere'}", "trainer=smoke", cwd=tmp_path
    )
    assert missing.returncode == 1 and "nowhere" in missing.stderr.strip().splitlines()[-1]
    for summary in (tmp_path / "outputs").rglob("summary.json"):
        assert json.loads(summary.read_text())["status"] == "failed"


def test_default_train_offline_stops_fast_with_an_offline_alternative(tmp_path: Path) -> None:
    start = time.perf_counter()
    result = run_cli("train", "trainer=smoke", cwd=tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "dataset=text" in last
    assert time.perf_counter() - start < 60


def test_cfg_job_prints_the_composed_config(tmp_path: Path) -> None:
    result = run_cli("train", "mixin=gqa", "mixin.num_kv_heads=2", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0 and "num_kv_heads: 2" in result.stdout


@pytest.mark.slow
def test_multirun_makes_one_run_dir_per_variant(corpus_args: list[str], tmp_path: Path) -> None:
    result = run_cli(
        "train",
        "-m",
        "positional=rope,alibi",
        *corpus_args,
        "trainer.max_steps=2",
        "trainer.eval_every=2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summaries = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/summary.json"))]
    assert [s["positional"] for s in summaries] == ["rope", "alibi"]
    assert all(s["status"] == "completed" for s in summaries)


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(corpus_args: list[str], tmp_path: Path) -> None:
    run = [
        *corpus_args,
        "trainer.max_steps=60",
        "trainer.checkpoint_every=5",
        "trainer.eval_every=30",
        "trainer.log_every=5",
    ]
    # the uninterrupted and the resumed run in this process; the one killed with SIGKILL is a subprocess
    full = run_cli("train", *run, f"hydra.run.dir={tmp_path / 'full'}", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]

    killed_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "archifactory", "train", *run, f"hydra.run.dir={killed_dir}"]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (killed_dir / "checkpoints" / "step_0000010").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (
        json.loads((killed_dir / "summary.json").read_text())["status"] == "running"
    )  # killed: never completed

    resumed = run_cli("train", *run, f"hydra.run.dir={killed_dir}", "trainer.resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(tmp_path / "full/checkpoints/step_0000060/model.safetensors"))
    b = load_file(str(killed_dir / "checkpoints/step_0000060/model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)
    curve = lambda d: [
        (m["step"], m.get("train_loss"))
        for m in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
    ]  # noqa: E731
    assert [s for s, _ in curve(killed_dir)] == [s for s, _ in curve(tmp_path / "full")]
    for (_, la), (_, lb) in zip(curve(tmp_path / "full"), curve(killed_dir)):
        assert (la is None and lb is None) or abs(la - lb) < 1e-5


@pytest.fixture(scope="module")
def ten_steps(corpus_args: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 10-step run, trained once; each refusal test resumes a copy of it."""
    run_dir = tmp_path_factory.mktemp("ten_steps") / "run"
    first = run_cli(
        "train", *corpus_args, "trainer.max_steps=10", f"hydra.run.dir={run_dir}", cwd=run_dir.parent
    )
    assert first.returncode == 0, first.stderr[-2000:]
    return run_dir


def test_truncated_checkpoint_is_refused(corpus_args: list[str], ten_steps: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(ten_steps, run_dir)
    weights = run_dir / "checkpoints" / "step_0000010" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    again = run_cli(
        "train",
        *corpus_args,
        "trainer.max_steps=20",
        f"hydra.run.dir={run_dir}",
        "trainer.resume=true",
        cwd=tmp_path,
    )
    assert again.returncode == 1
    assert "corrupt" in again.stderr.strip().splitlines()[-1]


def test_other_architecture_checkpoint_is_refused(
    corpus_args: list[str], ten_steps: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(ten_steps, run_dir)
    other = run_cli(
        "train",
        *corpus_args,
        "ffn=mlp",
        "trainer.max_steps=20",
        f"hydra.run.dir={run_dir}",
        "trainer.resume=true",
        cwd=tmp_path,
    )
    assert other.returncode == 1 and "another architecture" in other.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_submitit_sweep_runs_each_variant_as_a_job(corpus_args: list[str], tmp_path: Path) -> None:
    """`hydra/launcher=local_jobs` goes through the same submitit pickling path as `hydra/launcher=slurm`."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    result = cli(
        "train",
        "-m",
        "hydra/launcher=local_jobs",
        "positional=rope,alibi",
        *corpus_args,
        "trainer.max_steps=2",
        "trainer.eval_every=2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "sweep").rglob("summary.json")]
    assert sorted(s["positional"] for s in summaries) == ["alibi", "rope"]
    assert all(s["status"] == "completed" for s in summaries)


def test_slurm_launcher_config_composes(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    result = run_cli(
        "train", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "submitit_launcher.SlurmLauncher" in result.stdout and "partition: gpu" in result.stdout

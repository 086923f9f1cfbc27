"""`archifactory grpo` end to end, offline, on tiny CPU-pretrained + SFT runs (gqa and gated_deltanet): the
run-directory contract, exact resume after kill -9, the report's reward column, and one-line refusals."""

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

from archifactory.runs.load import load_run
from tests.cli_helpers import run_cli
from tests.grpo.helpers import pretrain_and_sft

pytestmark = pytest.mark.slow  # end to end: a pretrain + SFT fixture, GRPO runs, a SIGKILL and resume

ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
SMALL = ["dataset=arith", "grpo.num_generations=4", "grpo.prompts_per_step=2", "grpo.max_completion_length=6",
         "trainer.lr=1e-3", "trainer.num_threads=1"]  # fmt: skip


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("grpo")
    return {mixin: pretrain_and_sft(root, mixin) for mixin in ("gqa", "gated_deltanet")}


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m archifactory *args` in a subprocess: the real command line."""
    return subprocess.run([sys.executable, "-m", "archifactory", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "mixin,extra",
    [("gqa", []), ("gated_deltanet", ["grpo.beta=0.1", "grpo.num_iterations=2", "grpo=dapo"])],
)
def test_grpo_runs_end_to_end(
    mixin: str, extra: list[str], sft_runs: dict[str, Path], tmp_path: Path
) -> None:
    result = run_cli(
        "grpo", f"init_from={sft_runs[mixin]}", *SMALL, *extra, "trainer.max_steps=3", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tmp_path / "outputs" / f"sft_{mixin}-grpo-arith"
    assert result.stdout.strip().splitlines()[-1].startswith(f"done: {run_dir}: completed, 3 steps")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3 and summary["mixin"] == mixin
    assert summary["chat_template"] is True and 0 <= summary["reward"] <= 1
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("reward", "reward_std", "reward/answer", "zero_spread_fraction", "completion_length",
                "clip_fraction", "kl", "entropy", "rollout_tokens_per_second", "update_tokens_per_second"):  # fmt: skip
        assert key in records[-1], key
    assert (records[-1]["kl"] is not None) == ("grpo.beta=0.1" in extra)
    run = load_run(run_dir)  # a loadable run: its own tokenizer, config and checkpoint
    assert run.step == 3 and run.tokenizer.vocab_size == load_run(sft_runs[mixin]).tokenizer.vocab_size
    report = run_cli("report", str(run_dir), cwd=tmp_path)
    assert report.returncode == 0 and "| reward " in report.stdout, report.stderr[-1500:]


def test_kill_9_then_resume_matches_uninterrupted(sft_runs: dict[str, Path], tmp_path: Path) -> None:
    run = [
        "grpo",
        f"init_from={sft_runs['gqa']}",
        *SMALL,
        "trainer.max_steps=30",
        "trainer.checkpoint_every=3",
    ]
    # the uninterrupted and the resumed run in this process; the one killed with SIGKILL is a subprocess
    full = run_cli(*run, "run_name=full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = tmp_path / "outputs" / "killed"
    process = subprocess.Popen([sys.executable, "-m", "archifactory", *run, "run_name=killed"], cwd=tmp_path,
                               env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_0000003").exists() and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert json.loads((killed / "summary.json").read_text())["status"] == "running"  # killed, never completed
    resumed = run_cli(*run, "run_name=killed", "trainer.resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    first = load_file(str(tmp_path / "outputs/full/checkpoints/step_0000030/model.safetensors"))
    second = load_file(str(killed / "checkpoints/step_0000030/model.safetensors"))
    for name, tensor in first.items():
        torch.testing.assert_close(second[name], tensor, rtol=0, atol=1e-6)
    ours, theirs = metrics(killed), metrics(tmp_path / "outputs" / "full")
    assert [r["step"] for r in ours] == list(range(1, 31))
    assert [r["reward/answer"] for r in ours] == [r["reward/answer"] for r in theirs]
    assert [r["completion_length"] for r in ours] == [r["completion_length"] for r in theirs]


def _refusal(code: int | str | None, stderr: str, message: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code not in (0, None) and len(lines) == 1 and lines[0].startswith("error:"), stderr[-1500:]
    assert message in lines[0], lines[0]


def _in_process(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int | str | None, str]:
    """`archifactory <args>` in this process (a subprocess per refusal costs seconds of imports)."""
    from archifactory.cli.main import main

    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as stop:  # the Hydra app's one-line refusal exits 1
        code = stop.code
    return code, capsys.readouterr().err


def test_bad_input_is_one_line_and_writes_nothing(
    sft_runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    gqa = sft_runs["gqa"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the Hydra app rewrites it
    no_answers = tmp_path / "q.jsonl"
    no_answers.write_text(json.dumps({"prompt": "What is 1+1?"}) + "\n")
    no_tokenizer = tmp_path / "copy"
    shutil.copytree(gqa, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer"))
    result = cli(
        "grpo", f"init_from={gqa}", "dataset=arith", "grpo.reward_funcs=[answer,acuracy]", cwd=tmp_path
    )
    _refusal(result.returncode, result.stderr, "unknown reward 'acuracy'")  # the real command line, once
    cases = [
        (
            [f"init_from={gqa}", "dataset=rl_jsonl", f"dataset.path={no_answers}"],
            "no 'answer'; GRPO needs an answer",
        ),
        ([f"init_from={no_tokenizer}", "dataset=arith", "run_name=nt"], "has no tokenizer/ folder"),
        (
            [f"init_from={gqa}", "dataset=arith", "grpo.max_completion_length=500"],
            "beyond the model's context",
        ),
        ([f"init_from={gqa}", "dataset=text"], "no answers to reward"),
        ([f"init_from={gqa}", "dataset=arith", "mixin=rwkv6"], "architecture from the init run"),
    ]
    for args, message in cases:
        _refusal(*_in_process(["grpo", *args], capsys), message)
    assert not any((tmp_path / "outputs").glob("*"))  # no refused run left a run directory behind

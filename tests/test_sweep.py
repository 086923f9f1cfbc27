"""Sweeps as a user runs them: every combination gets a run dir, a failed job is recorded and does not stop
the sweep, and `archifactory report` on the sweep dir shows exactly the numbers of the runs' summaries."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from tests.cli_helpers import run_cli
from tests.test_cli import corpus_args  # noqa: F401  (the module-scoped corpus fixture)

pytestmark = pytest.mark.slow


def summaries(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))}


def check_report(sweep: Path, tmp_path: Path, expected_variants: dict[str, list[dict]]) -> None:
    result = run_cli("report", str(sweep), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {row["variant"]: row for row in csv.DictReader((sweep / "report.csv").open())}
    assert set(rows) == set(expected_variants)
    for label, runs in expected_variants.items():
        done = [s for s in runs if s["status"] == "completed"]
        row = rows[label]
        assert int(row["n"]) == len(done) and int(row["failed"]) == len(runs) - len(done)
        if done:
            losses = [s["val_loss"] for s in done]
            assert float(row["val_loss_mean"]) == pytest.approx(statistics.fmean(losses), rel=1e-12)
            assert float(row["val_loss_std"]) == pytest.approx(statistics.stdev(losses), rel=1e-12)
            assert float(row["params_total"]) == done[0]["params_total"]
            assert float(row["tokens_seen"]) == done[0]["tokens_seen"]
        else:
            assert row["val_loss_mean"] == ""
        assert label in result.stdout
    for name in ("report.md", "val_loss_vs_tokens.png", "val_loss_vs_time.png", "val_loss_vs_flops.png"):
        assert (sweep / name).is_file()


def test_sweep_survives_a_failed_job_and_reports(tmp_path: Path, corpus_args: list[str]) -> None:  # noqa: F811
    # hidden 66 is not a multiple of the 4 heads: those two jobs fail, the others still run
    sweep = tmp_path / "sweep"
    base = [a for a in corpus_args if not a.startswith("model.hidden_size=")]
    args = [*base, "trainer.max_steps=6", "trainer.eval_every=3", f"hydra.sweep.dir={sweep}"]
    result = run_cli("train", "-m", "model.hidden_size=32,66,64", "seed=0,1", *args, cwd=tmp_path)
    assert result.returncode == 1
    assert "error: 2 sweep job(s) failed" in result.stderr
    assert "Traceback" not in result.stderr
    runs = summaries(sweep)
    assert len(runs) == 6
    by_hidden: dict[int, list[dict]] = {32: [], 64: [], 66: []}
    for name, summary in runs.items():
        overrides = (sweep / name / ".hydra" / "overrides.yaml").read_text()
        hidden = next(h for h in by_hidden if f"model.hidden_size={h}" in overrides)
        by_hidden[hidden].append(summary)
    assert [s["status"] for s in by_hidden[66]] == ["failed", "failed"]
    assert all("not divisible" in s["error"] for s in by_hidden[66])
    assert [s["status"] for s in by_hidden[32] + by_hidden[64]] == ["completed"] * 4
    # same seed, same data order and init: the two widths differ, the seeds of one width differ
    assert by_hidden[32][0]["seed"] == by_hidden[64][0]["seed"] == 0
    check_report(sweep, tmp_path, {f"model.hidden_size={h}": by_hidden[h] for h in (32, 64, 66)})


def test_parallel_launcher_runs_jobs_side_by_side(tmp_path: Path, corpus_args: list[str]) -> None:  # noqa: F811
    sweep = tmp_path / "sweep"
    args = [*corpus_args, "trainer.max_steps=4", "trainer.eval_every=2", f"hydra.sweep.dir={sweep}"]
    result = run_cli(
        "train", "-m", "hydra/launcher=parallel", "hydra.launcher.jobs=2", "model.target_params=100k,1",
        "mixin=rnn", *args, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Launching 2 jobs, 2 at a time" in result.stdout + result.stderr
    runs = summaries(sweep)
    assert len(runs) == 2
    failed = {n: s for n, s in runs.items() if s["status"] == "failed"}
    # a target of 1 parameter cannot be matched: the job fails before training and is still recorded
    assert len(failed) == 1 and all("model.target_params=1" in s["error"] for s in failed.values())
    for name, summary in runs.items():
        assert (sweep / name / "launcher.log").read_text().startswith(sys_executable_prefix())
        if summary["status"] == "completed":
            assert summary["params_match"]["error"] == pytest.approx(0, abs=0.02)
            assert summary["target_params"] == 100000


def sys_executable_prefix() -> str:
    import sys

    return sys.executable

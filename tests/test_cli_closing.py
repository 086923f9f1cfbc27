"""Every verb that runs a job ends with one closing `done:` line (issue #30, item 9): train and sft on
stdout after all the log lines (where the run is, how it ended, steps, val_loss, wall time); generate and
export on stderr, so that their stdout stays the text / the folder alone; report after its
files, on stdout; eval's closing summary is its results table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.cli_helpers import run_cli
from tests.train.test_loop import write_corpus


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("closing")
    corpus = write_corpus(root / "corpus")
    run_dir = root / "run"
    args = [
        "dataset=text",
        f"dataset.path={corpus}",
        f"dataset.cache_dir={root / 'cache'}",
        "dataset.vocab_size=300",
        "model.hidden_size=32",
        "model.num_layers=1",
        "trainer=smoke",
        "trainer.max_steps=3",
        f"hydra.run.dir={run_dir}",
    ]
    result = run_cli("train", *args, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir, result.stdout


def test_train_ends_with_the_run_summary_line(trained: tuple[Path, str]) -> None:
    run_dir, stdout = trained
    last = stdout.strip().splitlines()[-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    match = re.fullmatch(
        rf"done: {re.escape(str(run_dir))}: completed, 3 steps, val_loss (\S+), (\S+)s", last
    )
    assert match, last
    assert float(match[1]) == pytest.approx(summary["val_loss"], abs=1e-4)
    assert float(match[2]) == pytest.approx(summary["wall_seconds"], abs=0.1)


def test_generate_and_export_close_on_stderr(trained: tuple[Path, str], tmp_path: Path) -> None:
    run_dir, _ = trained
    generated = run_cli(
        "generate", f"run={run_dir}", "prompt=Once", "max_new_tokens=5", "num_samples=2", cwd=tmp_path
    )
    assert generated.returncode == 0, generated.stderr
    assert "done:" not in generated.stdout
    last = generated.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"done: 2 sample\(s\), \d+ new tokens from {re.escape(str(run_dir))} \(step 3\)", last
    )
    out = tmp_path / "hf"
    exported = run_cli("export", f"run={run_dir}", f"out={out}", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.strip() == str(out)
    assert exported.stderr.strip().splitlines()[-1] == f"done: exported {run_dir} to {out}"


def test_report_ends_with_a_done_line(trained: tuple[Path, str]) -> None:
    """report closes on stdout after the files it wrote (eval closes with its results table)."""
    run_dir, _ = trained
    reported = run_cli("report", str(run_dir), cwd=run_dir.parent)
    assert reported.returncode == 0, reported.stderr[-2000:]
    assert reported.stdout.strip().splitlines()[-1] == f"done: report of 1 run(s) in {run_dir}"

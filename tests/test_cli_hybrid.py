"""Hybrid layer patterns from the command line: a Hydra sweep over patterns, one run dir each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli_helpers import run_cli
from tests.test_cli import corpus_args  # noqa: F401  (a fixture)


@pytest.mark.slow
def test_sweep_over_layer_patterns(corpus_args: list[str], tmp_path: Path) -> None:  # noqa: F811
    result = run_cli(
        "train",
        "-m",
        "model.layer_pattern=[gated_deltanet,gqa],[hgrn2]",
        *corpus_args,
        "trainer.max_steps=2",
        "trainer.eval_every=2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summaries = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/summary.json"))]
    assert [s["mixin"] for s in summaries] == ["gated_deltanet+gqa", "hgrn2"]
    assert all(s["status"] == "completed" for s in summaries)
    assert sorted(p.parent.name for p in (tmp_path / "sweep").glob("*/summary.json"))[0].startswith(
        "0_gated_deltanet+gqa_swiglu"
    )


def test_bad_pattern_entry_is_one_line(corpus_args: list[str], tmp_path: Path) -> None:  # noqa: F811
    result = run_cli("train", "model.layer_pattern=[gqa,{name:gqa,bogus:1}]", *corpus_args, cwd=tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "bogus" in lines[0], result.stderr

"""scripts/bench_eval.py at tiny sizes: it runs, and lm-eval's HFLM over a Llama holding our weights scores
every request as our adapter does (the adapter against lm-eval's own reference implementation). No timing
is asserted."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.eval.conftest import write_corpus

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_eval.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_eval", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_runs_and_hflm_agrees_with_the_adapter(bench, tmp_path: Path, capsys) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    rows = bench.main([str(corpus), "--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2",
                       "--vocab", "400", "--seq-len", "128", "--batch", "4", "--questions", "3",
                       "--context-chars", "200", "--rounds", "1", "--markdown"])  # fmt: skip
    assert [r["workload"] for r in rows] == ["mc", "cont"]
    for row in rows:
        assert row["requests"] == 12 and row["ours"] > 0 and row["hflm"] > 0
        assert row["max_delta"] < 1e-3 and row["greedy_agree"] == 1.0
    assert "| mc | 12 |" in capsys.readouterr().out

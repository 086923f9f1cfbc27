"""scripts/bench_mixins.py runs end to end at tiny sizes and picks up every registered mixin (no timings
are asserted: this proves the script works, not how fast anything is)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from archifactory.core.registry import components

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_mixins.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_mixins", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmarks_every_registered_mixin_by_default(bench) -> None:
    names = bench.select_mixins(None)
    assert names[:2] == ["gqa", "gqa/reference"]
    assert sorted(n for n in names if "/" not in n and "+" not in n) == sorted(components("mixin"))
    assert names[-1] == bench.DEFAULT_HYBRID  # plus one hybrid row
    assert bench.select_mixins("mla") == ["gqa", "mla"]  # the baseline is always measured
    assert bench.select_mixins("retnet+gqa") == ["gqa", "retnet+gqa"]
    with pytest.raises(SystemExit):
        bench.select_mixins("retnet+no_such_mixin")
    with pytest.raises(SystemExit):
        bench.select_mixins("no_such_mixin")


def test_tiny_run_prints_a_table(bench, capsys) -> None:
    other = next(name for name in sorted(components("mixin")) if name != "gqa")
    tiny = ["--seq-lens", "32", "--batch", "1", "--steps", "1", "--hidden", "64", "--layers", "1"]
    code = bench.main([*tiny, "--vocab", "128", "--threads", "1", "--mixins", other, "--markdown"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| mixin |") and len(rows) == 3
    for name in ("gqa", other):
        cells = next(r for r in rows if r.startswith(f"| {name} |")).strip("| ").split(" | ")
        tokens_per_s, peak_mb = float(cells[3].replace(",", "")), cells[5]
        assert tokens_per_s > 0 and peak_mb != "-"
    assert next(r for r in rows if r.startswith("| gqa |")).split(" | ")[4] == "1.00"

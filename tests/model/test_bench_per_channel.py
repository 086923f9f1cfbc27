"""`scripts/bench_per_channel.py` runs end to end at tiny sizes, and both paths give the same scores."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_per_channel.py"


def test_bench_per_channel_main_runs_at_tiny_sizes(capsys) -> None:
    spec = importlib.util.spec_from_file_location("bench_per_channel", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--chunks", "3", "--chunk-size", "8", "--width", "4", "--rounds", "1", "--markdown"])
    assert [r["case"] for r in rows] == ["gla / hgrn2", "kda", "rwkv7"]
    assert all(r["pairwise ms"] > 0 and r["sub-chunked ms"] > 0 for r in rows)
    assert all(r["max abs diff"] < 1e-4 for r in rows)
    assert "| kda |" in capsys.readouterr().out

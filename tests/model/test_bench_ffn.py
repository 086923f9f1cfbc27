"""`scripts/bench_ffn.py` runs end to end at tiny sizes and compares equal active parameters."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_ffn.py"


def test_bench_ffn_main_runs_at_tiny_sizes(capsys) -> None:
    spec = importlib.util.spec_from_file_location("bench_ffn", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(
        ["--hidden", "32", "--batch", "1", "--seq", "8", "--steps", "1", "--warmup", "0", "--markdown"]
    )
    assert [(r["ffn"], r["dispatch"]) for r in results] == [
        ("swiglu", "-"), ("moe", "grouped"), ("moe", "batched"), ("moe", "loop"), ("moe", "capacity@1.25"),
        ("moe", "capacity@null"),
    ]  # fmt: skip
    router = 32 * 8
    assert all(r["active_params"] - router == results[0]["active_params"] for r in results[1:])
    assert all(r["step_ms"] > 0 for r in results)
    assert "| moe | grouped |" in capsys.readouterr().out

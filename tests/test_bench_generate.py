"""scripts/bench_generate.py runs end to end at tiny sizes (no timings asserted: this proves the script
works and its state-memory column is right, not how fast anything is)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_generate.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_generate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_prints_a_table_with_growing_and_constant_states(bench, capsys) -> None:
    tiny = ["--contexts", "16,48", "--steps", "2", "--warmup", "1", "--uncached-context", "16"]
    tiny += ["--mixed-prompts", "3", "--mixed-min", "5", "--mixed-new", "2"]
    code = bench.main(
        [*tiny, "--uncached-steps", "1", "--vocab", "64", "--threads", "1", "--mixins", "gqa,lstm"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    rows = {line.split(": ")[0].split(" ")[0]: line for line in out.splitlines()}
    assert set(rows) == {"gqa", "lstm"}
    assert "uncached_speedup=" in rows["gqa"] and "flat=" in rows["lstm"]
    assert "mixed_ratio=" in rows["gqa"]
    code = bench.main(
        [*tiny, "--uncached-steps", "1", "--vocab", "64", "--threads", "1", "--mixins", "rnn", "--markdown"]
    )
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert code == 0 and table[0].startswith("| mixin |") and len(table) == 2


def test_state_memory_is_the_bytes_of_the_state(bench) -> None:
    model = bench.build("gqa", "tiny", 64, 128, "cpu")
    timed = bench.time_cached(model, [16, 32], 1, 0, 64, "cpu")
    grown = [timed[length][1] for length in (16, 32)]
    accounted = [model.decode_state_size(length) * 4 for length in (16, 32)]  # fp32 elements
    # the KV cache doubles with the context, as the model's own accounting says (up to fixed-size parts)
    assert grown[1] - grown[0] == accounted[1] - accounted[0] > 0
    lstm = bench.build("lstm", "tiny", 64, 128, "cpu")
    timed = bench.time_cached(lstm, [16, 64], 1, 0, 64, "cpu")
    assert timed[16][1] == timed[64][1] > 0

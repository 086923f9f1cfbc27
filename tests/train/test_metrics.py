"""wandb (real, offline) receives the same numbers as metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from archifactory.train.loop import train
from tests.train.test_loop import smoke_config, write_corpus


def test_wandb_offline_gets_the_same_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged: list[dict] = []
    real_init = wandb.init

    def recording_init(*args, **kwargs):
        run = real_init(*args, **kwargs)
        real_log = run.log

        def log(data, step=None, **rest):
            logged.append({"step": step, **data})
            return real_log(data, step=step, **rest)

        run.log = log
        return run

    monkeypatch.setattr(wandb, "init", recording_init)
    corpus = write_corpus(tmp_path / "corpus")
    run_dir = tmp_path / "run"
    train(smoke_config(corpus, tmp_path / "cache", "wandb.enabled=true", "wandb.mode=offline"), run_dir)

    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline_runs and any(offline_runs[0].glob("*.wandb")), "a real offline wandb run was written"
    local = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == len(local)
    for ours, theirs in zip(local, logged):
        for key, value in ours.items():
            if isinstance(value, (int, float)):
                assert theirs[key] == pytest.approx(value), key


def test_throughput_excludes_paused_time_and_reports_mfu(monkeypatch: pytest.MonkeyPatch) -> None:
    from archifactory.train import metrics

    clock = {"now": 0.0}
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock["now"])
    meter = metrics.Throughput(train_flops_per_token=1e6, peak_flops=1e9, world_size=1)
    meter.resume()
    clock["now"] = 5.0  # the first step, compilation included: dropped
    meter.add_tokens(100)
    meter.restart()
    clock["now"] += 2.0  # two timed seconds ...
    meter.add_tokens(400)
    meter.pause()
    clock["now"] += 30.0  # ... then validation, which does not count
    meter.resume()
    clock["now"] += 2.0
    meter.add_tokens(400)
    tokens_per_second, mfu = meter.read()
    assert tokens_per_second == pytest.approx(200.0)
    assert mfu == pytest.approx(200.0 * 1e6 / 1e9)
    assert meter.read() == (None, None)  # an empty window says so instead of reporting zero
    assert meter.run_average()[0] == pytest.approx(200.0)

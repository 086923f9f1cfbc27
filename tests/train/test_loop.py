"""End-to-end training through the real CLI path: run directory contract, resume exactness, bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import components
from archifactory.train.loop import train
from tests.helpers import compose_config

WORDS = (
    "the cat dog sat ran on a mat hat big small red blue king queen said to her him and then "
    "over under green house tree bird sang sweetly loudly"
).split()


def write_corpus(folder: Path, documents: int = 300, seed: int = 0) -> Path:
    """A small structured corpus: templated sentences, so a tiny model's loss falls quickly."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(documents // 50):
        stories = []
        for _ in range(50):
            sentences = [
                f"the {rng.choice(WORDS)} {rng.choice(WORDS)} on the {rng.choice(WORDS)}."
                for _ in range(rng.randint(3, 8))
            ]
            stories.append(" ".join(sentences))
        (folder / f"part{i}.txt").write_text("\n\n".join(stories))
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenizer and token cache for the per-component runs (the tests of caching use their own)."""
    return tmp_path_factory.mktemp("cache")


def smoke_config(corpus: Path, cache: Path, *extra: str):
    return compose_config(
        [
            "dataset=text",
            f"dataset.path={corpus}",
            f"dataset.cache_dir={cache}",
            "dataset.vocab_size=512",
            "model=tiny",
            "model.hidden_size=64",
            "model.num_layers=2",
            "trainer=smoke",
            "trainer.lr=1e-2",
            *extra,
        ]
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_smoke_run_writes_the_run_directory(corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    summary = train(smoke_config(corpus, tmp_path / "cache"), run_dir, ["trainer=smoke"])
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == summary
    for key in (
        "status",
        "mixin",
        "ffn",
        "positional",
        "dataset",
        "seed",
        "params_total",
        "params_non_embedding",
        "flops_per_token",
        "steps",
        "tokens_seen",
        "train_loss",
        "val_loss",
        "val_bpb",
        "tokens_per_second",
        "mfu",
        "peak_memory_mb",
        "wall_seconds",
    ):
        assert key in on_disk
    assert on_disk["status"] == "completed" and on_disk["steps"] == 20
    assert on_disk["tokens_seen"] == 20 * 4 * 64
    vals = [m["val_loss"] for m in read_metrics(run_dir) if "val_loss" in m]
    assert len(vals) == 2 and vals[-1] < vals[0]
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == ["step_0000010", "step_0000020"]
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_matches_uninterrupted(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    full = tmp_path / "full"
    train(smoke_config(corpus, cache, "trainer.checkpoint_every=5"), full)

    # a crash after step 12 (checkpoint at 10), then a resume
    crashed = tmp_path / "crashed"
    from archifactory.train import loop

    real_step = loop.torch.optim.Optimizer.zero_grad
    calls = {"n": 0}

    def crash_after_12(self, set_to_none: bool = True) -> None:
        calls["n"] += 1
        if calls["n"] == 13:
            raise RuntimeError("simulated crash")
        real_step(self, set_to_none=set_to_none)

    monkeypatch.setattr(loop.torch.optim.Optimizer, "zero_grad", crash_after_12)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(smoke_config(corpus, cache, "trainer.checkpoint_every=5"), crashed)
    assert json.loads((crashed / "summary.json").read_text())["status"] == "failed"
    monkeypatch.undo()

    with pytest.raises(ArchiFactoryError, match="already holds a run"):
        train(smoke_config(corpus, cache, "trainer.checkpoint_every=5"), crashed)
    train(smoke_config(corpus, cache, "trainer.checkpoint_every=5", "trainer.resume=true"), crashed)

    a, b = (
        load_file(str(full / "checkpoints/step_0000020/model.safetensors")),
        load_file(str(crashed / "checkpoints/step_0000020/model.safetensors")),
    )
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)
    curve_a = [(m["step"], m.get("train_loss"), m.get("val_loss")) for m in read_metrics(full)]
    curve_b = [(m["step"], m.get("train_loss"), m.get("val_loss")) for m in read_metrics(crashed)]
    assert [c[0] for c in curve_a] == [c[0] for c in curve_b]
    for (_, ta, va), (_, tb, vb) in zip(curve_a, curve_b):
        assert (ta is None) == (tb is None) and (va is None) == (vb is None)
        assert abs((ta or 0) - (tb or 0)) < 1e-5 and abs((va or 0) - (vb or 0)) < 1e-5
    assert json.loads((crashed / "summary.json").read_text())["status"] == "completed"


def test_bad_hidden_size_fails_cleanly(corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "bad"
    with pytest.raises(ArchiFactoryError, match="not divisible"):
        train(smoke_config(corpus, tmp_path / "cache", "model.hidden_size=100", "model.num_heads=3"), run_dir)
    # refused before anything was prepared or written: no run directory, no token cache
    assert not run_dir.exists() and not (tmp_path / "cache").exists()


def test_nonfinite_steps_are_skipped_then_stop(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from archifactory.model import stack

    real_forward = stack.StackedMixinForCausalLM.forward
    calls = {"n": 0}

    def nan_forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if self.training and (calls["n"] == 3 or calls["n"] >= 8):
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(stack.StackedMixinForCausalLM, "forward", nan_forward)
    run_dir = tmp_path / "nan"
    with pytest.raises(ArchiFactoryError, match="non-finite steps in a row"):
        train(smoke_config(corpus, tmp_path / "cache", "trainer.max_nonfinite_steps=3"), run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed"
    logged = read_metrics(run_dir)
    assert any(m.get("nonfinite_skipped") == 1 for m in logged), "the single NaN step was skipped and counted"


def _first_and_last_val(run_dir: Path) -> tuple[float, float]:
    vals = [m["val_loss"] for m in read_metrics(run_dir) if "val_loss" in m]
    return vals[0], vals[-1]


# per component: 12 steps, validated at 6 and 12 (the loss must fall between them), one checkpoint
SHORT = ("trainer.max_steps=12", "trainer.eval_every=6", "trainer.checkpoint_every=12", "trainer.warmup_steps=3")


@pytest.mark.slow
@pytest.mark.parametrize("mixin", sorted(components("mixin")))
def test_every_mixin_trains(mixin: str, corpus: Path, shared_cache: Path, tmp_path: Path) -> None:
    train(smoke_config(corpus, shared_cache, f"mixin={mixin}", *SHORT), tmp_path / "run")
    first, last = _first_and_last_val(tmp_path / "run")
    assert last < first, f"{mixin}: validation loss did not fall ({first:.3f} -> {last:.3f})"


@pytest.mark.slow
@pytest.mark.parametrize("ffn", sorted(components("ffn")))
def test_every_ffn_trains(ffn: str, corpus: Path, shared_cache: Path, tmp_path: Path) -> None:
    summary = train(smoke_config(corpus, shared_cache, f"ffn={ffn}", *SHORT), tmp_path / "run")
    first, last = _first_and_last_val(tmp_path / "run")
    assert last < first, f"{ffn}: validation loss did not fall ({first:.3f} -> {last:.3f})"
    assert summary["params_active"] <= summary["params_total"]
    if ffn in ("moe", "hyper_moe", "dora_moe"):
        logged = [m for m in read_metrics(tmp_path / "run") if "train_loss" in m][-1]
        loads = [value for key, value in logged.items() if key.endswith(".load")]
        assert loads and all(abs(sum(load) - 1.0) < 1e-4 for load in loads), "expert load is logged per layer"
        assert any(key.endswith(".imbalance") for key in logged)

"""README promises about a training run that the end-to-end tests did not pin down.

Stop signals (checkpoint + `interrupted`, fresh `steps`), `keep_checkpoints`, every RNG restored, the
default `run_name`, refusing a completed run directory, and the wiring inside `train()`: the token-budget
plan (steps and gradient accumulation), `lr` / `grad_norm` / tokens/s / MFU in `metrics.jsonl`,
`val_bpb`, `model.loss_chunk_size` and `trainer.compile`.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from archifactory.core.errors import ArchiFactoryError
from archifactory.data import load_data
from archifactory.train.checkpoint import (
    TrainerState,
    load_checkpoint,
    model_signature,
    save_checkpoint,
    set_rng_state,
)
from archifactory.train.loop import train
from archifactory.train.resume import claim_run, plan_run
from archifactory.train.signals import StopRequest
from tests.helpers import compose_config
from tests.train.test_loop import read_metrics, smoke_config, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_checkpoints_and_marks_the_run_interrupted(
    sig: signal.Signals, corpus: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_zero_grad = torch.optim.Optimizer.zero_grad
    calls = {"n": 0}

    def signal_after_step_3(self, set_to_none: bool = True) -> None:
        real_zero_grad(self, set_to_none=set_to_none)
        calls["n"] += 1
        if calls["n"] == 3:  # zero_grad follows optimizer.step(): step 3 is done, the signal arrives
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(torch.optim.Optimizer, "zero_grad", signal_after_step_3)
    handler_before = signal.getsignal(sig)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt, match=f"stopped by {sig.name} at step 3"):
        train(smoke_config(corpus, cache, "trainer.max_steps=6"), run_dir)
    monkeypatch.undo()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["steps"] == 3 and summary["tokens_seen"] == 3 * 4 * 64, "the summary says where it stopped"
    assert checkpoint_names(run_dir) == ["step_0000003"]
    assert signal.getsignal(sig) == handler_before, "the run hands the signal back"

    resumed = train(smoke_config(corpus, cache, "trainer.max_steps=6", "trainer.resume=true"), run_dir)
    assert resumed["status"] == "completed" and resumed["steps"] == 6


def test_a_second_sigint_aborts_at_once_and_handlers_are_restored() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM still waits for the step boundary
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_checkpoint_restores_every_rng(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    weights = {"w": torch.randn(3, 3)}
    state = TrainerState(step=7, tokens_seen=70, loader={"epoch": 0, "position": 4})
    path = save_checkpoint(tmp_path, weights, {"optimizer": {}}, state, keep=2)
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    torch.manual_seed(99)  # every generator moves on (and is reseeded) after the save
    np.random.seed(99)
    random.seed(99)
    loaded = load_checkpoint(path, model_signature(weights))
    set_rng_state(loaded.rng)
    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.rand(4), expected[1])
    assert [random.random() for _ in range(4)] == expected[2]
    assert loaded.trainer_state == state


def test_keep_checkpoints_prunes_the_oldest(tmp_path: Path) -> None:
    weights = {"w": torch.zeros(2)}
    for step in range(1, 6):
        save_checkpoint(tmp_path, weights, {}, TrainerState(step, step, {}), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000004", "step_0000005"]


def test_default_run_name_names_the_variant() -> None:
    assert compose_config([]).run_name == "gqa_swiglu_rope_tiny_tinystories-c57ecc_s0"
    cfg = compose_config(
        ["mixin=rwkv6", "ffn=moe", "positional=none", "model=small", "dataset=text", "seed=3"]
    )
    assert cfg.run_name == "rwkv6_moe_none_small_text-159e0e_s3"


@pytest.mark.parametrize(
    "status,checkpoints,resume,refused",
    [
        ("completed", False, False, True),  # a finished run without checkpoints is not overwritten
        ("failed", True, False, True),
        ("failed", False, False, False),  # nothing to lose: start again
        ("completed", True, True, False),  # resumed (here: its fake checkpoint is then refused as unreadable)
        (None, False, False, False),
    ],
)
def test_a_fresh_run_refuses_a_completed_or_checkpointed_run_dir(
    tmp_path: Path, status: str | None, checkpoints: bool, resume: bool, refused: bool
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if status:
        (run_dir / "summary.json").write_text(json.dumps({"status": status}))
    if checkpoints:
        (run_dir / "checkpoints" / "step_0000010").mkdir(parents=True)
    cfg = compose_config([f"trainer.resume={str(resume).lower()}"])
    if refused:
        with pytest.raises(ArchiFactoryError, match="already holds a run"):
            plan_run(cfg, run_dir, planned_steps=20)
        assert not (run_dir / ".hydra").exists()
    elif checkpoints:
        with pytest.raises(ArchiFactoryError, match="step_0000010 is unreadable"):
            plan_run(cfg, run_dir, planned_steps=20)
        assert not (run_dir / ".hydra").exists()
    else:
        claim_run(cfg, run_dir, ["seed=1"], plan_run(cfg, run_dir, planned_steps=20))
        assert (run_dir / ".hydra" / "overrides.yaml").read_text().strip() == "- seed=1"


def test_train_wires_budget_accumulation_metrics_chunked_loss_and_compile(
    corpus: Path,
    cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from archifactory.model import stack
    from archifactory.model.block import Block
    from archifactory.train import loop

    chunk_sizes, compiled, train_forwards = [], [], []
    real_ce, real_forward = stack.lm_cross_entropy, stack.StackedMixinForCausalLM.forward
    monkeypatch.setattr(stack, "lm_cross_entropy", lambda *a: chunk_sizes.append(a[3]) or real_ce(*a))
    monkeypatch.setattr(Block, "compile", lambda self, *a, **k: compiled.append(self))
    monkeypatch.setattr(loop, "peak_flops", lambda device: 1e12)  # a pretend accelerator: MFU is computed

    def counting_forward(self, *args, **kwargs):
        if self.training and args[0].device.type != "meta":  # plan.md's activation trace runs on meta
            train_forwards.append(args[0].shape)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(stack.StackedMixinForCausalLM, "forward", counting_forward)
    cfg = smoke_config(
        corpus,
        cache,
        "trainer.batch_tokens=512",  # micro-batch 4 x 64 = 256 tokens: 2 accumulation steps
        "trainer.total_tokens=4096",  # 8 optimizer steps
        "trainer.max_steps=100",
        "trainer.schedule=constant",
        "trainer.warmup_steps=4",
        "trainer.log_every=2",
        "trainer.eval_every=4",
        "trainer.checkpoint_every=2",
        "trainer.keep_checkpoints=2",
        "trainer.compile=true",
        "model.loss_chunk_size=64",
    )
    run_dir = tmp_path / "run"
    with caplog.at_level("INFO", logger="archifactory"):
        summary = train(cfg, run_dir)

    assert "plan: 8 optimizer steps x 512 tokens (micro-batch 4 x seq 64 x accum 2 x world 1)" in caplog.text
    assert summary["total_steps"] == 8 and summary["steps"] == 8 and summary["tokens_seen"] == 8 * 512
    assert len(train_forwards) == 16 and all(shape == (4, 64) for shape in train_forwards)
    assert len(compiled) == cfg.model.num_layers
    assert chunk_sizes and set(chunk_sizes) == {64}
    assert checkpoint_names(run_dir) == ["step_0000006", "step_0000008"]

    logged = [m for m in read_metrics(run_dir) if "train_loss" in m]
    assert [m["step"] for m in logged] == [2, 4, 6, 8]
    # the logged lr is the schedule's multiplier at the step count (warmup (s + 1) / 4, then constant)
    assert [m["lr"] for m in logged] == pytest.approx([1e-2 * 3 / 4, 1e-2, 1e-2, 1e-2])
    assert all(m["grad_norm"] > 0 and math.isfinite(m["grad_norm"]) for m in logged)
    flops = summary["flops_per_token"]
    for m in logged[1:]:  # the first window holds the excluded first step
        assert m["tokens_per_second"] > 0
        assert m["mfu"] == pytest.approx(m["tokens_per_second"] * 3 * flops / 1e12, rel=1e-9)
    assert summary["mfu"] == pytest.approx(summary["tokens_per_second"] * 3 * flops / 1e12, rel=1e-9)

    bytes_per_token = load_data(cfg.dataset, seq_len=64, seed=0).val_bytes_per_token
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / math.log(2) / bytes_per_token, rel=1e-9)

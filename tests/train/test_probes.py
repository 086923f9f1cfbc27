"""Probe accuracy (answer positions only), the probe configs, and a tiny gqa model learning MQAR through
the real training loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from archifactory.cli.eval import eval_main
from archifactory.cli.main import main
from archifactory.eval.probe import answer_accuracy, probe_metrics
from archifactory.train.loop import train
from tests.helpers import compose_config

IGNORE = -100


def forced_logits(targets: torch.Tensor, vocab: int, right_at_answers: bool) -> torch.Tensor:
    """Logits whose argmax is the target at answer positions (or not) and wrong at every other one."""
    logits = torch.zeros(*targets.shape, vocab)
    answers = targets != IGNORE
    wrong = torch.zeros_like(targets)  # token 0 is never a target below
    pick = torch.where(answers & right_at_answers, targets, wrong)
    logits.scatter_(-1, pick.clamp(min=0).unsqueeze(-1), 5.0)
    return logits


def test_accuracy_counts_only_answer_positions() -> None:
    targets = torch.full((2, 6), IGNORE)
    targets[0, 2], targets[0, 5], targets[1, 3] = 4, 7, 3
    assert answer_accuracy(forced_logits(targets, 8, True), targets) == 1.0
    assert answer_accuracy(forced_logits(targets, 8, False), targets) == 0.0
    logits = forced_logits(targets, 8, True)
    logits[1, 3] = 0.0
    logits[1, 3, 1] = 5.0  # one of the three answers wrong
    assert answer_accuracy(logits, targets) == pytest.approx(2 / 3)


class Oracle(nn.Module):
    """Right at the answers of its batch, wrong (token 0) everywhere else."""

    def __init__(self, targets: torch.Tensor) -> None:
        super().__init__()
        self.targets = targets

    def forward(self, inputs: torch.Tensor):
        logits = forced_logits(self.targets, 8, True)
        return type("Out", (), {"logits": logits})()


def test_probe_metrics_scores_a_model() -> None:
    targets = torch.full((3, 5), IGNORE)
    targets[:, 4] = torch.tensor([1, 2, 3])
    metrics = probe_metrics(Oracle(targets), [(torch.zeros(3, 5, dtype=torch.long), targets)])
    assert metrics["val_accuracy"] == 1.0
    assert metrics["val_loss"] < 0.1  # cross-entropy on the three answers only


@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=mqar_quick"],
        ["experiment=zoology_mqar"],
        ["experiment=zoology_mqar_gpu"],
        ["experiment=mad"],
        *[
            ["dataset=mad", f"task={task}"]
            for task in (
                "in_context_recall",
                "noisy_in_context_recall",
                "fuzzy_in_context_recall",
                "selective_copying",
                "compression",
                "memorization",
            )
        ],  # fmt: skip
        ["task=memorization"],
        ["dataset=mqar", "mqar_cell=T512"],
    ],
)
def test_probe_configs_compose(overrides: list[str]) -> None:
    cfg = compose_config(overrides)
    assert cfg.dataset.source == "synthetic"
    if "mqar_cell=T512" in overrides:
        assert (cfg.trainer.seq_len, cfg.dataset.num_kv_pairs) == (512, 64)
    if "task=memorization" in overrides:
        assert (cfg.dataset.name, cfg.dataset.vocab_size, cfg.trainer.seq_len) == (
            "mad_memorization",
            256,
            32,
        )


def test_mad_without_task_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["train", "dataset=mad", "trainer=smoke", "trainer.device=cpu"])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "error: dataset=mad needs a task" in err and "Traceback" not in err


@pytest.mark.slow
def test_gqa_learns_mqar(tmp_path: Path) -> None:
    """A 2-layer d=64 attention model reaches >= 0.9 answer accuracy on small MQAR (2 pairs, length 16),
    and `archifactory eval accuracy` reports the same figure from its checkpoint."""
    cfg = compose_config(
        [
            "dataset=mqar",
            "dataset.vocab_size=16",
            "dataset.num_kv_pairs=2",
            "dataset.val_examples=256",
            "mixin=gqa",
            "model.num_layers=2",
            "model.hidden_size=64",
            "model.num_heads=1",
            "trainer=smoke",
            "trainer.seq_len=16",
            "trainer.micro_batch_size=64",
            "trainer.max_steps=300",
            "trainer.warmup_steps=20",
            "trainer.lr=3e-3",
            "trainer.eval_every=100",
            "trainer.checkpoint_every=300",
            "trainer.num_threads=1",
        ]
    )
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "completed"
    assert summary["val_accuracy"] >= 0.9, summary
    assert summary["val_bpb"] is None  # no text, no bits per byte
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    accuracies = [r["val_accuracy"] for r in records if "val_accuracy" in r]
    assert len(accuracies) == 3 and accuracies[-1] == summary["val_accuracy"]
    # `archifactory eval accuracy` scores the final checkpoint on the same validation set
    assert eval_main(["accuracy", f"run={tmp_path / 'run'}", "eval.show_progress=false"]) == 0
    entry = json.loads((tmp_path / "run" / "summary.json").read_text())["eval"]["accuracy"]
    assert entry["metric"] == "acc" and entry["value"] == pytest.approx(summary["val_accuracy"])
    assert entry["loss"] == pytest.approx(summary["val_loss"], rel=1e-5)


@pytest.mark.parametrize(
    "task",
    [
        "in_context_recall",
        "noisy_in_context_recall",
        "fuzzy_in_context_recall",
        "selective_copying",
        "compression",
        "memorization",
    ],  # fmt: skip
)
def test_every_mad_task_trains_through_the_loop(task: str, tmp_path: Path) -> None:
    cfg = compose_config(
        [
            "experiment=mad",
            f"task={task}",
            "model.hidden_size=32",
            "model.num_heads=2",
            "trainer.max_steps=2",
            "trainer.micro_batch_size=4",
            "trainer.eval_every=2",
            "trainer.log_every=1",
            "dataset.val_examples=8",
            "dataset.train_examples=16",
        ]  # fmt: skip
    )
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["dataset"] == f"mad_{task}"
    assert 0.0 <= summary["val_accuracy"] <= 1.0 and summary["val_loss"] > 0


def test_data_prepare_on_a_probe_is_a_no_op(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("ARCHIFACTORY_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert main(["data", "prepare", "dataset=mqar"]) == 0
    assert "synthetic, generated during training; nothing to prepare" in capsys.readouterr().out

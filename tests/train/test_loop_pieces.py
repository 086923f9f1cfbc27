"""The loop's typed pieces: component hooks through the model, the progress display off a terminal."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from archifactory.train.loop import train
from archifactory.train.metrics import Progress, progress_fields
from tests.train.test_loop import smoke_config, write_corpus


def test_moe_bias_balancing_runs_through_the_model_hook(tmp_path: Path) -> None:
    """The loop calls `model.after_optimizer_step()`, which reaches every routed FFN's bias update."""
    corpus = write_corpus(tmp_path / "corpus", documents=100)
    run_dir = tmp_path / "run"
    train(
        smoke_config(
            corpus,
            tmp_path / "cache",
            "ffn=moe",
            "ffn.bias_update_rate=0.01",
            "trainer.max_steps=3",
            "trainer.eval_every=3",
            "trainer.checkpoint_every=3",
        ),
        run_dir,
    )
    weights = load_file(str(run_dir / "checkpoints/step_0000003/model.safetensors"))
    biases = [value for key, value in weights.items() if key.endswith("expert_bias")]
    assert biases, "the MoE routing bias is saved with the model"
    assert any(bias.abs().sum() > 0 for bias in biases), "three optimizer steps moved the routing bias"


def test_progress_off_a_terminal_logs_lines_not_frames(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    progress = Progress(total=40, initial=0, enabled=True, interactive=False)
    with caplog.at_level(logging.INFO, logger="archifactory.train.metrics"):
        for step in range(1, 41):
            progress.advance()
            if step % 10 == 0:
                progress.report(step, 2.5, 1234.0, {"layers.0.imbalance": torch.tensor(1.5)})
        progress.write("step 40: val_loss 2.4")
        progress.close()
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "\r" not in captured.out
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:4] == [f"step {s}/40: loss 2.500  tok/s 1,234  imb 1.50" for s in (10, 20, 30, 40)]
    assert lines[4] == "step 40: val_loss 2.4"


def test_progress_on_a_terminal_is_a_bar(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress(total=4, initial=0, enabled=True, interactive=True)
    for step in range(1, 5):
        progress.advance()
        progress.report(step, 1.0, None, {})
    progress.close()
    assert "\r" in capsys.readouterr().err


def test_progress_fields_show_the_worst_layer_imbalance() -> None:
    aux = {
        "layers.0.imbalance": torch.tensor(1.2),
        "layers.1.imbalance": torch.tensor(3.0),
        "layers.1.load": torch.tensor([0.5, 0.5]),
    }
    assert progress_fields(1.23456, None, aux) == {"loss": "1.235", "imb": "3.00"}
    assert progress_fields(1.0, 10.0, {}) == {"loss": "1.000", "tok/s": "10"}


def test_autocast_covers_the_forward_not_the_backward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PyTorch's guidance: backward runs outside autocast (in the dtypes the forward chose)."""
    from archifactory.model import stack

    seen: dict[str, list[bool]] = {"forward": [], "backward": []}
    real_forward = stack.StackedMixinForCausalLM.forward

    def recording_forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training and out.loss.device.type != "meta":  # not the plan's meta-device trace
            seen["forward"].append(torch.is_autocast_enabled("cpu"))
            out.loss.register_hook(lambda grad: seen["backward"].append(torch.is_autocast_enabled("cpu")))
        return out

    monkeypatch.setattr(stack.StackedMixinForCausalLM, "forward", recording_forward)
    corpus = write_corpus(tmp_path / "corpus", documents=100)
    config = smoke_config(
        corpus, tmp_path / "cache", "trainer.precision=bf16", "trainer.max_steps=2", "trainer.eval_every=2"
    )
    train(config, tmp_path / "run")
    assert seen["forward"] == [True, True] and seen["backward"] == [False, False]

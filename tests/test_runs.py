"""archifactory.runs.load: finding the latest completed run and loading a run's model + tokenizer."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from archifactory.core.errors import ArchiFactoryError
from archifactory.data import load_data
from archifactory.eval.evaluate import evaluate
from archifactory.runs.load import (
    completed_runs,
    latest_completed_run,
    load_run,
    resolve_run,
)
from tests.run_helpers import train_tiny_run, write_small_corpus


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(outputs dir, its one completed run) — a real 20-step training run."""
    root = tmp_path_factory.mktemp("runs")
    corpus = write_small_corpus(root / "corpus")
    outputs = root / "outputs"
    run = outputs / "tiny_gqa"
    train_tiny_run(run, corpus, root / "cache")
    return outputs, run


def copy_run(run: Path, target: Path, status: str | None = None) -> Path:
    shutil.copytree(run, target)
    if status is not None:
        summary = json.loads((target / "summary.json").read_text())
        (target / "summary.json").write_text(json.dumps({**summary, "status": status}))
    return target


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_latest_completed_run_is_the_newest_completed_at_any_depth(trained, tmp_path: Path) -> None:
    outputs, run = trained
    copied = copy_run(run, tmp_path / "outputs" / "old", "completed")
    nested = copy_run(run, tmp_path / "outputs" / "2026-01-01_00-00-00" / "0_swept", "completed")
    copy_run(run, tmp_path / "outputs" / "failed", "failed")
    copy_run(run, tmp_path / "outputs" / "running", "running")
    now = time.time()
    os.utime(copied / "summary.json", (now - 100, now - 100))
    os.utime(nested / "summary.json", (now - 50, now - 50))
    for later in ("failed", "running"):  # newer, but not completed
        os.utime(tmp_path / "outputs" / later / "summary.json", (now, now))
    assert completed_runs(tmp_path / "outputs") == [copied, nested]
    assert latest_completed_run(tmp_path / "outputs") == nested
    assert latest_completed_run(outputs) == run


def test_no_completed_run_is_one_line(tmp_path: Path, trained) -> None:
    with pytest.raises(ArchiFactoryError) as error:
        latest_completed_run(tmp_path / "nowhere")
    assert "no completed run" in one_line(error)
    copy_run(trained[1], tmp_path / "outputs" / "crashed", "failed")
    with pytest.raises(ArchiFactoryError, match="no completed run"):
        resolve_run(None, tmp_path / "outputs")


def test_resolve_run_accepts_a_path_a_name_or_nothing(trained, tmp_path: Path) -> None:
    outputs, run = trained
    assert resolve_run(None, outputs) == run
    assert resolve_run(str(run), tmp_path) == run
    assert resolve_run("tiny_gqa", outputs) == outputs / "tiny_gqa"
    with pytest.raises(ArchiFactoryError) as error:
        resolve_run(str(tmp_path / "missing"), outputs)
    assert "not a run directory" in one_line(error)


def test_load_run_reproduces_the_final_validation_loss(trained) -> None:
    _, run = trained
    loaded = load_run(run)
    summary = json.loads((run / "summary.json").read_text())
    assert not loaded.model.training
    assert loaded.step == summary["steps"] == 20
    assert loaded.name == "tiny_gqa"
    assert loaded.params["total"] == summary["params_total"]
    assert loaded.checkpoint.name == "step_0000020"
    cfg = loaded.config
    assert cfg.model.max_seq_len == cfg.trainer.seq_len  # interpolations resolved
    data = load_data(cfg.dataset, seq_len=cfg.trainer.seq_len, seed=cfg.seed)
    batches = data.val_batches(cfg.trainer.micro_batch_size, cfg.trainer.eval_tokens)
    val = evaluate(
        loaded.model, batches, torch.device("cpu"), contextlib.nullcontext, data.val_bytes_per_token
    )
    # the trained weights, not a fresh init: the same validation loss the run recorded at its last step
    assert val["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)


def test_the_tokenizer_is_the_runs_own_and_converts_to_transformers(trained) -> None:
    _, run = trained
    loaded = load_run(run)
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    text = "the king sat on the mat."
    ids = loaded.tokenizer.encode(text)
    assert loaded.tokenizer.decode(ids) == text
    assert loaded.tokenizer.vocab_size == loaded.model.vocab_size
    hf = loaded.hf_tokenizer()
    assert hf(text, add_special_tokens=False)["input_ids"] == ids
    assert hf.eos_token_id == loaded.tokenizer.eos_id
    assert hf.decode(ids) == text


def test_a_run_without_its_tokenizer_copy_falls_back_to_the_dataset_cache(trained, tmp_path: Path) -> None:
    copied = copy_run(trained[1], tmp_path / "old_run")
    shutil.rmtree(copied / "tokenizer")
    assert load_run(copied).tokenizer.hash == load_run(trained[1]).tokenizer.hash


def test_load_run_picks_an_earlier_step(trained) -> None:
    _, run = trained
    loaded = load_run(run, step=10)
    assert loaded.step == 10
    weights = load_file(str(run / "checkpoints" / "step_0000010" / "model.safetensors"))
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, weights[name])
    with pytest.raises(ArchiFactoryError) as error:
        load_run(run, step=7)
    assert "10, 20" in one_line(error)


def test_a_damaged_checkpoint_is_refused_in_one_line(trained, tmp_path: Path) -> None:
    copied = copy_run(trained[1], tmp_path / "damaged")
    weights = copied / "checkpoints" / "step_0000020" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArchiFactoryError) as error:
        load_run(copied)
    assert "damaged" in one_line(error)
    (copied / "checkpoints" / "step_0000020" / "trainer_state.json").write_text("{not json")
    with pytest.raises(ArchiFactoryError) as error:
        load_run(copied)
    assert "trainer_state.json" in one_line(error)


def test_a_run_without_a_finished_checkpoint_is_refused(trained, tmp_path: Path) -> None:
    copied = copy_run(trained[1], tmp_path / "unfinished")
    shutil.rmtree(copied / "checkpoints")
    (copied / "checkpoints" / ".tmp_step_0000030").mkdir(parents=True)  # an interrupted write
    with pytest.raises(ArchiFactoryError) as error:
        load_run(copied)
    assert "no finished checkpoint" in one_line(error)


def test_a_checkpoint_of_another_shape_is_refused(trained, tmp_path: Path) -> None:
    copied = copy_run(trained[1], tmp_path / "edited")
    config = copied / ".hydra" / "config.yaml"
    config.write_text(config.read_text().replace("num_layers: 2", "num_layers: 3"))
    with pytest.raises(ArchiFactoryError) as error:
        load_run(copied)
    assert "does not match" in one_line(error)
    config.write_text("model: [unclosed")
    with pytest.raises(ArchiFactoryError) as error:
        load_run(copied)
    assert "unreadable" in one_line(error)

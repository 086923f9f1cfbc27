"""The run directory is a record that is never lost (issue #9): refused commands change no byte of it,
resume compares configs, a finished run stays finished, damaged files are read defensively, and a full
disk during a checkpoint costs nothing but the checkpoint being written."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from archifactory.core.errors import ArchiFactoryError
from archifactory.runs.layout import LOCK as LOCK_NAME
from archifactory.runs.lock import RunDirLock
from archifactory.train import checkpoint as checkpoint_module
from archifactory.train import loop, setup
from archifactory.train.checkpoint import list_checkpoints, verify_checkpoint
from archifactory.train.loop import train
from archifactory.train.resume import config_changes
from tests.train.test_loop import read_metrics, smoke_config, write_corpus


def snapshot(run_dir: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `run_dir`."""
    return {
        str(path.relative_to(run_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(run_dir.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A corpus, its token cache and one completed 20-step run (checkpoints at 10 and 20)."""
    root = tmp_path_factory.mktemp("record")
    corpus = write_corpus(root / "corpus")
    done = root / "done"
    train(smoke_config(corpus, root / "cache"), done, ["trainer=smoke"])
    return {"corpus": corpus, "cache": root / "cache", "done": done}


def copy_of(world: dict[str, Path], tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(world["done"], run_dir)
    return run_dir


def config(world: dict[str, Path], *extra: str):
    return smoke_config(world["corpus"], world["cache"], *extra)


@pytest.mark.parametrize(
    "changes,named",
    [
        (["positional=alibi"], "positional.name: 'rope' -> 'alibi'"),
        (["model.num_heads=2"], "model.num_heads: 4 -> 2"),  # same tensor shapes, other architecture
        (["trainer.lr=0.02"], "trainer.lr: 0.01 -> 0.02"),
        (["dataset.vocab_size=600"], "dataset.vocab_size: 512 -> 600"),
    ],
)
def test_resume_with_another_config_is_refused_and_changes_nothing(
    world: dict[str, Path], tmp_path: Path, changes: list[str], named: str
) -> None:
    run_dir = copy_of(world, tmp_path)
    before = snapshot(run_dir)
    with pytest.raises(ArchiFactoryError) as info:
        train(config(world, *changes, "trainer.max_steps=30", "trainer.resume=true"), run_dir)
    assert named in str(info.value) and "\n" not in str(info.value)
    assert snapshot(run_dir) == before


def test_safe_changes_are_allowed_and_named() -> None:
    old = {"trainer": {"max_steps": 20, "log_every": 5, "lr": 0.01}, "wandb": {"enabled": False}}
    new = {"trainer": {"max_steps": 40, "log_every": 2, "lr": 0.01}, "wandb": {"enabled": True}}
    unsafe, safe = config_changes(old, new)
    assert unsafe == []
    assert safe == [
        "trainer.log_every: 5 -> 2",
        "trainer.max_steps: 20 -> 40",
        "wandb.enabled: False -> True",
    ]


@pytest.mark.parametrize("damage", ["truncated weights", "empty trainer_state", "unparsable trainer_state"])
def test_refused_checkpoint_changes_nothing(world: dict[str, Path], tmp_path: Path, damage: str) -> None:
    run_dir = copy_of(world, tmp_path)
    last = run_dir / "checkpoints" / "step_0000020"
    if damage == "truncated weights":
        (last / "model.safetensors").write_bytes((last / "model.safetensors").read_bytes()[:1000])
    elif damage == "empty trainer_state":
        (last / "trainer_state.json").write_text("{}")
    else:
        (last / "trainer_state.json").write_text('{"step": 2')
    before = snapshot(run_dir)
    with pytest.raises(ArchiFactoryError, match="step_0000020") as info:
        train(config(world, "trainer.max_steps=30", "trainer.resume=true"), run_dir)
    assert "delete that folder" in str(info.value)
    assert snapshot(run_dir) == before


def test_a_stale_lock_is_taken_over(
    world: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = copy_of(world, tmp_path)
    (run_dir / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "gone", "started": "yesterday"}))
    assert train(config(world, "trainer.resume=true"), run_dir)["status"] == "completed"
    assert "stale lock of pid 999999 on gone" in caplog.text
    assert not (run_dir / LOCK_NAME).exists()


def test_a_held_lock_refuses_a_second_run(world: dict[str, Path], tmp_path: Path) -> None:
    run_dir = copy_of(world, tmp_path)
    with RunDirLock(run_dir):
        before = snapshot(run_dir)
        with pytest.raises(ArchiFactoryError, match=f"in use by another run \\(pid {os.getpid()} on"):
            train(config(world, "trainer.max_steps=30", "trainer.resume=true"), run_dir)
        assert snapshot(run_dir) == before


def test_resuming_a_completed_run_is_a_no_op(world: dict[str, Path], tmp_path: Path) -> None:
    run_dir = copy_of(world, tmp_path)
    before = snapshot(run_dir)
    summary = train(config(world, "trainer.resume=true"), run_dir)
    assert summary["status"] == "completed" and summary["val_loss"] is not None
    assert snapshot(run_dir) == before


def test_fresh_run_over_a_completed_one_is_refused(world: dict[str, Path], tmp_path: Path) -> None:
    run_dir = copy_of(world, tmp_path)
    before = snapshot(run_dir)
    with pytest.raises(ArchiFactoryError, match="already holds a run"):
        train(config(world), run_dir)
    assert snapshot(run_dir) == before


def test_larger_budget_continues_and_merges_the_summary(
    world: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = copy_of(world, tmp_path)
    old = json.loads((run_dir / "summary.json").read_text())
    with caplog.at_level(logging.INFO):
        summary = train(config(world, "trainer.max_steps=30", "trainer.resume=true"), run_dir)
    assert summary["status"] == "completed" and summary["steps"] == 30
    for key in ("train_loss", "val_loss", "val_bpb", "tokens_per_second", "params_total"):
        assert summary[key] is not None, key
    assert summary["params_total"] == old["params_total"]
    assert [m["step"] for m in read_metrics(run_dir) if "val_loss" in m] == [10, 20, 30]
    assert "trainer.max_steps: 20 -> 30" in caplog.text  # the log says which safe settings changed
    assert "trainer.max_steps: 20 -> 30" in (run_dir / "archifactory.log").read_text()


def test_torn_metrics_line_is_dropped_on_resume(world: dict[str, Path], tmp_path: Path) -> None:
    run_dir = copy_of(world, tmp_path)
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 21, "train_lo')  # a kill mid-append
    summary = train(config(world, "trainer.max_steps=25", "trainer.resume=true"), run_dir)
    assert summary["status"] == "completed"
    steps = [m["step"] for m in read_metrics(run_dir)]  # every line parses again
    assert steps[-1] == 25 and 21 not in steps[: steps.index(20) + 1]


def test_damaged_summary_is_rebuilt(world: dict[str, Path], tmp_path: Path) -> None:
    run_dir = copy_of(world, tmp_path)
    good = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text("")
    summary = train(config(world, "trainer.resume=true"), run_dir)  # completed: nothing to train
    rebuilt = json.loads((run_dir / "summary.json").read_text())
    assert rebuilt == summary and rebuilt["rebuilt"] is True and rebuilt["status"] == "completed"
    for key in ("mixin", "ffn", "positional", "dataset", "seed", "steps", "tokens_seen", "val_loss"):
        assert rebuilt[key] == good[key], key


def _failing_save(after: int, error: BaseException):
    real = checkpoint_module.save_file
    calls = {"n": 0}

    def save_file(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            raise error
        return real(*args, **kwargs)

    return save_file


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0"),
    ],
)
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    run_dir = tmp_path / "full"
    monkeypatch.setattr(checkpoint_module, "save_file", _failing_save(1, error))
    with pytest.raises(ArchiFactoryError) as info:
        train(config(world), run_dir)
    line = str(info.value)
    assert "could not write checkpoint" in line and "step_0000010 stays the resume point" in line
    assert not list((run_dir / "checkpoints").glob(".tmp_*")), "the temporary folder is cleaned up"
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_0000010"]
    verify_checkpoint(run_dir / "checkpoints" / "step_0000010")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "could not write checkpoint" in summary["error"]
    monkeypatch.undo()
    resumed = train(config(world, "trainer.resume=true"), run_dir)
    assert resumed["status"] == "completed" and resumed["steps"] == 20


def test_orphan_temporary_checkpoint_is_removed(world: dict[str, Path], tmp_path: Path) -> None:
    run_dir = copy_of(world, tmp_path)
    orphan = run_dir / "checkpoints" / ".tmp_step_0000030"
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"x" * 100)
    torn_write = run_dir / ".summary.json.tmp-12345"  # a kill between write and rename
    torn_write.write_text('{"status": "runn')
    train(config(world, "trainer.max_steps=30", "trainer.resume=true"), run_dir)
    assert not orphan.exists() and not torn_write.exists()


def test_first_log_after_a_resume_off_a_log_boundary_matches(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cadence = ["trainer.checkpoint_every=3", "trainer.log_every=5", "trainer.max_steps=12"]
    full = tmp_path / "full"
    train(config(world, *cadence), full)
    crashed = tmp_path / "crashed"
    real_zero_grad = torch.optim.Optimizer.zero_grad
    calls = {"n": 0}

    def crash_after_7(self, set_to_none: bool = True) -> None:
        calls["n"] += 1
        if calls["n"] == 8:
            raise RuntimeError("simulated crash")
        real_zero_grad(self, set_to_none=set_to_none)

    monkeypatch.setattr(loop.torch.optim.Optimizer, "zero_grad", crash_after_7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config(world, *cadence), crashed)
    monkeypatch.undo()
    assert json.loads((crashed / "summary.json").read_text())["steps"] == 6  # = its last checkpoint
    train(config(world, *cadence, "trainer.resume=true"), crashed)  # resumes at 6; logs at 10 (7..10)
    losses = lambda d: {m["step"]: m["train_loss"] for m in read_metrics(d) if "train_loss" in m}  # noqa: E731
    assert losses(crashed).keys() == losses(full).keys() == {5, 10, 12}
    for step, value in losses(full).items():
        assert abs(losses(crashed)[step] - value) < 1e-6, step


def test_nonfinite_stop_without_a_checkpoint_says_so(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from archifactory.model import stack

    real_forward = stack.StackedMixinForCausalLM.forward

    def nan_forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(stack.StackedMixinForCausalLM, "forward", nan_forward)
    with pytest.raises(ArchiFactoryError, match="no checkpoint was written yet"):
        train(config(world, "trainer.max_nonfinite_steps=2"), tmp_path / "nan")


@pytest.mark.parametrize(
    "option,message",
    [("mixin.backend=warp", "backend='warp'"), ("ffn.dispatch=fastest", "ffn.dispatch='fastest'")],
)
def test_component_options_fail_before_the_data_is_prepared(
    world: dict[str, Path], tmp_path: Path, option: str, message: str
) -> None:
    extra = [option] if option.startswith("mixin") else ["ffn=moe", option]
    cfg = smoke_config(world["corpus"], tmp_path / "cache", *extra)
    with pytest.raises(ArchiFactoryError, match=message):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "summary.json").exists()


def test_a_user_error_before_the_first_step_leaves_no_folder(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue #30: a run that wrote nothing but its config (the data was refused while loading) leaves no
    `status: failed` folder with an empty log behind."""

    def refused(*args, **kwargs):
        raise ArchiFactoryError("the corpus was refused")

    monkeypatch.setattr(setup, "load_data", refused)
    run_dir = tmp_path / "run"
    with pytest.raises(ArchiFactoryError, match="the corpus was refused"):
        train(config(world), run_dir)
    assert not run_dir.exists()


def test_a_refused_dataset_path_leaves_no_folder_and_says_it_does_not_exist(
    world: dict[str, Path], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()  # as Hydra makes it before the job runs
    missing = tmp_path / "no_such_corpus"
    with pytest.raises(ArchiFactoryError, match="does not exist"):
        train(config(world, f"dataset.path={missing}"), run_dir)
    assert not run_dir.exists()


def test_a_user_error_after_a_step_keeps_the_record(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_step = loop.train_step

    def fail_at_step_3(run):
        if run.state.step == 2:
            raise ArchiFactoryError("stopped at step 3")
        return real_step(run)

    monkeypatch.setattr(loop, "train_step", fail_at_step_3)
    run_dir = tmp_path / "run"
    with pytest.raises(ArchiFactoryError, match="stopped at step 3"):
        train(config(world), run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "stopped at step 3"


def test_a_user_error_in_a_directory_that_held_files_keeps_them(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    monkeypatch.setattr(setup, "load_data", lambda *a, **k: (_ for _ in ()).throw(ArchiFactoryError("no")))
    with pytest.raises(ArchiFactoryError):
        train(config(world), run_dir)
    assert (run_dir / "notes.txt").read_text() == "mine"

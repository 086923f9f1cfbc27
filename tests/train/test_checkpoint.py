"""Checkpoints in-process: the round trip, the sha256 and architecture checks, atomic publication.

The CLI tests show a user the same refusals end to end (subprocesses); these make the checks visible to
a mutation run, which only sees code executed in the test process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from archifactory.core.errors import ArchiFactoryError
from archifactory.train.checkpoint import (
    TrainerState,
    list_checkpoints,
    load_checkpoint,
    model_signature,
    save_checkpoint,
)

WEIGHTS = {"embed.weight": torch.arange(12.0).view(4, 3), "head.bias": torch.tensor([0.5, -1.0])}


def save(directory: Path, step: int = 5, keep: int = 3) -> Path:
    optimizer = {"optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": []}, "scheduler": {}}
    state = TrainerState(
        step=step, tokens_seen=step * 10, loader={"epoch": 1, "position": 8}, nonfinite_skipped=2
    )
    return save_checkpoint(directory, WEIGHTS, optimizer, state, keep)


def test_round_trip_restores_weights_optimizer_and_trainer_state(tmp_path: Path) -> None:
    path = save(tmp_path)
    assert path == tmp_path / "step_0000005" and list_checkpoints(tmp_path) == [path]
    loaded = load_checkpoint(path, model_signature(WEIGHTS))
    assert loaded.path == path and set(loaded.model_state) == set(WEIGHTS)
    for name, tensor in WEIGHTS.items():
        assert torch.equal(loaded.model_state[name], tensor)
    assert torch.equal(loaded.optimizer_state["optimizer"]["state"][0]["exp_avg"], torch.ones(2))
    assert loaded.trainer_state == TrainerState(5, 50, {"epoch": 1, "position": 8}, 2)
    meta = json.loads((path / "trainer_state.json").read_text())
    assert set(meta["sha256"]) == {"model.safetensors", "optimizer.pt", "rng.pt"}
    assert all(len(digest) == 64 for digest in meta["sha256"].values())


def test_weights_are_saved_as_fp32(tmp_path: Path) -> None:
    half = {name: t.to(torch.bfloat16) for name, t in WEIGHTS.items()}
    path = save_checkpoint(tmp_path, half, {}, TrainerState(1, 1, {}), keep=1)
    loaded = load_checkpoint(path, model_signature(half))
    assert all(t.dtype == torch.float32 for t in loaded.model_state.values())


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "rng.pt"])
@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_an_altered_or_missing_file_is_refused(tmp_path: Path, name: str, damage: str) -> None:
    path = save(tmp_path)
    file = path / name
    if damage == "flip":
        raw = bytearray(file.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        file.write_bytes(bytes(raw))
    else:
        file.unlink()
    with pytest.raises(ArchiFactoryError, match=f"corrupt.*{name}|{name}.*corrupt"):
        load_checkpoint(path, model_signature(WEIGHTS))


def test_unreadable_trainer_state_is_refused(tmp_path: Path) -> None:
    path = save(tmp_path)
    (path / "trainer_state.json").write_text("{truncated")
    with pytest.raises(ArchiFactoryError, match="unreadable|corrupt"):
        load_checkpoint(path, model_signature(WEIGHTS))


@pytest.mark.parametrize(
    "other",
    [
        {"embed.weight": [4, 3]},  # a parameter missing
        {"embed.weight": [4, 3], "head.bias": [2], "extra.weight": [1]},  # one more
        {"embed.weight": [4, 4], "head.bias": [2]},  # another shape
    ],
)
def test_another_architecture_is_refused_naming_the_difference(tmp_path: Path, other: dict) -> None:
    path = save(tmp_path)
    with pytest.raises(ArchiFactoryError, match="another architecture") as error:
        load_checkpoint(path, other)
    differing = {n for n in set(other) ^ set(WEIGHTS)} or {"embed.weight"}
    assert any(name in str(error.value) for name in differing)


def test_temporary_folders_are_never_listed_and_resaving_a_step_replaces_it(tmp_path: Path) -> None:
    (tmp_path / ".tmp_step_0000009").mkdir()  # what a save killed mid-write leaves behind
    (tmp_path / "notes").mkdir()
    first = save(tmp_path, step=5)
    assert list_checkpoints(tmp_path) == [first]
    again = save(tmp_path, step=5)  # a stop request right after a checkpoint step saves the same step
    assert again == first and list_checkpoints(tmp_path) == [first]
    load_checkpoint(again, model_signature(WEIGHTS))
    assert list_checkpoints(tmp_path / "missing") == []


def test_keep_zero_keeps_everything_and_keep_one_only_the_newest(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        save(tmp_path / "all", step=step, keep=0)
        save(tmp_path / "one", step=step, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path / "all")] == [
        "step_0000001",
        "step_0000002",
        "step_0000003",
    ]
    assert [p.name for p in list_checkpoints(tmp_path / "one")] == ["step_0000003"]


def _forge(path: Path, name: str, payload: bytes) -> None:
    """Replace a file and update its sha256 in trainer_state.json (what a crafted checkpoint would do)."""
    import hashlib

    (path / name).write_bytes(payload)
    meta = json.loads((path / "trainer_state.json").read_text())
    meta["sha256"][name] = hashlib.sha256(payload).hexdigest()
    (path / "trainer_state.json").write_text(json.dumps(meta))


def test_unreadable_weights_with_a_matching_checksum_are_refused(tmp_path: Path) -> None:
    path = save(tmp_path)
    _forge(path, "model.safetensors", b"not a safetensors file")
    with pytest.raises(ArchiFactoryError, match="unreadable weights"):
        load_checkpoint(path, model_signature(WEIGHTS))


EXECUTED: list[int] = []


class _Payload:
    def __reduce__(self):  # noqa: ANN204
        return (exec, ("import tests.train.test_checkpoint as t; t.EXECUTED.append(1)",))


@pytest.mark.parametrize("name", ["optimizer.pt", "rng.pt"])
def test_pickled_code_in_a_checkpoint_is_never_executed(tmp_path: Path, name: str) -> None:
    """optimizer.pt and rng.pt load with weights_only=True: tensors and plain containers, no code."""
    import io

    path = save(tmp_path)
    buffer = io.BytesIO()
    torch.save({"state": _Payload()}, buffer)
    _forge(path, name, buffer.getvalue())
    with pytest.raises(Exception):  # noqa: B017 (torch's unpickling error type is not public API)
        load_checkpoint(path, model_signature(WEIGHTS))
    assert EXECUTED == []


def test_save_creates_missing_parents_and_replaces_a_stale_temporary_of_the_same_step(tmp_path: Path) -> None:
    directory = tmp_path / "run" / "checkpoints"  # neither exists yet
    stale = directory / ".tmp_step_0000005"  # a save of this very step killed mid-write
    save(directory, step=4)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    path = save(directory, step=5)
    assert not stale.exists() and list_checkpoints(directory)[-1] == path
    load_checkpoint(path, model_signature(WEIGHTS))


def test_a_checkpoint_from_before_the_nonfinite_counter_loads_with_zero(tmp_path: Path) -> None:
    path = save(tmp_path)
    meta = json.loads((path / "trainer_state.json").read_text())
    del meta["nonfinite_skipped"]
    (path / "trainer_state.json").write_text(json.dumps(meta))
    assert load_checkpoint(path, model_signature(WEIGHTS)).trainer_state.nonfinite_skipped == 0

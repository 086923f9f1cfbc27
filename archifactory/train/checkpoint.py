"""Atomic, verifiable checkpoints that resume exactly.

Layout: `<run>/checkpoints/step_000050/` holding
- `model.safetensors`  — full (gathered) model weights, fp32;
- `optimizer.pt`       — optimizer + LR-scheduler state (torch.save, loaded with weights_only=True);
- `rng.pt`             — every RNG: torch CPU, CUDA, numpy, Python;
- `trainer_state.json` — step, tokens seen, data-loader position, the model's parameter signature, and
  the sha256 of the three files above.
A checkpoint is written into `.tmp_step_…` and renamed into place, so a crash mid-write leaves no
directory a resume would trust; the sha256 check catches a file truncated or altered afterwards.
Only rank 0 writes; older checkpoints beyond `keep` are deleted after the new one is in place. A write
that the disk refuses (ENOSPC, EIO, …) removes its temporary folder and stops the run with one line; the
previous checkpoint stays the resume point. Temporary folders a killed run left behind are removed by
the next save.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.files import share_as_umask_allows
from archifactory.core.hashing import file_digest
from archifactory.runs import layout
from archifactory.runs.checkpoints import list_checkpoints
from archifactory.runs.files import fsync_dir


@dataclass
class TrainerState:
    step: int  # optimizer steps completed
    tokens_seen: int
    loader: dict[str, Any]
    nonfinite_skipped: int = 0
    # the train-loss window still open at the checkpoint (mean over ranks of the summed step losses, and
    # its step count), so the first log step after a resume averages the same steps as without one
    loss_sum: float = 0.0
    loss_count: int = 0


def model_signature(state_dict: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {name: list(tensor.shape) for name, tensor in state_dict.items()}


def rng_state() -> dict[str, Any]:
    """Every RNG as plain tensors/lists, so the file loads with `weights_only=True`."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def remove_temporaries(directory: Path) -> None:
    """Delete `.tmp_step_*` folders: a killed or failed save's leftovers (one run holds the directory)."""
    if directory.is_dir():
        for path in directory.glob(f".tmp_{layout.CHECKPOINT_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    directory: Path,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    trainer_state: TrainerState,
    keep: int,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / layout.checkpoint_name(trainer_state.step)
    tmp = directory / f".tmp_{final.name}"
    remove_temporaries(directory)
    with disk_errors(final, tmp):
        _write(tmp, model_state, optimizer_state, trainer_state)
    return publish(tmp, final, keep)


@contextlib.contextmanager
def disk_errors(final: Path, tmp: Path) -> Iterator[None]:
    """A write the disk refuses: remove `tmp` and stop with one line naming the resume point left."""
    try:
        yield
    except (
        OSError,
        RuntimeError,
        SafetensorError,
    ) as error:  # torch.save reports a full disk as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        earlier = list_checkpoints(final.parent)
        keeps = f"{earlier[-1]} stays the resume point" if earlier else "no earlier checkpoint exists"
        try:
            free = f"{shutil.disk_usage(final.parent).free / 2**20:,.1f} MiB free there"
        except OSError:
            free = "free space unknown"
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
        raise ArchiFactoryError(
            f"could not write checkpoint {final} ({reason}; {free}); {keeps}. "
            "Free some space, then continue with trainer.resume=true"
        ) from error


def publish(tmp: Path, final: Path, keep: int) -> Path:
    """Rename a fully written `tmp` into place as `final` (replacing a same-step one), then keep `keep`."""
    directory = final.parent
    with disk_errors(final, tmp):
        if final.exists():  # the same step saved again (a stop request right after a checkpoint step)
            old = directory / f".tmp_old_{final.name}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(directory)
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def sync_files(folder: Path) -> None:
    """Make the bytes under `folder` durable before a rename publishes them."""
    share_as_umask_allows(folder)  # safetensors writes its file 0600
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def _write(
    tmp: Path,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    trainer_state: TrainerState,
) -> None:
    tmp.mkdir()
    weights = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in model_state.items()}
    save_file(weights, str(tmp / "model.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    meta = {
        "step": trainer_state.step,
        "tokens_seen": trainer_state.tokens_seen,
        "loader": trainer_state.loader,
        "nonfinite_skipped": trainer_state.nonfinite_skipped,
        "loss_sum": trainer_state.loss_sum,
        "loss_count": trainer_state.loss_count,
        "model_signature": model_signature(weights),
        "sha256": {name: file_digest(tmp / name) for name in ("model.safetensors", "optimizer.pt", "rng.pt")},
    }
    (tmp / layout.TRAINER_STATE).write_text(json.dumps(meta, indent=1))
    sync_files(tmp)


@dataclass
class LoadedCheckpoint:
    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    rng: dict[str, Any]
    trainer_state: TrainerState


# trainer_state.json keys a resume needs, with the JSON type each must have
META_KEYS: dict[str, type | tuple[type, ...]] = {
    "step": int,
    "tokens_seen": int,
    "loader": dict,
    "model_signature": dict,
    "sha256": dict,
}
FILES = ("model.safetensors", "optimizer.pt", "rng.pt")
DCP_FILES = (layout.DCP_EXTRA,)  # a sharded checkpoint's hashed file; its shards are checked by size


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """`trainer_state.json` of a checkpoint whose files all pass their sha256; else one clear line."""
    fix = "delete that folder to resume from an earlier checkpoint"
    try:
        meta = json.loads((path / layout.TRAINER_STATE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArchiFactoryError(f"checkpoint {path} is unreadable ({error}); {fix}") from error
    if not isinstance(meta, dict):
        raise ArchiFactoryError(f"checkpoint {path}: trainer_state.json is not a JSON object; {fix}")
    broken = [key for key, kind in META_KEYS.items() if not isinstance(meta.get(key), kind)]
    sharded = meta.get("format") == "dcp"
    if not broken and sorted(meta["sha256"]) != sorted(DCP_FILES if sharded else FILES):
        broken = ["sha256"]
    if not broken and sharded and not isinstance(meta.get("dcp_files"), dict):
        broken = ["dcp_files"]
    if broken:
        raise ArchiFactoryError(
            f"checkpoint {path}: trainer_state.json lacks or mangles {', '.join(broken)}; {fix}"
        )
    for name, digest in meta["sha256"].items():
        file = path / name
        if not file.is_file() or file_digest(file) != digest:
            raise ArchiFactoryError(f"checkpoint {path} is corrupt ({name} fails its sha256 check); {fix}")
    for name, size in meta.get("dcp_files", {}).items() if sharded else ():
        file = path / layout.DCP_DIR / name
        if not file.is_file() or file.stat().st_size != size:
            raise ArchiFactoryError(f"checkpoint {path} is incomplete ({layout.DCP_DIR}/{name}); {fix}")
    return meta


def load_checkpoint(path: Path, expected_signature: dict[str, list[int]]) -> LoadedCheckpoint:
    """Load and verify a checkpoint; refuse a corrupt or mismatched one with one clear line."""
    meta = verify_checkpoint(path)
    if meta["model_signature"] != expected_signature:
        theirs, ours = set(meta["model_signature"]), set(expected_signature)
        detail = (
            sorted(theirs ^ ours)[:3]
            or [n for n in ours if meta["model_signature"][n] != expected_signature[n]][:3]
        )
        raise ArchiFactoryError(
            f"checkpoint {path} belongs to another architecture (differs at {', '.join(detail)}); "
            "resume with the config that wrote it, or start a fresh run directory"
        )
    try:
        model_state = load_file(str(path / "model.safetensors"))
    except SafetensorError as error:
        raise ArchiFactoryError(f"checkpoint {path} has unreadable weights ({error}); delete it") from error
    try:
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
        rng = torch.load(path / "rng.pt", weights_only=True)
    except Exception as error:  # sha256 matched, so this is a file written by another torch version
        raise ArchiFactoryError(f"checkpoint {path} cannot be loaded by this torch ({error})") from error
    trainer_state = TrainerState(
        meta["step"],
        meta["tokens_seen"],
        meta["loader"],
        meta.get("nonfinite_skipped", 0),
        float(meta.get("loss_sum", 0.0)),
        int(meta.get("loss_count", 0)),
    )
    return LoadedCheckpoint(path, model_state, optimizer_state, rng, trainer_state)

"""Finding and reading a run's finished checkpoints (`checkpoints/step_NNNNNNN/`).

Writing them is the training loop's (`archifactory.train.checkpoint`); what a reader may trust is decided
here: only renamed-into-place folders, and weights that match the sha256 their `trainer_state.json` records.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.hashing import file_digest
from archifactory.runs import layout


def list_checkpoints(folder: Path) -> list[Path]:
    """The finished checkpoints in a `checkpoints/` folder, oldest first: renamed-into-place folders only,
    never the `.tmp_…` folders of an interrupted write."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(layout.CHECKPOINT_PREFIX))


def finished_checkpoints(run_dir: Path) -> list[Path]:
    """The finished checkpoints of a run directory, oldest first."""
    return list_checkpoints(layout.checkpoints_dir(run_dir))


def pick_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    """The newest finished checkpoint, or the one at `step`; a one-line error when there is none."""
    found = finished_checkpoints(run_dir)
    if not found:
        raise ArchiFactoryError(
            f"run {run_dir} has no finished checkpoint (checkpoints/step_*); train it (further) first"
        )
    if step is None:
        return found[-1]
    for path in found:
        if layout.checkpoint_step(path) == step:
            return path
    steps = ", ".join(str(layout.checkpoint_step(p)) for p in found)
    raise ArchiFactoryError(f"run {run_dir} has no checkpoint at step {step}; it has: {steps}")


def is_sharded(checkpoint: Path) -> bool:
    """A `trainer.checkpoint_format=dcp` checkpoint: every rank's shards under `dcp/`."""
    return (checkpoint / layout.DCP_DIR).is_dir()


def load_checkpoint_weights(checkpoint: Path) -> tuple[dict[str, torch.Tensor], int]:
    """(model weights, step) of one checkpoint folder, verified against its recorded sha256 (a sharded
    one: its shard files against their recorded sizes, then consolidated in this process)."""
    fix = "pick another checkpoint or retrain"
    try:
        meta = json.loads((checkpoint / layout.TRAINER_STATE).read_text())
        step = int(meta["step"])
        digest = None if is_sharded(checkpoint) else meta["sha256"]["model.safetensors"]
        sizes = meta["dcp_files"] if is_sharded(checkpoint) else {}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ArchiFactoryError(
            f"checkpoint {checkpoint} has no readable {layout.TRAINER_STATE} ({error}); {fix}"
        ) from error
    if digest is None:
        return consolidate_sharded(checkpoint, sizes), step
    weights = checkpoint / "model.safetensors"
    if not weights.is_file() or file_digest(weights) != digest:
        raise ArchiFactoryError(
            f"checkpoint {checkpoint} is damaged (model.safetensors fails its sha256); {fix}"
        )
    try:
        return load_file(str(weights)), step
    except (SafetensorError, OSError) as error:
        raise ArchiFactoryError(f"checkpoint {checkpoint} has unreadable weights ({error}); {fix}") from error


def consolidate_sharded(checkpoint: Path, sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """The full model weights of a DCP checkpoint, read into this one process (no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = checkpoint / layout.DCP_DIR
    for name, size in sizes.items():
        if not (folder / name).is_file() or (folder / name).stat().st_size != size:
            raise ArchiFactoryError(
                f"checkpoint {checkpoint} is incomplete ({layout.DCP_DIR}/{name}); pick another checkpoint or retrain"
            )
    reader = dcp.FileSystemReader(str(folder))
    prefix = "model."
    weights = {
        key.removeprefix(prefix): torch.empty(item.size, dtype=item.properties.dtype)
        for key, item in reader.read_metadata().state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(item, TensorStorageMetadata)
    }
    state = {"model": weights}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return {name: tensor.float() for name, tensor in state["model"].items()}

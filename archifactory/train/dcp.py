"""Sharded checkpoints with torch.distributed.checkpoint (DCP): `trainer.checkpoint_format=dcp`.

Every rank writes its own shards of the model and optimizer (`get_state_dict`: FSDP2's DTensor shards,
plain tensors otherwise) into `step_NNNNNNN/dcp/`; rank 0 adds `extra.pt` (LR schedule, RNG) and
`trainer_state.json` (`format: dcp`, the sha256 of extra.pt, the size of every shard file). Nothing is
gathered on one rank, so a 1B model's optimizer state never has to fit in one process's memory.

Like the full format, a checkpoint is written into `.tmp_step_…` and renamed into place by rank 0 once
every rank's shards are on disk. Loading reshards: DCP reads each rank's slice of every tensor from the
saved layout, so a checkpoint of 2 FSDP ranks resumes under 1 process or N ranks alike.

`trainer.async_checkpoint=true`: the shards are staged in memory and written in the background
(`dcp.async_save`) while training continues; the checkpoint is published (renamed) when the next checkpoint
starts or the run ends, so a crash meanwhile leaves only a `.tmp_` folder and the previous resume point.

`torch.distributed.checkpoint` is imported by the functions that save and load a sharded checkpoint, not at
the top: it brings DTensor and sympy (0.8 s), which every training process would otherwise pay at start
whatever its checkpoint format (as `runs/checkpoints.py` does for consolidating one).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.hashing import file_digest
from archifactory.runs import layout
from archifactory.train.checkpoint import (
    TrainerState,
    disk_errors,
    model_signature,
    publish,
    remove_temporaries,
    rng_state,
    sync_files,
)

log = logging.getLogger(__name__)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@dataclass
class PendingSave:
    """A checkpoint whose shards are being written in the background (async) or are written (sync)."""

    tmp: Path
    final: Path
    keep: int
    meta: dict[str, Any]
    future: Any = None  # dcp.async_save's future, None when written synchronously


def start_save(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler_state: dict[str, Any],
    trainer_state: TrainerState,
    keep: int,
    asynchronous: bool,
) -> PendingSave:
    """Every rank: write (or start writing) this rank's shards into the step's temporary folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    is_main = not dist.is_initialized() or dist.get_rank() == 0
    final = directory / layout.checkpoint_name(trainer_state.step)
    tmp = directory / f".tmp_{final.name}"
    if is_main:
        directory.mkdir(parents=True, exist_ok=True)
        remove_temporaries(directory)
        with disk_errors(final, tmp):
            tmp.mkdir()
            torch.save({"scheduler": scheduler_state, "rng": rng_state()}, tmp / layout.DCP_EXTRA)
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    meta = asdict(trainer_state) | {"format": "dcp", "model_signature": model_signature(model_state)}
    pending = PendingSave(tmp, final, keep, meta)
    with disk_errors(final, tmp):
        if asynchronous:
            pending.future = dcp.async_save(state, checkpoint_id=tmp / layout.DCP_DIR)
        else:
            dcp.save(state, checkpoint_id=tmp / layout.DCP_DIR)
    return pending


def finish_save(pending: PendingSave) -> Path:
    """Every rank: wait for the shards, then rank 0 records their sizes and publishes the checkpoint."""
    with disk_errors(pending.final, pending.tmp):
        if pending.future is not None:
            result = pending.future
            result = getattr(result, "upload_completion", result)  # AsyncSaveResponse or a Future
            result.result()
    _barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        tmp = pending.tmp
        with disk_errors(pending.final, tmp):
            shards = tmp / layout.DCP_DIR
            pending.meta["dcp_files"] = {p.name: p.stat().st_size for p in sorted(shards.iterdir())}
            pending.meta["sha256"] = {layout.DCP_EXTRA: file_digest(tmp / layout.DCP_EXTRA)}
            (tmp / layout.TRAINER_STATE).write_text(json.dumps(pending.meta, indent=1))
            sync_files(tmp)
        publish(tmp, pending.final, pending.keep)
    _barrier()
    return pending.final


def load_sharded(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, expected_signature: dict[str, list[int]]
) -> tuple[dict[str, Any], TrainerState]:
    """Every rank: load its slice of model and optimizer state from a DCP checkpoint (any saved world
    size); returns (extra.pt: schedule and RNG, trainer state). The checkpoint was verified by the caller."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    meta = json.loads((path / layout.TRAINER_STATE).read_text())
    if meta["model_signature"] != expected_signature:
        differ = (
            sorted(set(meta["model_signature"]) ^ set(expected_signature))[:3]
            or [n for n in expected_signature if meta["model_signature"][n] != expected_signature[n]][:3]
        )
        raise ArchiFactoryError(
            f"checkpoint {path} belongs to another architecture (differs at {', '.join(differ)}); "
            "resume with the config that wrote it, or start a fresh run directory"
        )
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=path / layout.DCP_DIR)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    extra = torch.load(path / layout.DCP_EXTRA, weights_only=True)
    fields = TrainerState.__dataclass_fields__
    return extra, TrainerState(**{k: v for k, v in meta.items() if k in fields})

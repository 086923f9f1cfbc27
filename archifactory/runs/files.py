"""Atomic writes and defensive reads: a reader of a run file sees the old bytes or the new ones, never half.

`write_atomic` writes a sibling temporary file, fsyncs it, renames it over the target and fsyncs the
folder. `summary.json`, `.hydra/config.yaml`, `.hydra/overrides.yaml`, eval results and a trimmed
`metrics.jsonl` go through it; checkpoints use the same pattern for a whole folder (`train/checkpoint.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (best effort: some filesystems refuse a directory fsync)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace `path` with `data` atomically (temp + fsync + rename); on failure the old file is untouched."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with tmp.open("wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def remove_stale_writes(folder: Path) -> None:
    """Delete `.<name>.tmp-<pid>` files a killed `write_atomic` left in `folder` (its lock is held)."""
    for stale in folder.glob(".*.tmp-*") if folder.is_dir() else []:
        with contextlib.suppress(OSError):
            stale.unlink()


def is_empty(run_dir: Path) -> bool:
    """True when `run_dir` is missing or holds nothing (Hydra made it for this command): a refusal or a
    failure before the first step may then remove it again without losing anyone's record."""
    return not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir()))


def discard(run_dir: Path) -> None:
    """Remove a run directory that holds nothing but what this command wrote before its first step (the
    config, an empty log, a `failed` summary): best effort, a leftover is only a folder to delete."""
    shutil.rmtree(run_dir, ignore_errors=True)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(payload, indent=1, default=str) + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None when it is missing, empty, torn or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None

"""The run directory as a record that is never lost: a lock, atomic writes, defensive reads.

- **Lock.** `RunDirLock` holds an exclusive `flock` on `<run>/.archifactory.lock` for the whole run and
  writes the holder's pid, host and start time into it, so a second command on the same directory fails
  with one line naming the holder. The kernel drops the lock when its process dies (even on `kill -9`),
  so a lock file left behind is stale by construction: the next run takes it over and says so.
- **Atomic writes.** `write_atomic` writes a sibling temporary file, fsyncs it, renames it over the
  target and fsyncs the folder: a reader sees the old bytes or the new ones, never half of each.
  `summary.json`, `.hydra/config.yaml`, `.hydra/overrides.yaml` and a trimmed `metrics.jsonl` go
  through it; checkpoints use the same pattern for a whole folder (`checkpoint.py`).
- **Defensive reads.** `read_metrics` drops a torn last line (a kill mid-append) with a warning and skips
  any other line that is not a JSON object; `read_summary` returns None for a missing or damaged
  `summary.json` (and `rebuild_summary` recovers what the metrics and checkpoints still say).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from archifactory.errors import ArchiFactoryError

log = logging.getLogger(__name__)

LOCK_NAME = ".archifactory.lock"


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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
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


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """`summary.json`, or None (with a warning when the file exists but is damaged)."""
    path = run_dir / "summary.json"
    summary = read_json(path)
    if summary is None and path.exists():
        log.warning("%s is damaged (empty, torn or not a JSON object); ignoring it", path)
    return summary


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of `metrics.jsonl`; a torn last line is dropped with a warning, other bad lines skipped."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            where = "its torn last line" if number == len(lines) else f"line {number} (not a JSON object)"
            log.warning("%s: dropping %s", path, where)
            continue
        records.append(record)
    return records


def rewrite_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(record) + "\n" for record in records))


def rebuild_summary(
    run_dir: Path, base: dict[str, Any], checkpoint_meta: dict[str, Any] | None
) -> dict[str, Any]:
    """What a damaged `summary.json` can be rebuilt from: the last checkpoint and the logged metrics."""
    summary = dict(base)
    if checkpoint_meta:
        summary.update(steps=checkpoint_meta.get("step"), tokens_seen=checkpoint_meta.get("tokens_seen"))
    for record in read_metrics(run_dir / "metrics.jsonl"):
        if checkpoint_meta and record.get("step", 0) > checkpoint_meta.get("step", 0):
            break
        for key in ("train_loss", "val_loss", "val_bpb"):
            if record.get(key) is not None:
                summary[key] = record[key]
    summary["rebuilt"] = True
    return summary


def _holder(fd: int) -> dict[str, Any] | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        value = json.loads(os.read(fd, 4096) or b"null")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} on {holder.get('host')} (since {holder.get('started')})"


class RunDirLock:
    """An exclusive lock on a run directory for one command's lifetime (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = _holder(fd)
                os.close(fd)
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise ArchiFactoryError(
                    f"{self.run_dir} is in use by another run ({_describe(holder)}); wait for it to finish "
                    "or pick another run_name=<name>"
                ) from None
            # the previous holder unlinks the file before unlocking it: if ours is gone, lock the new one
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _holder(fd)
        if stale:
            log.warning(
                "%s: taking over a stale lock of %s (that process is gone)", self.run_dir, _describe(stale)
            )
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with contextlib.suppress(OSError):  # a full disk may refuse these bytes; the flock still holds
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(me).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def locked(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """`RunDirLock` on the main rank; the other ranks of a distributed run share rank 0's claim."""
    if not enabled:
        yield
        return
    with RunDirLock(run_dir):
        yield

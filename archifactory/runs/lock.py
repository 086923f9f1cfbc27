"""Locks on a run directory.

- `RunDirLock` holds an exclusive `flock` on `<run>/.archifactory.lock` for the whole run and writes the
  holder's pid, host and start time into it, so a second command on the same directory fails with one
  line naming the holder. The kernel drops the lock when its process dies (even on `kill -9`), so a lock
  file left behind is stale by construction: the next run takes it over and says so.
- `summary_lock` is held only for one read-modify-write of `summary.json` (`runs.records`): commands that
  do not own the run (`archifactory eval`) still write their section of the summary safely.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from archifactory.core.errors import ArchiFactoryError
from archifactory.runs import layout

log = logging.getLogger(__name__)


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
        self.path = run_dir / layout.LOCK
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


@contextlib.contextmanager
def summary_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive, blocking, short: one read-modify-write of `summary.json` at a time."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(run_dir) / layout.SUMMARY_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock

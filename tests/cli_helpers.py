"""`archifactory …` run inside the test process, for tests of what a command prints and writes.

A subprocess costs several seconds of CPU (python + torch + Hydra imports) before the command starts; most
CLI tests check the one `error:` line, the exit code and the files, not the process. `run_cli` calls
`archifactory.cli.main.main` as `python -m archifactory` does (`sys.exit(main())`), with the output of
file descriptors 1 and 2 captured as a subprocess's would be, and gives back the same
`subprocess.CompletedProcess`. What a command may change in the process (cwd, argv, environment, logging
handlers, signal handlers, torch threads, warning filters) is put back afterwards. Tests of process
behaviour (SIGKILL, signals, sandboxes, several processes, `--debug` tracebacks) keep a real subprocess.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from archifactory.cli.main import main

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m archifactory *args` in `cwd` (with `env` added to the environment), in this process."""
    with _restored_process(cwd, env), _captured_fds() as (out, err):
        try:
            code = main(list(args))
        except SystemExit as stop:  # Hydra apps exit with sys.exit(1)
            code = _exit_status(stop.code)
    return subprocess.CompletedProcess(["archifactory", *args], code, out.text, err.text)


def _exit_status(code: object) -> int:
    """The status `sys.exit(code)` gives a process; a message is printed on stderr, as Python does."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


class _Captured:
    """One captured stream: the text written to it, once the capture has ended."""

    text = ""


@contextlib.contextmanager
def _captured_fds() -> Iterator[tuple[_Captured, _Captured]]:
    """Descriptors 1 and 2 (and `sys.stdout`/`sys.stderr` over them) into temporary files."""
    captured = (_Captured(), _Captured())
    streams = sys.stdout, sys.stderr
    for stream in streams:
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        open(1, "w", encoding="utf-8", errors="replace", closefd=False, buffering=1) as new_out,
        open(2, "w", encoding="utf-8", errors="replace", closefd=False, buffering=1) as new_err,
    ):
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout, sys.stderr = new_out, new_err
        try:
            yield captured
        finally:
            new_out.flush()
            new_err.flush()
            sys.stdout, sys.stderr = streams
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
            for holder, file in zip(captured, (out, err)):
                file.seek(0)
                holder.text = file.read().decode("utf-8", errors="replace")


@contextlib.contextmanager
def _restored_process(cwd: Path, env: dict[str, str] | None) -> Iterator[None]:
    """cwd, argv, environment, root logger, signal handlers, torch threads and warnings as they were."""
    previous_cwd, argv, environ = os.getcwd(), list(sys.argv), dict(os.environ)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    handlers_by_signal = {sig: signal.getsignal(sig) for sig in SIGNALS}
    threads = torch.get_num_threads()
    root.handlers[:] = []  # as in a fresh interpreter (an earlier in-process command may have left some)
    root.setLevel(logging.WARNING)
    os.environ.update(env or {})
    os.chdir(cwd)
    try:
        with warnings.catch_warnings():
            # as in a fresh interpreter: library warnings are printed on stderr (each place once),
            # deprecations outside __main__ are not
            warnings.showwarning = _print_warning
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            yield
    finally:
        os.chdir(previous_cwd)
        sys.argv[:] = argv
        os.environ.clear()
        os.environ.update(environ)
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        for sig, handler in handlers_by_signal.items():
            signal.signal(sig, handler)
        torch.set_num_threads(threads)


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

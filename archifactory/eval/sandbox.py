"""Run model-written Python in a separate, contained process: bubblewrap, else unshare, else refuse.

HumanEval executes code that a model wrote. The reference harness runs it in a forked worker of the
evaluating process behind a "reliability guard" that monkeypatches `os` — its own docstring says it is not
a sandbox. Here every program runs in a fresh process under a kept sandbox tool:

- `bwrap` (bubblewrap, the sandbox of Flatpak): new PID, network, IPC and UTS namespaces (a user namespace
  too when not root); a filesystem made of the read-only `/usr` (+ `/bin`, `/lib*` links) and the
  read-only Python install, a fresh size-capped tmpfs at `/tmp` (the only writable place and the working
  directory), minimal `/dev` and the namespace's own `/proc`; no home, no `/etc`, no run directory; an
  empty environment; `--die-with-parent`, `--new-session`, all capabilities dropped.
- `unshare` (util-linux), when bwrap is missing or cannot create its namespaces: new PID, network, IPC,
  UTS and mount namespaces (a user namespace when not root); the launcher then remounts every mount
  read-only, puts a fresh tmpfs on `/tmp` and empty read-only tmpfs over `/root`, `/home` and `$HOME`.
  The rest of the host filesystem stays *readable* with the sandbox user's permissions.
- `none`, only with `allow_unsandboxed=True`: a plain subprocess with the limits, an empty environment and
  a temporary working directory; it can read and write what its user can and reach the network.

In every mode: `resource` limits on CPU seconds, address space, file size and process count (set in the
sandbox by `sandbox_launcher.py`), stdin closed, stdout/stderr captured up to a cap and the rest discarded,
and a wall-clock timeout that SIGKILLs the process group (and with it, through the PID namespace, every
process the program started). Running as root, the launcher drops to an unprivileged uid of its own per
worker slot and evaluating process (root ignores RLIMIT_NPROC, and a shared uid would share the process
budget).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from archifactory.core.errors import ArchiFactoryError

MODES = ("auto", "bwrap", "unshare", "none")
# Unprivileged uids the launcher takes when the evaluator is root: one per worker slot, far above any
# distribution's user and subordinate-uid ranges; each evaluating process gets its own block (by pid), so
# concurrent evaluations never share a process budget.
SLOT_UID_BASE = 1_610_612_736
SLOTS_PER_PROCESS = 256


def slot_uids(pid: int | None = None) -> range:
    """The uids the sandboxes of process `pid` (default: this one) run as when it is root."""
    start = SLOT_UID_BASE + ((os.getpid() if pid is None else pid) % (1 << 22)) * SLOTS_PER_PROCESS
    return range(start, start + SLOTS_PER_PROCESS)


LAUNCHER = (Path(__file__).parent / "sandbox_launcher.py").read_text()

PASSED, FAILED, TIMED_OUT, KILLED = "passed", "failed", "timed out", "killed by a limit"
SIGNAL_LIMITS = {signal.SIGXFSZ: "file size"}


@dataclass(frozen=True)
class Limits:
    """What one program may use. The wall clock covers start-up of the sandbox as well."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    # memory_bytes x processes bounds what one sandbox can make resident (address space is per process)
    memory_bytes: int = 1 << 30  # address space (RLIMIT_AS)
    file_bytes: int = 16 << 20  # largest file it may write (RLIMIT_FSIZE)
    processes: int = 8  # processes and threads of the sandbox user (RLIMIT_NPROC)
    tmpfs_bytes: int = 64 << 20  # size of its writable tmpfs
    output_bytes: int = 16 << 10  # stdout + stderr kept; the rest is read and dropped


@dataclass(frozen=True)
class Execution:
    """How one program ended: `outcome` is passed | failed | timed out | killed by a limit."""

    outcome: str
    detail: str
    seconds: float
    output: str


def _python() -> str:
    """The base interpreter (a venv's python is a link to it; `-I -S` keeps site-packages out)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _python_roots() -> list[str]:
    """The directories of the Python install the sandbox must see (stdlib, lib-dynload, libpython)."""
    roots = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
    roots.add(os.path.dirname(os.path.dirname(_python())))
    return sorted(r for r in roots if not r.startswith("/usr/") and r != "/usr")


def bwrap_command(workdir: str, limits: Limits, root: bool) -> list[str]:
    """bwrap arguments for a sandbox with nothing of the evaluator but the read-only Python install."""
    bwrap = shutil.which("bwrap") or "/usr/bin/bwrap"
    command = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts"]
    command += ["--unshare-cgroup-try", "--die-with-parent", "--new-session", "--clearenv"]
    # root keeps CAP_SETUID/SETGID just long enough for the launcher to drop to its slot uid; otherwise a
    # user namespace (in which the sandbox may not create further ones) and no capabilities at all
    if root:
        command += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        command += ["--unshare-user", "--disable-userns", "--cap-drop", "ALL"]
    command += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(top):
            command += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            command += ["--ro-bind", top, top]
    made: set[str] = set()
    for path in _python_roots():
        # bwrap would create the missing parents with the host's mode (/root is 0700), which the slot
        # uid could not traverse
        for parent in reversed(Path(path).parents):
            if str(parent) != "/" and str(parent) not in made:
                made.add(str(parent))
                command += ["--perms", "0755", "--dir", str(parent)]
        command += ["--ro-bind", path, path]
    command += ["--proc", "/proc", "--dev", "/dev"]
    command += ["--perms", "1777", "--size", str(limits.tmpfs_bytes), "--tmpfs", workdir, "--chdir", workdir]
    command += ["--hostname", "sandbox", "--"]
    return command


def unshare_command(root: bool) -> list[str]:
    unshare = shutil.which("unshare") or "/usr/bin/unshare"
    command = [
        unshare,
        "--pid",
        "--fork",
        "--kill-child",
        "--mount",
        "--mount-proc",
        "--net",
        "--ipc",
        "--uts",
    ]
    if not root:
        command += ["--user", "--map-root-user"]
    return [*command, "--"]


def _probe(mode: str) -> str | None:
    """None when `mode` can run a program here, else why not (one line)."""
    tool = "bwrap" if mode == "bwrap" else "unshare"
    if shutil.which(tool) is None and not os.path.exists(f"/usr/bin/{tool}"):
        return f"{tool} is not installed"
    try:
        result = Sandbox(mode, Limits(wall_seconds=20.0)).run("pass")
    except OSError as error:
        return f"{tool} failed to start: {error}"
    if result.outcome != PASSED:
        return f"{tool} cannot create its namespaces here: {result.output.strip()[-200:] or result.detail}"
    return None


@functools.cache
def available_mode(requested: str = "auto", allow_unsandboxed: bool = False) -> str:
    """The sandbox mode to use: `requested`, or for `auto` the first of bwrap, unshare that works here.

    With neither, `none` only when `allow_unsandboxed`; otherwise a one-line `ArchiFactoryError`.
    """
    if requested not in MODES:
        raise ArchiFactoryError(f"unknown sandbox mode {requested!r}; choose one of: {', '.join(MODES)}")
    if requested == "none":
        if not allow_unsandboxed:
            raise ArchiFactoryError(
                "sandbox=none runs model-written code unconfined; add eval.allow_unsandboxed=true"
            )
        return "none"
    reasons = []
    for mode in ("bwrap", "unshare") if requested == "auto" else (requested,):
        reason = _probe(mode)
        if reason is None:
            return mode
        reasons.append(reason)
    if requested == "auto" and allow_unsandboxed:
        return "none"
    raise ArchiFactoryError(
        f"no sandbox to run model-written code: {'; '.join(reasons)}. Install bubblewrap (apt-get install "
        "bubblewrap) or, knowing the code runs unconfined, pass eval.allow_unsandboxed=true"
    )


def _user_process_count() -> int:
    """Processes of this uid (RLIMIT_NPROC counts them all in `none` mode)."""
    uid, count = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                count += entry.stat().st_uid == uid
    return count


class Sandbox:
    """Runs Python programs, one fresh contained process each; safe to call from several threads.

    `mode`: bwrap | unshare | none, already resolved by `available_mode`. `slot` in `run` numbers the
    concurrent callers (worker index) so that, as root, each one gets its own unprivileged uid.
    """

    def __init__(self, mode: str, limits: Limits | None = None) -> None:
        if mode not in ("bwrap", "unshare", "none"):
            raise ValueError(f"resolve the sandbox mode first (got {mode!r})")
        self.mode = mode
        self.limits = limits or Limits()
        self.root = os.geteuid() == 0

    def _command(self, settings: dict) -> tuple[list[str], str | None]:
        """The argv and the working directory on the host (none mode only)."""
        python = [_python(), "-I", "-S", "-c", LAUNCHER]
        if self.mode == "bwrap":
            return bwrap_command(settings["workdir"], self.limits, self.root) + python, None
        if self.mode == "unshare":
            settings["isolate_filesystem"] = True
            masks = {"/root", "/home", os.path.expanduser("~")}
            settings["masks"] = sorted(m for m in masks if m not in ("/", settings["workdir"]))
            settings["keep"] = _python_roots()
            return unshare_command(self.root) + python, None
        host_dir = tempfile.mkdtemp(prefix="archifactory-sandbox-")
        os.chmod(host_dir, 0o1777)
        settings["workdir"] = host_dir
        if not self.root:
            settings["processes"] += _user_process_count()
        return python, host_dir

    def run(self, source: str, slot: int = 0) -> Execution:
        """Run `source` as `__main__`; passed only if it ran to its end (its asserts held)."""
        limits = self.limits
        nonce = secrets.token_hex(16)
        program_read, program_write = os.pipe()
        result_read, result_write = os.pipe()
        settings = {
            "program_fd": program_read,
            "result_fd": result_write,
            "nonce": nonce,
            "workdir": "/tmp",
            "cpu_seconds": limits.cpu_seconds,
            "memory_bytes": limits.memory_bytes,
            "file_bytes": limits.file_bytes,
            "processes": limits.processes,
            "tmpfs_bytes": limits.tmpfs_bytes,
            # none mode runs as the caller: the slot uid may not even reach a Python install under /root
            "drop_to_uid": slot_uids()[slot % SLOTS_PER_PROCESS]
            if self.root and self.mode != "none"
            else None,
            "isolate_filesystem": False,
            "masks": [],
            "keep": [],
        }
        command, host_dir = self._command(settings)
        start = time.perf_counter()
        try:
            process = subprocess.Popen(
                [*command, json.dumps(settings)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={},
                close_fds=True,
                pass_fds=(program_read, result_write),
                start_new_session=True,
                cwd=host_dir or "/",
            )
        except BaseException:
            for fd in (program_write, result_read):
                os.close(fd)
            if host_dir is not None:
                shutil.rmtree(host_dir, ignore_errors=True)
            raise
        finally:
            os.close(program_read)
            os.close(result_write)
        try:
            # the program goes through a pipe written from a thread, so no size can block the start
            writer = threading.Thread(target=_write_all, args=(program_write, source.encode()), daemon=True)
            writer.start()
            output = _Drain(process.stdout, limits.output_bytes)
            try:
                timed_out = not _wait_unreaped(process, limits.wall_seconds)
            finally:
                _kill_group(process)
            seconds = time.perf_counter() - start
            text = output.text()
            report = _read_report(result_read, nonce)
        finally:
            os.close(result_read)
            if host_dir is not None:
                shutil.rmtree(host_dir, ignore_errors=True)
        return _classify(process.returncode, timed_out, report, seconds, text)


def _write_all(fd: int, data: bytes) -> None:
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
    except OSError:  # the sandbox died before reading its program
        pass


class _Drain:
    """Reads a stream to its end in a thread, keeping the first `keep` bytes."""

    def __init__(self, stream, keep: int) -> None:
        self.stream, self.keep, self.kept = stream, keep, bytearray()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with self.stream:
            while chunk := self.stream.read1(65536):
                if len(self.kept) < self.keep:
                    self.kept += chunk[: self.keep - len(self.kept)]

    def text(self) -> str:
        # a process outside the sandbox's PID namespace (none mode) may hold the pipe; don't wait for it
        self.thread.join(timeout=2.0)
        return self.kept.decode(errors="replace")


def _wait_unreaped(process: subprocess.Popen, timeout: float) -> bool:
    """Wait up to `timeout` s for the process to end, leaving it a zombie; True if it ended.

    Not reaping it keeps its pid, and so its process group id, from being reused before `_kill_group`.
    A pidfd becomes readable when the process ends; without one (old kernels), poll with WNOWAIT.
    """
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            return bool(poller.poll(timeout * 1000))
        finally:
            os.close(pidfd)
    deadline, delay = time.monotonic() + timeout, 0.001
    while os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(2 * delay, 0.02)
    return True


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the process group, then reap; in bwrap/unshare the PID namespace takes every descendant."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _read_report(fd: int, nonce: str) -> str | None:
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 4096):
            data += chunk
    except BlockingIOError:
        pass
    for line in data.decode(errors="replace").splitlines():
        tag, _, rest = line.partition(" ")
        if tag == nonce:
            return rest
    return None


def _classify(returncode: int, timed_out: bool, report: str | None, seconds: float, output: str) -> Execution:
    if timed_out:
        return Execution(TIMED_OUT, "wall clock", seconds, output)
    if report == "passed" and returncode == 0:
        return Execution(PASSED, "", seconds, output)
    if report is not None and report.startswith("limit "):
        return Execution(KILLED, report.removeprefix("limit "), seconds, output)
    if report is not None and report.startswith("failed"):
        return Execution(FAILED, report.removeprefix("failed").strip(), seconds, output)
    # no report: the process ended early; bwrap and the launcher's init return 128 + signal
    signum = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    if signum == signal.SIGXCPU:  # its CPU-time budget ran out before the wall clock: a timeout all the same
        return Execution(TIMED_OUT, "cpu time", seconds, output)
    if signum in SIGNAL_LIMITS:
        return Execution(KILLED, SIGNAL_LIMITS[signum], seconds, output)
    if signum == signal.SIGKILL:
        # the hard CPU limit (one second past the soft one) or the kernel's OOM killer
        return Execution(KILLED, "SIGKILL (cpu time or memory)", seconds, output)
    if signum:
        return Execution(FAILED, f"signal {signal.Signals(signum).name}", seconds, output)
    return Execution(FAILED, f"exit status {returncode} without a result", seconds, output)

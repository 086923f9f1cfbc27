"""The sandbox contains a catalogue of hostile completions, records them as not passed, and the evaluator
survives. Every case runs in each kept sandbox mode (bwrap, unshare) as a HumanEval completion, through the
same `program()` the benchmark uses.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest

from archifactory.core.errors import ArchiFactoryError
from archifactory.eval import sandbox as sandbox_module
from archifactory.eval.humaneval import program
from archifactory.eval.sandbox import (
    FAILED,
    KILLED,
    PASSED,
    TIMED_OUT,
    Limits,
    Sandbox,
    available_mode,
    slot_uids,
)

# a problem in HumanEval's shape: the completion ends the function, its module-level code runs at exec
PROBLEM = {
    "prompt": 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n',
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}
LIMITS = Limits(wall_seconds=2.5, cpu_seconds=1, memory_bytes=1 << 30, processes=8, tmpfs_bytes=32 << 20)


def mode_params() -> list:
    params = []
    for mode in ("bwrap", "unshare"):
        installed = shutil.which(mode) is not None
        params.append(
            pytest.param(mode, marks=pytest.mark.skipif(not installed, reason=f"{mode} not installed"))
        )
    return params


@functools.cache
def broken(mode: str) -> str | None:
    return sandbox_module._probe(mode)


@pytest.fixture(params=mode_params())
def sandbox(request) -> Sandbox:
    # installed but unable to run (no user namespaces, a seccomp profile): a failure, not a skip
    if (reason := broken(request.param)) is not None:
        pytest.fail(f"the {request.param} sandbox cannot run here: {reason}")
    return Sandbox(request.param, LIMITS)


def run_completion(sandbox: Sandbox, body: str) -> sandbox_module.Execution:
    """The hostile code at module level, after a wrong function body (so surviving it still fails)."""
    completion = "    return 0\n" + textwrap.dedent(body)
    return sandbox.run(program(PROBLEM, completion))


def slot_processes() -> list[int]:
    """Processes still owned by one of this process's slot uids (as root every sandboxed process has one)."""
    found, ours = [], slot_uids()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid in ours:
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if marker.encode() in Path(entry.path, "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.fixture(autouse=True)
def nothing_left_behind():
    yield
    if os.geteuid() == 0:
        deadline = time.monotonic() + 2.0
        while slot_processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert slot_processes() == [], "a sandboxed process outlived its run"


def test_correct_passes_wrong_fails_sleep_times_out(sandbox):
    assert sandbox.run(program(PROBLEM, "    return a + b\n")).outcome == PASSED
    wrong = sandbox.run(program(PROBLEM, "    return a - b\n"))
    assert (wrong.outcome, wrong.detail) == (FAILED, "AssertionError")
    slow = sandbox.run(program(PROBLEM, "    import time\n    time.sleep(60)\n"))
    assert (slow.outcome, slow.detail) == (TIMED_OUT, "wall clock")
    assert slow.seconds < LIMITS.wall_seconds + 2


def test_early_exit_is_not_a_pass(sandbox):
    for body in ("import os\nos._exit(0)\n", "import sys\nsys.exit(0)\n", "raise SystemExit\n"):
        result = sandbox.run(program(PROBLEM, "    return a + b\n" + body))
        assert result.outcome == FAILED, body


def test_infinite_loop(sandbox):
    result = run_completion(sandbox, "while True:\n    pass\n")
    assert result.outcome in (TIMED_OUT, KILLED)
    assert result.seconds < LIMITS.wall_seconds + 2


def test_ten_gigabyte_allocation(sandbox):
    result = run_completion(sandbox, "block = bytearray(10 * 1024**3)\n")
    assert (result.outcome, result.detail) == (KILLED, "memory")


def test_fork_bomb(sandbox):
    result = run_completion(
        sandbox,
        """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """,
    )
    assert result.outcome in (TIMED_OUT, KILLED)
    assert sandbox.run(program(PROBLEM, "    return a + b\n")).outcome == PASSED


def test_process_limit(sandbox):
    result = run_completion(
        sandbox,
        """
        import os, time
        children = 0
        try:
            for _ in range(50):
                if os.fork() == 0:
                    time.sleep(5)
                    os._exit(0)
                children += 1
        except OSError:
            pass
        print("CHILDREN", children)
        """,
    )
    children = int(result.output.split("CHILDREN")[1].split()[0])
    assert 0 < children < LIMITS.processes
    assert result.outcome == FAILED


def test_files_outside_its_folder_untouched(sandbox, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    canary = home / "canary.txt"
    canary.write_text("alive")
    monkeypatch.setenv("HOME", str(home))
    beside = tmp_path / "results.jsonl"  # an evaluator file outside home
    beside.write_text("keep")
    result = run_completion(
        sandbox,
        f"""
        import ctypes, os, shutil
        libc = ctypes.CDLL(None, use_errno=True)
        for path in (b"/", {str(home).encode()!r}):  # try to make the read-only view writable again
            libc.mount(None, path, None, 32 | 4096, None)  # MS_REMOUNT | MS_BIND, without MS_RDONLY
        for action in (
            lambda: open({str(canary)!r}, "w").write("overwritten"),
            lambda: os.remove({str(canary)!r}),
            lambda: shutil.rmtree({str(home)!r}),
            lambda: os.remove({str(beside)!r}),
            lambda: open({str(tmp_path / "new.txt")!r}, "w").write("x"),
            lambda: shutil.rmtree(os.path.expanduser("~")),
            lambda: open("/usr/planted", "w").write("x"),
        ):
            try:
                action()
            except OSError:
                pass
        """,
    )
    assert result.outcome == FAILED
    assert canary.read_text() == "alive"
    assert beside.read_text() == "keep"
    assert not (tmp_path / "new.txt").exists()
    assert not Path("/usr/planted").exists()


def test_tmpfs_is_capped(sandbox):
    # filling its writable tmpfs ends in ENOSPC at tmpfs_bytes, not in host memory or disk
    result = run_completion(
        sandbox,
        """
        for i in range(10_000):
            with open(f"fill{i}", "wb") as f:
                f.write(b"x" * (4 << 20))
        """,
    )
    assert result.outcome == FAILED and "No space left" in result.detail


def test_no_network(sandbox):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    connections: list = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                connections.append(server.accept())
            except TimeoutError:
                continue

    listener = threading.Thread(target=accept)
    listener.start()
    try:
        result = run_completion(
            sandbox,
            f"""
            import socket
            reached = []
            for address in (("127.0.0.1", {port}), ("1.1.1.1", 53), ("8.8.8.8", 443)):
                try:
                    socket.create_connection(address, timeout=1).sendall(b"LEAK")
                    reached.append(address)
                except OSError:
                    pass
            print("REACHED", reached)
            """,
        )
    finally:
        done.set()
        listener.join()
        server.close()
    assert connections == []
    assert "REACHED []" in result.output
    assert result.outcome == FAILED


def test_environment_secret_invisible(sandbox, monkeypatch):
    # planted in the evaluator's environment and in a sibling process's (readable in /proc/<pid>/environ)
    monkeypatch.setenv("ARCHIFACTORY_FAKE_SECRET", "hf_fake_token_123")
    sibling = subprocess.Popen(["sleep", "30"], env={"ARCHIFACTORY_FAKE_SECRET": "hf_fake_token_123"})
    try:
        result = run_secret_hunt(sandbox)
    finally:
        sibling.kill()
        sibling.wait()
    assert "NOT FOUND" in result.output
    assert "hf_fake_token_123" not in result.output
    assert result.outcome == FAILED


def run_secret_hunt(sandbox: Sandbox) -> sandbox_module.Execution:
    return run_completion(
        sandbox,
        """
        import os
        seen = " ".join(f"{k}={v}" for k, v in os.environ.items())
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    seen += open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace")
                except OSError:
                    pass
        print("FOUND" if "hf_fake_token_123" in seen else "NOT FOUND", sorted(os.environ))
        """,
    )


def test_killing_the_parent(sandbox):
    result = run_completion(
        sandbox,
        f"""
        import os, signal
        for target in (os.getppid(), {os.getpid()}, 1, -1):
            try:
                os.kill(target, signal.SIGKILL)
            except OSError:
                pass
        """,
    )
    assert result.outcome in (FAILED, KILLED)
    # the evaluator (this test process) is alive, and the next program runs normally
    assert sandbox.run(program(PROBLEM, "    return a + b\n")).outcome == PASSED


def test_daemon_does_not_outlive_the_run(sandbox):
    marker = f"archifactory-daemon-{os.getpid()}-{time.monotonic_ns()}"
    result = run_completion(
        sandbox,
        f"""
        import os, sys
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(120)", {marker!r}])
            os._exit(0)
        import time
        time.sleep(0.3)
        """,
    )
    assert result.outcome == FAILED
    deadline = time.monotonic() + 2.0
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(marker) == []


def test_flooding_stdout(sandbox):
    result = run_completion(
        sandbox,
        """
        import sys
        while True:
            print("x" * 10_000)
            sys.stderr.write("y" * 10_000)
        """,
    )
    assert result.outcome in (TIMED_OUT, KILLED)
    assert 0 < len(result.output) <= LIMITS.output_bytes


def test_refuses_without_a_sandbox(monkeypatch):
    monkeypatch.setattr(sandbox_module, "_probe", lambda mode: f"{mode} is not installed")
    available_mode.cache_clear()
    try:
        with pytest.raises(ArchiFactoryError, match="no sandbox .*allow_unsandboxed=true") as error:
            available_mode("auto", False)
        assert "\n" not in str(error.value)
        with pytest.raises(ArchiFactoryError, match="allow_unsandboxed"):
            available_mode("none", False)
        assert available_mode("auto", True) == "none"
        with pytest.raises(ArchiFactoryError, match="bwrap is not installed"):
            available_mode("bwrap", True)
    finally:
        available_mode.cache_clear()


def test_auto_falls_back_to_unshare(monkeypatch):
    real_probe = sandbox_module._probe
    monkeypatch.setattr(
        sandbox_module, "_probe", lambda mode: "no user namespaces" if mode == "bwrap" else real_probe(mode)
    )
    available_mode.cache_clear()
    try:
        assert available_mode("auto", False) == "unshare"
    finally:
        available_mode.cache_clear()


def test_unconfined_mode_still_runs_and_limits():
    sandbox = Sandbox("none", LIMITS)
    assert sandbox.run(program(PROBLEM, "    return a + b\n")).outcome == PASSED
    result = sandbox.run(program(PROBLEM, "    return 0\nblock = bytearray(10 * 1024**3)\n"))
    assert (result.outcome, result.detail) == (KILLED, "memory")

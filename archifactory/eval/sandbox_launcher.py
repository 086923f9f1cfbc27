"""The first Python code that runs inside the sandbox; it is trusted, and it runs untrusted code after it.

`archifactory.eval.sandbox` passes this file's text to `python -I -S -c` inside bubblewrap or unshare (so
no file of the evaluator is needed inside), with one JSON argument. In order, it:

1. (unshare mode only, as root of its own mount namespace) makes every mount read-only, mounts a fresh
   tmpfs as the work directory and empty read-only tmpfs over the home directories;
2. (when it is PID 1 of a new PID namespace) forks and stays as a minimal init: it reaps children and
   exits with the status of the program, after which the kernel kills whatever the program left behind;
3. sets the resource limits (CPU seconds, address space, file size, process count, no core dumps),
   drops root to an unprivileged uid when it has it, sets no-new-privileges, closes stdin;
4. reads the program from an inherited file descriptor, runs it with `exec` in this sandboxed process and
   reports the outcome with a nonce on a second descriptor, so a program that exits early (`os._exit(0)`)
   is not mistaken for one whose tests passed.

Standard library only: the sandbox sees the Python install and nothing else of the evaluator.
"""

import contextlib
import ctypes
import errno
import json
import os
import resource
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 16384, 1 << 18, 1 << 21, 1 << 24
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_SET_SECUREBITS = 38, 24, 28
# securebits noroot, no_setuid_fixup, keep_caps and no_cap_ambient_raise, each with its lock
SECURE_NOROOT_ALL = 0b11101111
CAPABILITY_VERSION_3 = 0x20080522
# Flags a remount must keep: inside a user namespace the kernel locks them, so dropping one is EPERM.
KEPT_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}


def mount(libc, source, target, fstype, flags, data):
    def c(text):
        return None if text is None else text.encode()

    if libc.mount(c(source), c(target), c(fstype), flags, c(data)) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"mount {target}: {os.strerror(error)}")


def isolate_filesystem(workdir, masks, keep, tmpfs_bytes):
    """Read-only view of every mount, a fresh writable tmpfs at `workdir`, empty tmpfs over `masks`
    (but for the directories in `keep`: the Python install may live in a home directory)."""
    libc = ctypes.CDLL(None, use_errno=True)
    mount(libc, None, "/", None, MS_REC | MS_PRIVATE, None)
    with open("/proc/self/mountinfo") as info:
        mounts = [line.split() for line in info]
    for fields in mounts:
        # mountinfo escapes blanks in paths as octal (\040)
        target = fields[4].encode().decode("unicode_escape")
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in fields[5].split(","):
            flags |= KEPT_FLAGS.get(option, 0)
        try:
            mount(libc, None, target, None, flags, None)
        except OSError:
            # a mount hidden under another one cannot be reached by path; the root one must succeed
            if target == "/":
                raise
    mount(libc, "tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmpfs_bytes},mode=1777")
    for path in masks:
        if os.path.isdir(path) and not os.path.islink(path):
            mask(libc, path, [k for k in keep if k.startswith(path.rstrip("/") + "/")])


def mask(libc, path, keep):
    """An empty read-only tmpfs over `path`, through which the directories in `keep` stay visible."""
    # O_PATH descriptors reach the kept directories once the tmpfs hides them; bind from /proc/self/fd
    handles = [os.open(k, os.O_PATH | os.O_DIRECTORY) for k in keep]
    mount(libc, "tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "size=65536,mode=755")
    for kept, handle in zip(keep, handles):
        os.makedirs(kept, mode=0o755, exist_ok=True)
        # a bind mount copies the read-only flag of its (already remounted) source
        mount(libc, f"/proc/self/fd/{handle}", kept, None, MS_BIND | MS_REC, None)
        os.close(handle)
    mount(libc, None, path, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)


def stay_as_init():
    """Fork; the parent reaps every child and exits with the program's status (signals as 128 + n)."""
    child = os.fork()
    if child == 0:
        return
    for fd in range(3, 256):
        with contextlib.suppress(OSError):
            os.close(fd)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(1)
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            os._exit(128 - code if code < 0 else code)


def limit(settings):
    cpu = settings["cpu_seconds"]
    # the soft limit sends SIGXCPU, the hard one a second later SIGKILL
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (settings["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (settings["file_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (settings["processes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    if os.getuid() == 0:
        # uid 0 that stays uid 0 (unshare as a user: root of its user namespace, which could remount
        # the read-only view rw; none mode as root) must not keep or regain capabilities on exec
        libc.prctl(PR_SET_SECUREBITS, SECURE_NOROOT_ALL, 0, 0, 0)
        for cap in range(64):
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EINVAL:
                break
    uid = settings["drop_to_uid"]
    if uid is not None and os.getuid() == 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    header = (ctypes.c_uint32 * 2)(CAPABILITY_VERSION_3, 0)
    if libc.capset(header, (ctypes.c_uint32 * 6)()) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    # no new privileges: setuid-root binaries and file capabilities of the (read-only) host stay inert
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def report(settings, line):
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()
    with contextlib.suppress(OSError):
        os.write(settings["result_fd"], f"{settings['nonce']} {line}\n".encode())


def run(settings):
    with os.fdopen(settings["program_fd"], "rb") as stream:
        source = stream.read().decode()
    os.chdir(settings["workdir"])
    os.close(0)
    sys.stdin = None
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(source, "<program>", "exec"), namespace)
    except MemoryError:
        report(settings, "limit memory")
        os._exit(3)
    except BaseException as error:  # noqa: B036 - SystemExit/KeyboardInterrupt from the program fail it too
        message = " ".join(str(error).split())[:200]
        report(settings, f"failed {type(error).__name__}{': ' + message if message else ''}")
        os._exit(1)
    report(settings, "passed")
    # os._exit: no atexit hooks or non-daemon threads of the program run after its tests passed
    os._exit(0)


def main():
    settings = json.loads(sys.argv[1])
    if settings["isolate_filesystem"]:
        os.umask(0o022)
        isolate_filesystem(settings["workdir"], settings["masks"], settings["keep"], settings["tmpfs_bytes"])
    if os.getpid() == 1:
        stay_as_init()
    limit(settings)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    run(settings)


main()

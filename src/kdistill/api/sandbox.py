"""Run an untrusted Python program (a teacher's answer) with no network, no filesystem and tight limits.

``run_program(code)`` starts ``unshare`` with new mount, network, PID, IPC and UTS namespaces (and a
user namespace when we are not root). Inside, a small jail script (:data:`JAIL`, run as the new PID
namespace's init) builds a fresh root on a tmpfs that holds only read-only binds of the system
libraries and the Python interpreter, plus ``/sandbox``: a size-capped tmpfs that is the program's
cwd, HOME and TMPDIR and its only writable place. It then forks the program, which chroots there,
drops every capability (and, under real root, switches to a throw-away uid so RLIMIT_NPROC applies
and it owns nothing), sets resource limits and execs ``python -I -S main.py`` with a minimal
environment. When the program ends or the wall clock runs out the whole namespace dies with it, so
no forked child survives. docs/api-teachers.md lists what is and is not contained.
"""
from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from kdistill.errors import KdistillError

VERDICTS = ("ok", "error", "timeout", "memory", "killed")
SANDBOX_DIR = "/sandbox"  # the program's directory as it sees it
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
PROGRAM_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


class SandboxUnavailable(KdistillError):
    """This system cannot isolate programs the way the sandbox needs (or the jail failed to build)."""


@dataclass(frozen=True)
class SandboxResult:
    verdict: str            # one of VERDICTS
    stdout: str
    stderr: str
    returncode: int | None  # negative: killed by that signal; None: stopped by the wall clock
    wall_s: float
    cpu_s: float | None     # user + system time of the program's main process, when known
    detail: str = ""        # why, in words, when the verdict is not "ok"
    isolated: bool = True   # False only for allow_network=True on a system without namespaces

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"


def run_program(code: str, *, stdin: str = "", timeout_s: float = 5, cpu_s: float = 5, memory_mb: int = 256,
                disk_mb: int = 64, max_processes: int = 16, max_output_kb: int = 1024,
                allow_network: bool = False) -> SandboxResult:
    """Run ``code`` with ``python -I -S`` in the sandbox and report how it ended.

    ``memory_mb`` caps each process's address space, ``max_processes`` the number of processes,
    ``max_output_kb`` each of stdout, stderr and any file it writes, ``disk_mb`` its directory.
    ``allow_network=True`` is the opt-out: the program shares the host network and, on a system
    without namespaces, runs with only the resource limits, a fresh directory and a clean
    environment (``result.isolated`` is False)."""
    problem = isolation_problem()
    if problem and not allow_network:
        raise SandboxUnavailable(
            f"the sandbox cannot cut programs off from the network and filesystem here: {problem}. "
            "Run as root or enable unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1 "
            "or user.max_user_namespaces > 0), or pass allow_network=True to run with resource limits only")
    cpu = max(1, math.ceil(cpu_s))  # RLIMIT_CPU counts whole seconds; at the hard limit, SIGKILL
    limits = {"RLIMIT_CPU": (cpu, cpu + 1), "RLIMIT_AS": (memory_mb << 20,) * 2,
              "RLIMIT_NPROC": (max_processes,) * 2, "RLIMIT_FSIZE": (max_output_kb << 10,) * 2,
              "RLIMIT_NOFILE": (64, 64), "RLIMIT_CORE": (0, 0)}
    with tempfile.TemporaryDirectory(prefix="kdistill-sandbox-") as work:
        run = _run_jailed if not problem else _run_plain
        return run(work, code, stdin, limits, timeout_s, disk_mb, allow_network)


@functools.lru_cache(maxsize=None)
def isolation_problem() -> str | None:
    """Why the namespaced jail cannot run here, or None when it can (probed once per process)."""
    if sys.platform != "linux":
        return f"namespaces are Linux-only and this is {sys.platform}"
    if not _unshare():
        return "the `unshare` command (util-linux) is not installed"
    try:
        with tempfile.TemporaryDirectory(prefix="kdistill-sandbox-probe-") as work:
            result = _run_jailed(work, "print('ok')", "", {}, 30, 1, False)
    except SandboxUnavailable as err:
        return str(err)
    if result.stdout.strip() != "ok":
        return f"a trial program did not run ({result.verdict}: {result.stderr.strip()[-300:]})"
    return None


def _unshare() -> str | None:
    return shutil.which("unshare") or next((p for p in ("/usr/bin/unshare", "/bin/unshare") if os.path.exists(p)), None)


def _interpreter() -> tuple[str, str]:
    """The real interpreter binary and its prefix: a venv is only symlinks to them, and under -I -S
    the program needs nothing from the venv."""
    executable = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    return executable, os.path.realpath(sys.base_prefix)


def _throwaway_uid() -> int | None:
    """Under real root: an unused uid for one run, so RLIMIT_NPROC (ignored for root) binds, the program
    owns no file outside its directory, and two sandboxes never share a process budget."""
    return random.randrange(2_000_000_000, 2_100_000_000) if os.geteuid() == 0 else None


def _run_jailed(work, code, stdin, limits, timeout_s, disk_mb, allow_network) -> SandboxResult:
    executable, prefix = _interpreter()
    uid = _throwaway_uid()
    read_only = [d for d in SYSTEM_DIRS if os.path.lexists(d)]
    read_only += [p for p in (prefix, os.path.dirname(executable))
                  if not any(p == d or p.startswith(d + "/") for d in read_only)]
    if uid is None:  # inside a user namespace every process counts, the jail and unshare included
        limits = {**limits, "RLIMIT_NPROC": tuple(v + 2 for v in limits["RLIMIT_NPROC"])} if limits else limits
    status_read, status_write = os.pipe()
    config = {"root": os.path.join(work, "root"), "code": os.path.join(work, "main.py"), "uid": uid,
              "read_only": read_only, "disk_mb": disk_mb, "limits": limits, "python": executable,
              "env": {**PROGRAM_ENV, "HOME": SANDBOX_DIR, "TMPDIR": SANDBOX_DIR}, "status_fd": status_write}
    os.mkdir(config["root"])
    _write(config["code"], code)
    _write(os.path.join(work, "config.json"), json.dumps(config))
    namespaces = ["--mount", "--pid", "--ipc", "--uts", "--fork", "--kill-child"] + ([] if allow_network else ["--net"])
    if os.geteuid() != 0:
        namespaces.append("--map-root-user")
    command = [_unshare() or "unshare", *namespaces, "--", executable, "-I", "-S", "-c", JAIL,
               os.path.join(work, "config.json")]
    try:
        outcome = _supervise(work, command, stdin, timeout_s, pass_fds=(status_write,))
    finally:
        os.close(status_write)
        with os.fdopen(status_read) as pipe:
            reports = [json.loads(line) for line in pipe.read().splitlines() if line.strip()]
    setup_errors = [r["setup_error"] for r in reports if "setup_error" in r]
    if setup_errors or not (outcome.timed_out or any("started" in r for r in reports)):
        why = setup_errors[0] if setup_errors else (outcome.stderr.strip()[-500:] or f"exit code {outcome.returncode}")
        raise SandboxUnavailable(f"the sandbox could not be built: {why}")
    final = next((r for r in reports if "wait_status" in r), None)
    if final is None and not outcome.timed_out:  # the jail died first: only a signal from the host does that
        return _judge(outcome, -signal.SIGKILL, None, limits, isolated=True)
    returncode = os.waitstatus_to_exitcode(final["wait_status"]) if final else None
    return _judge(outcome, returncode, final and final["cpu_s"], limits, isolated=True)


def _run_plain(work, code, stdin, limits, timeout_s, disk_mb, allow_network) -> SandboxResult:
    """The opt-out on systems without namespaces: limits, a fresh directory, a clean environment."""
    executable, _ = _interpreter()
    box = os.path.join(work, "box")
    os.mkdir(box)
    _write(os.path.join(box, "main.py"), code)
    uid = _throwaway_uid()
    if uid is not None:
        os.chmod(work, 0o711)
        os.chown(box, uid, uid)

    def drop_privileges_and_limit():  # runs in the child between fork and exec
        import resource

        for name, value in limits.items():
            resource.setrlimit(getattr(resource, name), value)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

    env = {**PROGRAM_ENV, "HOME": box, "TMPDIR": box}
    try:
        outcome = _supervise(work, [executable, "-I", "-S", "main.py"], stdin, timeout_s, cwd=box, env=env,
                             preexec_fn=drop_privileges_and_limit)
    except PermissionError:
        raise SandboxUnavailable(
            f"without namespaces, programs run as a throw-away uid that cannot execute {executable} (it lives "
            "where only root can read, e.g. root's home): install Python where every user can read it, or run "
            "where namespaces work") from None
    return _judge(outcome, outcome.returncode, None, limits, isolated=False)


@dataclass
class _Outcome:
    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool
    wall_s: float
    timeout_s: float


def _supervise(work, command, stdin, timeout_s, *, cwd=None, env=None, pass_fds=(), preexec_fn=None) -> _Outcome:
    """Run ``command`` in its own session with output to files (a pipe would let a chatty program fill
    our memory; RLIMIT_FSIZE caps a file) and kill its whole process group at the deadline."""
    paths = {name: os.path.join(work, name) for name in ("stdin", "stdout", "stderr")}
    _write(paths["stdin"], stdin)
    start = time.monotonic()
    with open(paths["stdin"], "rb") as fin, open(paths["stdout"], "wb") as fout, open(paths["stderr"], "wb") as ferr:
        proc = subprocess.Popen(command, stdin=fin, stdout=fout, stderr=ferr, cwd=cwd or work,
                                env=env or {"PATH": PROGRAM_ENV["PATH"], "LANG": "C.UTF-8"},
                                close_fds=True, pass_fds=pass_fds, start_new_session=True, preexec_fn=preexec_fn)
        try:
            proc.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        except BaseException:  # Ctrl-C while waiting: the program must not outlive its deadline, or the run
            _kill_group(proc)
            raise
    wall = time.monotonic() - start
    return _Outcome(_read(paths["stdout"]), _read(paths["stderr"]), proc.returncode, timed_out, wall, timeout_s)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # unshare --kill-child then takes the namespace down
    except ProcessLookupError:
        pass
    proc.wait()


def _judge(outcome: _Outcome, returncode, cpu, limits, isolated) -> SandboxResult:
    stderr = outcome.stderr
    cpu_limit = limits.get("RLIMIT_CPU", (None,))[0]
    if outcome.timed_out:
        verdict, detail = "timeout", f"still running after the {outcome.timeout_s:g} s wall-clock limit"
    elif returncode == 0:
        verdict, detail = "ok", ""
    elif "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        verdict, detail = "memory", f"ran out of its {limits['RLIMIT_AS'][0] >> 20} MB address space"
    elif returncode == -signal.SIGXCPU or (cpu_limit and cpu is not None and cpu >= cpu_limit and returncode < 0):
        # SIGXCPU at the soft limit, SIGKILL at the hard one
        verdict, detail = "timeout", f"used its {cpu_limit} s of CPU time"
    elif "File too large" in stderr:
        verdict, detail = "error", "wrote past the output size limit"
    elif returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        verdict, detail = "killed", f"killed by {name}"
    else:
        lines = stderr.strip().splitlines()
        verdict, detail = "error", lines[-1] if lines else f"exit code {returncode}"
    return SandboxResult(verdict, outcome.stdout, stderr, returncode, round(outcome.wall_s, 3),
                         None if cpu is None else round(cpu, 3), detail, isolated)


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _read(path: str) -> str:  # RLIMIT_FSIZE has already bounded it
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


# The jail: runs as PID 1 of the new namespaces, under `python -I -S`, where kdistill is not importable
# (hence a string). It reports on the status pipe in JSON lines: {"started"} once the root is built,
# then {"wait_status", "cpu_s"} when the program ends; or {"setup_error"} if it could not build the
# sandbox (then nothing runs, and run_program raises SandboxUnavailable).
JAIL = r'''
import ctypes, json, os, resource, signal, sys
config = json.load(open(sys.argv[1]))
status = config["status_fd"]
os.set_inheritable(status, False)  # the program must not get it
libc = ctypes.CDLL(None, use_errno=True)
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 24, 28, 38, 47

def report(**fields):
    os.write(status, (json.dumps(fields) + "\n").encode())

def check(result, what):
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")

def mount(source, target, flags, fstype=None, data=None):
    enc = lambda s: s.encode() if s is not None else None
    check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {source} on {target}")

def bind_read_only(path, root, devices=False):
    target = root + path
    if os.path.islink(path):  # merged /usr: /bin -> usr/bin
        os.makedirs(os.path.dirname(target), exist_ok=True)
        return os.symlink(os.readlink(path), target)
    if os.path.isdir(path):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    mount(path, target, BIND | REC)
    locked = os.statvfs(target).f_flag & (NOSUID | NODEV | NOEXEC)  # a user namespace may not clear these
    mount(None, target, REMOUNT | BIND | RDONLY | NOSUID | locked | (0 if devices else NODEV))

def build_root():
    root, uid = config["root"], config["uid"] or 0
    mount(None, "/", REC | PRIVATE)  # nothing below propagates back to the host
    mount("tmpfs", root, NOSUID | NODEV, "tmpfs", "mode=755,size=1m")
    for path in config["read_only"]:
        bind_read_only(path, root)
    for device in ("null", "zero", "random", "urandom"):
        bind_read_only("/dev/" + device, root, devices=True)
    os.mkdir(root + "/sandbox")
    mount("tmpfs", root + "/sandbox", NOSUID | NODEV, "tmpfs",
          f"mode=700,uid={uid},gid={uid},size={config['disk_mb']}m,nr_inodes=4096")
    with open(config["code"], "rb") as src, open(root + "/sandbox/main.py", "wb") as dst:
        dst.write(src.read())
    os.chown(root + "/sandbox/main.py", uid, uid)
    os.mkdir(root + "/proc")
    try:  # a /proc of our own PID namespace: it shows the sandbox's processes only
        mount("proc", root + "/proc", NOSUID | NODEV | NOEXEC, "proc")
    except OSError:
        pass  # some containers forbid a new proc; the program then has none
    mount(None, root, REMOUNT | RDONLY | NOSUID | NODEV)

def become_program():
    os.chroot(config["root"])
    os.chdir("/sandbox")
    os.umask(0o077)
    for name, value in config["limits"].items():
        resource.setrlimit(getattr(resource, name), value)
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    for cap in range(64):  # empty the bounding set; numbers past the kernel's last cap just fail
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    check(libc.prctl(PR_CAP_AMBIENT, 4, 0, 0, 0), "clear ambient capabilities")
    check(libc.prctl(PR_SET_SECUREBITS, 0b11, 0, 0, 0), "securebits")  # uid 0 gains nothing at exec
    if config["uid"] is not None:
        os.setgroups([])
        os.setgid(config["uid"])
        os.setuid(config["uid"])
    os.execve(config["python"], [config["python"], "-I", "-S", "main.py"], config["env"])

# A program that shares our uid (in a user namespace) could signal us: only SIGKILL from the
# host may end the jail, and its end is the program's.
TRAPPED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
for number in TRAPPED:
    signal.signal(number, signal.SIG_IGN)
try:
    build_root()
    child = os.fork()
except BaseException as err:
    report(setup_error=f"{type(err).__name__}: {err}")
    sys.exit(125)
if child == 0:
    try:
        for number in TRAPPED:
            signal.signal(number, signal.SIG_DFL)
        become_program()
    except BaseException as err:
        report(setup_error=f"{type(err).__name__}: {err}")
    os._exit(125)
report(started=True)
while True:  # as init we also reap orphans; when the program ends, the namespace ends with us
    pid, wait_status, usage = os.wait4(-1, 0)
    if pid == child:
        report(wait_status=wait_status, cpu_s=usage.ru_utime + usage.ru_stime)
        break
'''

"""The sandbox against hostile programs: each is stopped or contained, and the next run goes on."""
from __future__ import annotations

import os
import socket
import textwrap

import pytest

from kdistill.api import sandbox
from kdistill.api.sandbox import SandboxUnavailable, isolation_problem, run_program

needs_isolation = pytest.mark.skipif(isolation_problem() is not None,
                                     reason=f"this machine has no namespaces: {isolation_problem()}")


def program(source: str) -> str:
    return textwrap.dedent(source).strip() + "\n"


def sandbox_processes() -> list[int]:
    """Processes anywhere on the host still running a sandboxed program."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().endswith(b"-I\0-S\0main.py\0"):
                    found.append(int(pid))
        except OSError:
            pass
    return found


@needs_isolation
def test_a_normal_program_prints_its_result():
    result = run_program("print(sum(range(10)))")
    assert (result.verdict, result.stdout, result.returncode, result.isolated) == ("ok", "45\n", 0, True)
    assert result.ok


@needs_isolation
def test_stdin_reaches_the_program_and_errors_are_reported():
    assert run_program("print(input()[::-1])", stdin="abc\n").stdout == "cba\n"
    failed = run_program("raise ValueError('bad answer')")
    assert failed.verdict == "error" and failed.detail == "ValueError: bad answer"


@needs_isolation
def test_an_infinite_loop_is_stopped_by_the_cpu_limit():
    result = run_program("while True: pass", cpu_s=1, timeout_s=10)
    assert result.verdict == "timeout" and "CPU" in result.detail


@needs_isolation
def test_a_sleeping_program_is_stopped_by_the_wall_clock():
    result = run_program("import time; time.sleep(60)", timeout_s=0.5)
    assert result.verdict == "timeout" and result.returncode is None  # killed: a 60 s sleep has no other end
    assert sandbox_processes() == []


@needs_isolation
def test_ctrl_c_while_a_program_runs_kills_it_at_once(monkeypatch):
    import subprocess
    import time

    wait = subprocess.Popen.wait

    def interrupted(self, timeout=None):  # Ctrl-C lands while the supervisor waits for the deadline
        if timeout is None:
            return wait(self)
        time.sleep(0.3)
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess.Popen, "wait", interrupted)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_program("import time; time.sleep(60)", timeout_s=30)
    assert time.monotonic() - start < 10  # it waited for the program to end by itself
    assert sandbox_processes() == []


@needs_isolation
def test_a_memory_hog_is_stopped():
    result = run_program("hog = bytearray(2 * 1024 ** 3)", memory_mb=128)
    assert result.verdict == "memory" and "128 MB" in result.detail


@needs_isolation
def test_a_fork_bomb_is_capped_and_leaves_nothing_behind():
    counted = run_program(program("""
        import os, time
        children = 0
        try:
            while True:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                children += 1
        except OSError:
            print(children)
    """), max_processes=8)
    assert counted.ok and int(counted.stdout) < 8
    bomb = run_program("import os\nwhile True: os.fork()", max_processes=8, timeout_s=1, cpu_s=1)
    assert bomb.verdict in ("timeout", "error", "killed")
    assert sandbox_processes() == []  # the sleepers and the bomb died with their namespace
    assert run_program("print('still fine')").stdout == "still fine\n"


@needs_isolation
def test_writing_outside_its_directory_fails(tmp_path):
    outside = tmp_path / "escaped.txt"
    result = run_program(program(f"""
        import os
        open("inside.txt", "w").write("mine")
        print(sorted(os.listdir(".")), os.getcwd(), os.environ["HOME"], os.environ["TMPDIR"])
        for path in [{str(outside)!r}, "/tmp/kdistill-escaped.txt", "/usr/escaped.txt", "/escaped.txt"]:
            try:
                open(path, "w").write("escaped")
                print("wrote", path)
            except OSError as err:
                print("refused", path, type(err).__name__)
    """))
    assert result.ok, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "['inside.txt', 'main.py'] /sandbox /sandbox /sandbox"
    assert all(line.startswith("refused") for line in lines[1:]) and len(lines) == 5
    assert not outside.exists() and not os.path.exists("/tmp/kdistill-escaped.txt")


@needs_isolation
def test_it_cannot_regain_privileges_or_remount():
    result = run_program(program("""
        import ctypes, os
        print(open("/proc/self/status").read().split("CapEff:")[1].split()[0])
        libc = ctypes.CDLL(None, use_errno=True)
        print(libc.mount(None, b"/", None, 32, None), libc.mount(None, b"/sandbox", None, 32 | 4096, None))
        os.chroot("/")
    """))
    assert result.stdout.splitlines() == ["0000000000000000", "-1 -1"]
    assert result.verdict == "error" and "PermissionError" in result.detail


@needs_isolation
def test_a_socket_to_a_local_server_fails(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        port = server.getsockname()[1]
        connect = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2); print('connected')"
        blocked = run_program(connect)
        assert blocked.verdict == "error" and "OSError" in blocked.detail and blocked.stdout == ""
        with pytest.raises(TimeoutError):
            server.accept()
        opted_out = run_program(connect, allow_network=True)  # the opt-out really opens the network
        assert opted_out.stdout == "connected\n"


@needs_isolation
def test_parent_secrets_are_not_visible(monkeypatch):
    monkeypatch.setenv("KDISTILL_TEST_SECRET", "hunter2-do-not-leak")
    result = run_program(program("""
        import os
        print(sorted(os.environ))
        leaks = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                leaks.append(b"hunter2" in open(f"/proc/{pid}/environ", "rb").read())
            except OSError:
                pass
        print(any(leaks), sorted(os.listdir("/")))
    """))
    assert result.ok, result.stderr
    assert result.stdout.splitlines()[0] == "['HOME', 'LANG', 'PATH', 'TMPDIR']"
    assert result.stdout.splitlines()[1].startswith("False")
    assert "hunter2" not in result.stdout + result.stderr


@needs_isolation
def test_output_is_capped():
    result = run_program("while True: print('x' * 1000)", max_output_kb=64)
    assert result.verdict == "error" and len(result.stdout) <= 64 * 1024 and "limit" in result.detail


def test_without_namespaces_it_refuses_unless_the_caller_opts_out(monkeypatch):
    monkeypatch.setattr(sandbox, "isolation_problem", lambda: "no namespaces in this test")
    with pytest.raises(SandboxUnavailable, match="no namespaces in this test.*allow_network=True"):
        run_program("print(1)")
    monkeypatch.setattr(sandbox, "_throwaway_uid", lambda: None)  # our interpreter may live in root's home
    monkeypatch.setenv("KDISTILL_TEST_SECRET", "hunter2")
    result = run_program("import os; print('KDISTILL_TEST_SECRET' in os.environ)", allow_network=True)
    assert (result.verdict, result.stdout, result.isolated) == ("ok", "False\n", False)
    assert run_program("import time; time.sleep(60)", timeout_s=0.5, allow_network=True).verdict == "timeout"

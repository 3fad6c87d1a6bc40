"""Adversarial programs against the code sandbox: each tries to get out (files, secrets, processes,
signals, network, a forged verdict) and must not. Run both as the caller is and, when the tests run
as root (CI), with root given up first, as an ordinary user would run the sandbox."""
from __future__ import annotations

import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from telechat.eval.sandbox import run_program

MODES = ["as-is", "unprivileged"] if os.geteuid() == 0 else ["as-is"]


def run(source: str, mode: str, **kw):
    if mode == "unprivileged":
        kw["drop_root_first"] = True
    return run_program(source, timeout=kw.pop("timeout", 10), **kw)


@pytest.fixture
def helper():
    """A process outside the sandbox, with a secret in its environment."""
    token = "telechat-secret-" + secrets.token_hex(8)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            env={**os.environ, "TELECHAT_TEST_SECRET": token})
    yield proc, token
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("mode", MODES)
def test_cannot_write_append_or_delete_outside(tmp_path, mode):
    os.chmod(tmp_path, 0o777)  # even a directory anyone may write to stays out of reach
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    os.chmod(victim, 0o666)
    new = tmp_path / "new.txt"
    out = run(f"""
import os
for what, act in (("append", lambda: open({str(victim)!r}, "a").write("appended")),
                  ("truncate", lambda: open({str(victim)!r}, "w").write("overwritten")),
                  ("create", lambda: open({str(new)!r}, "w").write("new")),
                  ("delete", lambda: os.remove({str(victim)!r})),
                  ("rename", lambda: os.rename({str(victim)!r}, {str(victim)!r} + ".moved")),
                  ("tmp", lambda: open("/tmp/telechat-sandbox-escape.txt", "w").write("x"))):
    try:
        act()
        print(what, "done")
    except OSError as e:
        print(what, "refused:", e)
open("inside.txt", "w").write("fine")  # the work dir itself is writable
""", mode)
    assert out.passed, out.output
    assert victim.read_text() == "original"
    assert not new.exists() and not (tmp_path / "victim.txt.moved").exists()
    assert "done" not in out.output
    assert not os.path.exists("/tmp/telechat-sandbox-escape.txt")


@pytest.mark.parametrize("mode", MODES)
def test_cannot_read_secrets_host_files_or_the_repo(helper, mode):
    proc, token = helper
    here = os.path.abspath(__file__)
    out = run(f"""
import os
paths = ["/etc/shadow", "/etc/passwd", {here!r}, "/proc/{proc.pid}/environ", "/proc/{os.getpid()}/environ",
         "/proc/%d/environ" % os.getppid(), "/proc/1/environ", os.path.expanduser("~") + "/.bash_history"]
try:
    paths += ["/proc/%s/environ" % p for p in os.listdir("/proc") if p.isdigit()]
except OSError as e:
    print("no /proc listing:", e)
for p in paths:
    try:
        with open(p, "rb") as f:
            print(p, f.read()[:4000])
    except OSError as e:
        print(p, "refused:", e)
""", mode)
    assert out.passed, out.output
    assert token not in out.output
    assert "root:" not in out.output  # neither /etc/shadow nor /etc/passwd
    assert "def test_cannot_read_secrets_host_files_or_the_repo" not in out.output


@pytest.mark.parametrize("mode", MODES)
def test_no_new_processes(mode):
    clone = {"x86_64": 56, "aarch64": 220}.get(platform.machine())
    out = run(f"""
import os, posix, sys
def attempt(what, act):
    try:
        print(what, "->", act())
    except Exception as e:
        print(what, "refused:", type(e).__name__, e)
sys.stdout.flush()
attempt("posix.system", lambda: posix.system("echo spawned-by-system-$((6*7))"))
def fork():
    pid = posix.fork()
    if pid == 0:
        print("spawned-by-fork", flush=True)
        os._exit(0)
    return os.waitpid(pid, 0)
attempt("posix.fork", fork)
def via_subprocess():
    import importlib, subprocess
    importlib.reload(subprocess)  # a fresh Popen, whatever was patched
    return subprocess.run(["/bin/sh", "-c", "echo spawned-by-subprocess-$((6*7))"]).returncode
attempt("subprocess", via_subprocess)
def raw_clone():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    pid = libc.syscall(ctypes.c_long({clone}), ctypes.c_long(17), None, None, None, None)  # SIGCHLD: a fork
    if pid == 0:
        os.write(1, b"spawned-by-ctypes\\n")
        libc.syscall(ctypes.c_long(60 if {clone} == 56 else 94), ctypes.c_long(0))
    return pid, ctypes.get_errno()
attempt("ctypes clone", raw_clone)
attempt("posix.posix_spawn", lambda: posix.posix_spawn("/bin/sh", ["sh", "-c", "echo spawned-by-spawn-$((6*7))"],
                                                       {{}}))
""", mode)
    assert out.passed, out.output
    for marker in ("spawned-by-system-42", "spawned-by-fork", "spawned-by-subprocess-42", "spawned-by-ctypes",
                   "spawned-by-spawn-42"):
        assert marker not in out.output, out.output


@pytest.mark.parametrize("mode", MODES)
def test_no_signals_to_processes_outside(helper, mode):
    proc, _ = helper
    got = []
    old = signal.signal(signal.SIGUSR2, lambda *a: got.append(a))
    try:
        out = run(f"""
import os, posix, ctypes
libc = ctypes.CDLL(None, use_errno=True)
for pid in ({os.getpid()}, os.getppid()):
    for send in (posix.kill, lambda p, s: libc.kill(p, s)):
        try:
            print(pid, send(pid, {int(signal.SIGUSR2)}))
        except OSError as e:
            print(pid, "refused:", e)
for send in (posix.kill, lambda p, s: libc.kill(p, s)):
    try:
        print(send({proc.pid}, 9))
    except OSError as e:
        print("refused:", e)
""", mode)
        time.sleep(0.2)
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert out.passed, out.output
    assert not got, "a sandboxed program signalled the test process"
    assert proc.poll() is None, "a sandboxed program killed a process outside"


def _alive_with_name(name: str) -> list[int]:
    found = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:][:1]
        if comm == name and state != "Z":
            found.append(int(p))
    return found


@pytest.mark.parametrize("mode", MODES)
def test_nothing_survives_the_timeout(mode):
    name = "tcsb" + secrets.token_hex(5)  # the process name the program gives itself and its children
    src = f"""
import ctypes, os, posix, signal, threading, time
libc = ctypes.CDLL(None)
libc.prctl(15, {name.encode()!r}, 0, 0, 0)  # PR_SET_NAME
signal.signal(signal.SIGTERM, signal.SIG_IGN)
for _ in range(3):
    try:
        if posix.fork() == 0:
            try:
                os.setsid()
                if posix.fork():
                    os._exit(0)  # the grandchild, reparented, in its own session
            except OSError:
                pass
            libc.prctl(15, {name.encode()!r}, 0, 0, 0)
            time.sleep(60)
            os._exit(0)
    except OSError:
        pass
threading.Thread(target=time.sleep, args=(60,)).start()
time.sleep(60)
"""
    try:
        out = run(src, mode, timeout=2)
        assert out.status == "timeout"
        deadline = time.monotonic() + 5
        while _alive_with_name(name) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _alive_with_name(name) == []
    finally:
        for pid in _alive_with_name(name):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("mode", MODES)
def test_no_network_even_through_ctypes(tmp_path, mode):
    unix = socket.socket(socket.AF_UNIX)
    path = str(tmp_path / "s")
    unix.bind(path)
    os.chmod(tmp_path, 0o777)
    os.chmod(path, 0o777)
    unix.listen(4)
    unix.settimeout(0.1)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(4)
    tcp.settimeout(0.1)
    port = tcp.getsockname()[1]
    got, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            for s in (unix, tcp):
                try:
                    got.append(s.accept())
                except OSError:
                    pass

    th = threading.Thread(target=accept)
    th.start()
    try:
        out = run(f"""
import ctypes, struct
libc = ctypes.CDLL(None, use_errno=True)
def connect(family, addr):
    fd = libc.socket(family, 1, 0)
    print("socket", family, fd, ctypes.get_errno())
    if fd >= 0:
        print("connect", libc.connect(fd, addr, len(addr)), ctypes.get_errno())
connect(1, struct.pack("H", 1) + {path.encode()!r} + b"\\0")
connect(2, struct.pack("=H", 2) + struct.pack(">H", {port}) + bytes([127, 0, 0, 1]) + bytes(8))
""", mode)
    finally:
        stop.set()
        th.join()
        unix.close()
        tcp.close()
    assert out.passed, out.output
    assert not got, "a sandboxed program reached a listening socket"


@pytest.mark.parametrize("mode", MODES)
def test_verdict_cannot_be_forged(mode):
    forged = run("""
import __main__, os, sys
for where in (lambda: __main__._done, lambda: sys.argv[4], lambda: globals()["_done"]):
    try:
        print("\\n" + where() + "\\n")
    except Exception:
        pass
try:
    cmdline = open("/proc/self/cmdline", "rb").read().split(b"\\0")
    print("\\n" + cmdline[-2].decode() + "\\n")
except OSError:
    pass
sys.stdout.flush()
os._exit(0)
assert False
""", mode)
    assert forged.status == "failed"
    assert run("import os\nos._exit(0)\nassert False", mode).status == "failed"
    assert run("raise SystemExit(87)\nassert False", mode).status == "failed"  # the bootstrap's own code
    assert run("import sys\ntry:\n    sys.exit(0)\nfinally:\n    pass\nassert False", mode).status == "failed"
    assert run("import atexit, os\natexit.register(os._exit, 0)\nassert False", mode).status == "failed"
    assert run("print('ok')", mode).passed


def test_confinement_is_reported():
    out = run_program("pass", timeout=10)
    assert out.passed and "seccomp" in out.confinement and "rlimits" in out.confinement
    if os.geteuid() == 0:  # CI runs as root: every namespace is granted
        assert {"mount-ns", "pid-ns", "net-ns", "private-root", "uid-65534", "no-capabilities"} <= set(out.confinement)

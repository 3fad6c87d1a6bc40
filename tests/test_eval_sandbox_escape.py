"""Adversarial programs against the code sandbox: each tries to get out (files, secrets, processes,
signals, network, a forged verdict) and must not. Run both as the caller is and, when the tests run
as root (CI), with root given up first, as an ordinary user would run the sandbox."""
from __future__ import annotations

import functools
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from telechat.eval.sandbox import run_program

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox's mechanisms are Linux's")
MODES = ["as-is", "unprivileged"] if os.geteuid() == 0 else ["as-is"]


UNREADABLE_STDLIB = ("the interpreter's standard library is not readable by an unprivileged user here "
                     "(e.g. a pyenv under a 0700 home): this attempt could not be made")


def run(source: str, mode: str, **kw):
    if mode == "unprivileged":
        kw["drop_root_first"] = True
    out = run_program(source, timeout=kw.pop("timeout", 10), **kw)
    if mode == "unprivileged" and ("ModuleNotFoundError" in out.output or "ImportError" in out.output):
        vacuous.append(UNREADABLE_STDLIB)
    return out


vacuous: list[str] = []


def skip_if_vacuous(test):
    """A test whose attempts needing a module (ctypes, subprocess) were refused only because the module
    could not be imported ends as a skip after its other assertions held, not as a pass."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        vacuous.clear()
        test(*args, **kwargs)
        if vacuous:
            pytest.skip(vacuous[0])
    return wrapper


@pytest.fixture
def helper():
    """A process outside the sandbox, with a secret in its environment."""
    token = "telechat-secret-" + secrets.token_hex(8)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            env={**os.environ, "TELECHAT_TEST_SECRET": token})
    yield proc, token
    proc.kill()
    proc.wait()


# Calls run_program from a process of its own, optionally under a seccomp filter that refuses what
# some kernels and containers refuse (namespaces, Landlock), to check the sandbox degrades without
# claiming more.
_CALLER = r'''
import ctypes, importlib.util, json, os, platform, struct, sys
cfg = json.loads(sys.argv[1])
nrs = {"x86_64": {"unshare": 272}, "aarch64": {"unshare": 97}}[platform.machine()]
deny = ([(nrs["unshare"], 1)] if cfg["no_namespaces"] else []) + ([(444, 38), (445, 38), (446, 38)]
                                                                   if cfg["no_landlock"] else [])
ins = [struct.pack("HBBI", 0x20, 0, 0, 0)]
for nr, errno in deny:
    ins += [struct.pack("HBBI", 0x15, 0, 1, nr), struct.pack("HBBI", 0x06, 0, 0, 0x00050000 | errno)]
ins.append(struct.pack("HBBI", 0x06, 0, 0, 0x7fff0000))
buf = ctypes.create_string_buffer(b"".join(ins))
prog = ctypes.create_string_buffer(struct.pack("HxxxxxxQ", len(ins), ctypes.addressof(buf)))
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl.argtypes = (ctypes.c_int,) + (ctypes.c_ulong,) * 4
if deny:
    assert libc.prctl(38, 1, 0, 0, 0) == 0 and libc.prctl(22, 2, ctypes.addressof(prog), 0, 0) == 0
spec = importlib.util.spec_from_file_location("sandbox_under_test", cfg["module"])
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
spec.loader.exec_module(mod)
out = mod.run_program(cfg["source"], timeout=10, **({"drop_root_first": True} if cfg["drop_root_first"] else {}))
print(json.dumps(out.to_dict()))
'''


@functools.lru_cache(maxsize=None)
def _probe(call: str, drop_root: bool = False) -> str:
    """What `call` (on `libc`) returns in a fresh process, optionally after giving up root."""
    drop = "os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)"
    code = f"import ctypes, os\nlibc = ctypes.CDLL(None)\n{drop if drop_root else ''}\nprint({call})"
    res = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=30)
    return res.stdout.strip()


def _kernel_grants_namespaces(mode: str = "as-is") -> bool:
    """Whether the kernel grants the mount, PID and network namespaces (as the sandbox asks for them)."""
    unprivileged = mode == "unprivileged" or os.geteuid() != 0
    flags = 0x00020000 | 0x20000000 | 0x40000000 | (0x10000000 if unprivileged else 0)
    return _probe(f"libc.unshare({flags})", mode == "unprivileged") == "0"


def _kernel_has_landlock() -> bool:
    return int(_probe("libc.syscall(444, None, 0, 1)") or 0) > 0


def _require_file_confinement(mode: str):
    if not (_kernel_grants_namespaces(mode) or _kernel_has_landlock()):
        pytest.skip("this kernel grants neither namespaces nor Landlock: files are confined by the uid alone")


@pytest.fixture
def open_dir():
    """A directory anyone may write to, reachable by anyone (pytest's tmp_path is under a 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix="telechat-test-open-"))
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("mode", MODES)
@skip_if_vacuous
def test_cannot_write_append_or_delete_outside(open_dir, mode, request):
    _require_file_confinement(mode)
    tmp_path = open_dir
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    os.chmod(victim, 0o666)
    new = tmp_path / "new.txt"
    in_tmp = os.path.join(tempfile.gettempdir(), f"telechat-escape-{secrets.token_hex(6)}.txt")
    request.addfinalizer(lambda: os.path.exists(in_tmp) and os.remove(in_tmp))
    out = run(f"""
import os
for what, act in (("append", lambda: open({str(victim)!r}, "a").write("appended")),
                  ("truncate", lambda: open({str(victim)!r}, "w").write("overwritten")),
                  ("create", lambda: open({str(new)!r}, "w").write("new")),
                  ("delete", lambda: os.remove({str(victim)!r})),
                  ("rename", lambda: os.rename({str(victim)!r}, {str(victim)!r} + ".moved")),
                  ("tmp", lambda: open({in_tmp!r}, "w").write("x"))):
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
    assert not os.path.exists(in_tmp)


@pytest.mark.parametrize("mode", MODES)
@skip_if_vacuous
def test_cannot_read_secrets_host_files_or_the_repo(helper, mode):
    _require_file_confinement(mode)
    proc, token = helper
    here = os.path.abspath(__file__)
    out = run(f"""
import os
files = ["/etc/shadow", "/etc/passwd", {here!r}, os.path.expanduser("~") + "/.bash_history"]
environs = ["/proc/{proc.pid}/environ", "/proc/{os.getpid()}/environ", "/proc/%d/environ" % os.getppid()]
try:
    environs += ["/proc/%s/environ" % p for p in os.listdir("/proc") if p.isdigit()]
except OSError as e:
    print("no /proc listing:", e)
for p in files + environs:
    try:
        with open(p, "rb") as f:
            data = f.read()
    except OSError as e:
        print(p, "refused:", e)
        continue
    # any host file read is a leak, and so is any environment but the sandbox's own minimal one
    if p in files or {token!r}.encode() in data or b"no_proxy=*" not in data:
        print("LEAK", p, data[:200])
""", mode, output_chars=100_000)
    assert out.passed, out.output
    assert "LEAK" not in out.output and token not in out.output


@pytest.mark.parametrize("mode", MODES)
@skip_if_vacuous
def test_cannot_read_the_callers_environment(mode):
    import json

    import telechat.eval.sandbox as sandbox

    token = "telechat-secret-" + secrets.token_hex(8)
    source = """
import os
for pid in (os.getppid(), 1):
    try:
        print(pid, open(f"/proc/{pid}/environ", "rb").read())
    except OSError as e:
        print(pid, "refused:", e)
"""
    cfg = {"module": sandbox.__file__, "source": source, "drop_root_first": mode == "unprivileged",
           "no_namespaces": False, "no_landlock": False}
    res = subprocess.run([sys.executable, "-I", "-c", _CALLER, json.dumps(cfg)], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "TELECHAT_TEST_SECRET": token})
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.splitlines()[-1])
    assert out["status"] == "passed", out["output"]
    assert token not in out["output"]


@pytest.mark.parametrize("mode", MODES)
@skip_if_vacuous
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
@skip_if_vacuous
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
r, w = os.pipe()  # SIGIO-style: the kernel signals the pipe's owner when it becomes readable
print("F_SETOWN", libc.fcntl(r, 8, {os.getpid()}), "F_SETSIG", libc.fcntl(r, 10, {int(signal.SIGUSR2)}),
      "F_SETFL", libc.fcntl(r, 4, os.O_ASYNC | os.O_NONBLOCK), ctypes.get_errno())
os.write(w, b"x")
""", mode)
        time.sleep(0.2)
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert out.passed, out.output
    assert not got, "a sandboxed program signalled the test process"
    assert proc.poll() is None, "a sandboxed program killed a process outside"


def test_disk_use_is_bounded():
    if not _kernel_grants_namespaces():
        pytest.skip("no mount namespace here: the work dir is a plain directory")
    out = run_program("for i in range(100):\n    open(f'f{i}', 'wb').write(bytes(2**20))", timeout=20, file_size_mb=1)
    assert out.status == "failed" and "No space left on device" in out.output


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
@skip_if_vacuous
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
@skip_if_vacuous
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
@skip_if_vacuous
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
for pid in ("1", str(os.getppid())):  # a pipe of the supervisor or the caller: try to answer for it
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:"):
                with open(f"/proc/{pid}/fd/{fd}", "w") as f:
                    f.write('{"exit": 87, "cpu": 0}\\n{"applied": []}\\n')
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


def test_confinement_is_reported_and_matches_what_the_kernel_grants():
    from telechat.eval.sandbox import sandbox_capabilities

    out = run_program("pass", timeout=10)
    assert out.passed and {"seccomp", "rlimits", "no-capabilities"} <= set(out.confinement)
    assert sandbox_capabilities() == out.confinement
    if _kernel_grants_namespaces():
        assert {"mount-ns", "pid-ns", "net-ns", "private-root", "fresh-proc"} <= set(out.confinement)
    assert any(a.startswith("landlock-abi") for a in out.confinement) is _kernel_has_landlock()
    if os.geteuid() == 0:
        assert "uid-65534" in out.confinement


@pytest.mark.parametrize("mode", MODES)
@skip_if_vacuous
def test_degrades_without_namespaces_and_claims_only_what_it_applied(open_dir, helper, mode):
    import json

    import telechat.eval.sandbox as sandbox

    proc, token = helper
    tmp_path = open_dir
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    os.chmod(victim, 0o666)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(4)
    tcp.setblocking(False)
    source = f"""
import ctypes, os, posix, struct
def attempt(what, act):
    try:
        print(what, "->", act(), flush=True)
    except Exception as e:
        print(what, "refused:", type(e).__name__, e, flush=True)
attempt("append", lambda: open({str(victim)!r}, "a").write("appended"))
attempt("create", lambda: open({str(tmp_path / 'new.txt')!r}, "w").write("new"))
attempt("environ", lambda: open("/proc/{proc.pid}/environ", "rb").read())
attempt("fork", lambda: posix.fork() or os._exit(0))
attempt("kill", lambda: posix.kill({proc.pid}, 9))
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.socket(2, 1, 0)
addr = struct.pack("=H", 2) + struct.pack(">H", {tcp.getsockname()[1]}) + bytes([127, 0, 0, 1]) + bytes(8)
print("socket", fd, "connect", libc.connect(fd, addr, len(addr)) if fd >= 0 else None)
os.symlink({str(tmp_path)!r}, "link")  # left for the clean-up, which must not follow it
os.mkdir("locked")
open("locked/f", "w").close()
os.chmod("locked", 0)
"""
    try:
        for no_landlock in (False, True):
            cfg = {"module": sandbox.__file__, "source": source, "drop_root_first": mode == "unprivileged",
                   "no_namespaces": True, "no_landlock": no_landlock}
            res = subprocess.run([sys.executable, "-I", "-c", _CALLER, json.dumps(cfg)], capture_output=True,
                                 text=True, timeout=60)
            assert res.returncode == 0, res.stderr
            out = json.loads(res.stdout.splitlines()[-1])
            applied = set(out["confinement"])
            assert out["status"] == "passed", out["output"]
            assert not any(a.endswith("-ns") for a in applied) and "private-root" not in applied
            assert ("landlock" in " ".join(applied)) is (not no_landlock and _kernel_has_landlock())
            assert "seccomp" in applied
            # what seccomp and a uid of its own guarantee, whatever else is missing
            assert "fork -> 0" not in out["output"] and proc.poll() is None
            with pytest.raises(BlockingIOError):
                tcp.accept()
            if os.geteuid() == 0 or mode == "unprivileged":  # the program ran as another uid
                assert token not in out["output"]
            if not no_landlock and _kernel_has_landlock():  # without it, files anyone may write to are writable
                assert victim.read_text() == "original" and not (tmp_path / "new.txt").exists()
            assert os.stat(tmp_path).st_mode & 0o777 == 0o777
    finally:
        tcp.close()


def _same_uid_victim() -> subprocess.Popen:
    """A process of the uid the sandboxed program runs as (nobody under root), which SIGIO's default
    action would kill."""
    demote = None
    if os.geteuid() == 0:
        def demote():
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
    return subprocess.Popen([shutil.which("sleep") or "/bin/sleep", "60"], preexec_fn=demote)


# The owner of an O_ASYNC descriptor gets SIGIO (by default fatal) when it becomes ready; the owner is set
# by fcntl(F_SETOWN/F_SETOWN_EX) or by the ioctls FIOSETOWN/SIOCSPGRP, on the AF_UNIX pair asyncio needs.
_SIGIO_ROUTES = {"fcntl F_SETOWN": "libc.fcntl(a, 8, ctypes.c_int(PID))",
                 "ioctl FIOSETOWN": "libc.ioctl(a, 0x8901, ctypes.byref(ctypes.c_int(PID)))",
                 "ioctl SIOCSPGRP": "libc.ioctl(a, 0x8902, ctypes.byref(ctypes.c_int(PID)))"}


@pytest.mark.parametrize("route", list(_SIGIO_ROUTES))
@pytest.mark.parametrize("degraded", [False, True], ids=["confined", "seccomp-only"])
def test_no_sigio_to_a_process_of_the_same_uid(route, degraded):
    """Also where seccomp is all the kernel grants (no namespaces, no Landlock): the program's own uid is
    no barrier then, so the filter must refuse every way to name another process as a SIGIO owner."""
    import json

    import telechat.eval.sandbox as sandbox

    victim = _same_uid_victim()
    source = f"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
sv = (ctypes.c_int * 2)()
print("socketpair", libc.socketpair(1, 1, 0, sv))
a, b = sv[0], sv[1]
PID = {victim.pid}
print("owner", {_SIGIO_ROUTES[route]}, ctypes.get_errno())
print("async", libc.fcntl(a, 4, os.O_ASYNC | os.O_NONBLOCK), ctypes.get_errno())
os.write(b, b"x")
"""
    try:
        cfg = {"module": sandbox.__file__, "source": source, "drop_root_first": False,
               "no_namespaces": degraded, "no_landlock": degraded}
        res = subprocess.run([sys.executable, "-I", "-c", _CALLER, json.dumps(cfg)], capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout.splitlines()[-1])
        assert out["status"] == "passed", out["output"]
        assert "socketpair 0" in out["output"], out["output"]  # the route was really open up to the owner
        time.sleep(0.3)
        assert victim.poll() is None, f"SIGIO through {route} killed a process outside: {out['output']}"
        assert "owner -1 " in out["output"], out["output"]  # refused (EPERM; ESRCH in a PID namespace)
    finally:
        victim.kill()
        victim.wait()

"""Run model-written Python in a separate, limited process.

Each program runs in a fresh `python -I` in its own session and temporary working directory, with
a minimal environment and, set by the child on itself before the program starts:
- no network: a new network namespace when the kernel allows it (root, or unprivileged user
  namespaces), and in any case `socket`, `subprocess`, `os.fork`/`os.system`/`exec*` replaced by
  functions that raise;
- rlimits: address space (memory), CPU seconds, file size, open files, no core dumps.
The parent kills the whole process group at the wall-clock timeout, so a hanging program is a
failure and never stalls the run. This contains accidents of generated code, not a determined
attacker (who could, e.g., use ctypes); run untrusted models in a container as well.
"""
from __future__ import annotations

import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

_CHILD = r'''
import sys
def _confine(mem, cpu, fsize):
    import ctypes, os, resource
    isolation = "guard"
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(0x40000000) == 0:  # CLONE_NEWNET
            isolation = "netns"
        elif libc.unshare(0x10000000 | 0x40000000) == 0:  # CLONE_NEWUSER | CLONE_NEWNET
            isolation = "userns+netns"
    except Exception:
        pass
    os.environ["TELECHAT_SANDBOX"] = isolation
    def blocked(*args, **kwargs):
        raise PermissionError("disabled in the evaluation sandbox")
    import socket, _socket, subprocess
    for mod, names in ((socket, ("socket", "create_connection", "create_server", "socketpair", "fromfd",
                                 "getaddrinfo", "gethostbyname")),
                       (_socket, ("socket", "socketpair", "getaddrinfo", "gethostbyname")),
                       (subprocess, ("Popen", "run", "call", "check_call", "check_output", "getoutput")),
                       (os, ("fork", "forkpty", "system", "popen", "execv", "execve", "execvp", "execvpe", "execl",
                             "execle", "execlp", "execlpe", "spawnv", "spawnve", "posix_spawn", "posix_spawnp",
                             "kill", "killpg", "setuid", "setgid", "putenv", "unsetenv"))):
        for name in names:
            if hasattr(mod, name):
                setattr(mod, name, blocked)
    limits = [(resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_CORE, 0),
              (resource.RLIMIT_NOFILE, 256)]
    if mem > 0:
        limits.append((resource.RLIMIT_AS, mem))
    for what, value in limits:
        resource.setrlimit(what, (value, value))
_confine(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
_done = sys.argv[4]
sys.argv = ["program.py"]
del _confine
with open("program.py", encoding="utf-8") as _f:
    _source = _f.read()
exec(compile(_source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
# Printed only when the program ran to its end: a sys.exit(0) half-way does not pass.
sys.stdout.write("\n" + _done + "\n")
sys.stdout.flush()
'''


@dataclass
class Outcome:
    """status: passed, failed (non-zero exit, e.g. an assertion), timeout (wall clock or CPU
    limit), crashed (killed by a signal), or error (could not start)."""
    status: str
    returncode: int | None
    seconds: float
    output: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


def run_program(source: str, timeout: float = 10.0, memory_mb: int = 1024, cpu_seconds: int | None = None,
                file_size_mb: int = 16, output_chars: int = 2000) -> Outcome:
    """Run `source` as a Python program in the sandbox and report how it ended."""
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    cpu = int(cpu_seconds if cpu_seconds is not None else math.ceil(timeout) + 1)
    done_marker = "telechat-sandbox-done-" + secrets.token_hex(8)
    work = tempfile.mkdtemp(prefix="telechat-sandbox-")
    start = time.monotonic()
    try:
        with open(os.path.join(work, "program.py"), "w", encoding="utf-8") as f:
            f.write(source)
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "no_proxy": "*"}
        out_path = os.path.join(work, "output.txt")
        with open(out_path, "wb") as out:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-c", _CHILD, str(memory_mb * 2**20 if memory_mb else 0), str(cpu),
                     str(file_size_mb * 2**20), done_marker],
                    cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True)
            except OSError as e:
                return Outcome("error", None, 0.0, f"could not start the sandbox: {e}")
            try:
                rc = proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                rc = None
            finally:
                try:  # the program's whole process group, children included
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                if rc is None:
                    rc = proc.wait()
        seconds = time.monotonic() - start
        with open(out_path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4 * output_chars))
            text = f.read().decode("utf-8", "replace")
        finished = done_marker in text
        text = text.replace("\n" + done_marker + "\n", "")[-output_chars:]
        if timed_out or rc == -signal.SIGXCPU:
            return Outcome("timeout", rc, seconds, text)
        if rc == 0:
            if finished:
                return Outcome("passed", 0, seconds, text)
            return Outcome("failed", 0, seconds, text + "\n[exited before the end of the program]")
        if rc < 0:
            return Outcome("crashed", rc, seconds, text + f"\n[killed by signal {-rc}]")
        return Outcome("failed", rc, seconds, text)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_programs(sources: list[str], workers: int = 2, progress=None, **limits) -> list[Outcome]:
    """`run_program` over many programs, `workers` at a time, results in order."""
    def one(src):
        r = run_program(src, **limits)
        if progress is not None:
            progress(1)
        return r

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, sources))


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program that passes iff the completed function passes the problem's `check`."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"

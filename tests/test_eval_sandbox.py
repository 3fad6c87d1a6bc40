"""The code sandbox: passing, failing, hanging, memory-hungry, networked, crashing and early-exiting
programs, and many hanging programs at once never stalling the run."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from telechat.eval.data import Item
from telechat.eval.sandbox import humaneval_program, run_program, run_programs


def test_pass_and_fail():
    ok = run_program("assert sum([1, 2]) == 3\nprint('fine')", timeout=5)
    assert ok.passed and ok.status == "passed" and "fine" in ok.output
    bad = run_program("assert 1 + 1 == 3", timeout=5)
    assert bad.status == "failed" and "AssertionError" in bad.output
    syntax = run_program("def f(:\n", timeout=5)
    assert syntax.status == "failed" and "SyntaxError" in syntax.output


def test_hang_is_a_timeout_and_does_not_stall():
    t = time.monotonic()
    spin = run_program("while True:\n    pass", timeout=1)
    sleep = run_program("import time\ntime.sleep(60)", timeout=1)
    assert spin.status == "timeout" and sleep.status == "timeout"
    assert time.monotonic() - t < 10


def test_many_hanging_programs_finish_in_bounded_time():
    t = time.monotonic()
    out = run_programs(["import time\ntime.sleep(60)"] * 4 + ["print(1)"], workers=2, timeout=1)
    assert [o.status for o in out] == ["timeout"] * 4 + ["passed"]
    assert time.monotonic() - t < 15


def test_memory_limit():
    out = run_program("x = bytearray(2 * 2**30)\nprint(len(x))", timeout=10, memory_mb=256)
    assert out.status == "failed" and "MemoryError" in out.output


def test_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.1)
    port = server.getsockname()[1]
    got, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                got.append(server.accept())
            except OSError:
                pass

    th = threading.Thread(target=accept)
    th.start()
    out = run_program(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                      "s.sendall(b'hello')", timeout=5)
    out2 = run_program(f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))", timeout=5)
    stop.set()
    th.join()
    server.close()
    assert out.status == "failed" and out2.status == "failed"
    assert not got, "a sandboxed program reached a listening socket"


def test_no_subprocess_and_temp_workdir(tmp_path):
    out = run_program("import subprocess\nsubprocess.run(['true'])", timeout=5)
    assert out.status == "failed" and "PermissionError" in out.output
    out = run_program("import os\nprint(os.getcwd())\nprint(sorted(os.environ))\nopen('f.txt', 'w').write('x')",
                      timeout=5)
    assert out.passed
    cwd = out.output.splitlines()[0]
    assert "telechat-sandbox-" in cwd and not __import__("os").path.exists(cwd)  # removed afterwards
    assert "PYTHONPATH" not in out.output


def test_crash_and_early_exit_are_failures():
    crash = run_program("import ctypes\nctypes.string_at(0)", timeout=5)
    assert crash.status == "crashed" and crash.returncode < 0
    early = run_program("import sys\nsys.exit(0)\nassert False", timeout=5)
    assert early.status == "failed"  # exiting 0 before the tests ran is not a pass
    big = run_program("while True:\n    print('x' * 10000)", timeout=5, file_size_mb=1)
    assert not big.passed


def test_humaneval_program():
    item = Item("HumanEval/0", "humaneval", "def add(a, b):\n    \"\"\"Add.\"\"\"\n", None, None,
                {"test": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "entry_point": "add"})
    good = humaneval_program(item.question, "    return a + b\n", item.meta["test"], "add")
    wrong = humaneval_program(item.question, "    return a - b\n", item.meta["test"], "add")
    hang = humaneval_program(item.question, "    while True:\n        pass\n", item.meta["test"], "add")
    res = run_programs([good, wrong, hang], workers=2, timeout=2)
    assert [r.status for r in res] == ["passed", "failed", "timeout"]


@pytest.mark.slow
def test_canonical_humaneval_solutions_pass():
    from conftest import shared_path
    from telechat.eval.data import load_humaneval

    items = load_humaneval(shared_path("data", "eval", "humaneval"))
    progs = [humaneval_program(it.question, it.answer, it.meta["test"], it.meta["entry_point"]) for it in items]
    res = run_programs(progs, workers=2, timeout=10)
    assert [it.id for it, r in zip(items, res) if not r.passed] == []

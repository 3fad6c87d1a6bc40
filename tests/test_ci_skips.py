""".ci/run fails when a test skips for a reason outside tests/skip_allowlist.txt, and keeps pytest's
own exit status. Runs the real .ci/run, conftest.py and allow-list in a scratch copy of the layout,
with `pip` stubbed out and a handful of fake tests."""
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ALLOWED = '''
import pytest

@pytest.mark.skipif(True, reason="needs CUDA")
def test_gpu():
    pass

def test_as_root():
    pytest.skip("root reads files whatever their mode")

@pytest.mark.xfail(reason="an xfail is not a skip")
def test_xfail():
    assert False

def test_passes():
    pass
'''

UNEXPECTED = '''
import pytest

@pytest.fixture
def data():
    pytest.skip("/somewhere/shared/oracle/v12 not available")

def test_needs_data(data):
    pass

def test_in_body():
    pytest.skip("the moon is full")
'''


def run_ci(tmp_path: Path, files: dict[str, str]) -> subprocess.CompletedProcess:
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    (repo / "tests").mkdir()
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    for name in ("conftest.py", "skip_allowlist.txt"):
        shutil.copy(ROOT / "tests" / name, repo / "tests" / name)
    for name, text in files.items():
        (repo / "tests" / name).write_text(text)
    fake = tmp_path / "bin"
    fake.mkdir()
    # pip: the package is installed already; chromium and a CJK font "present": no apt-get
    for name, body in {"pip": "exit 0", "chromium": "exit 0", "fc-list": "echo font"}.items():
        (fake / name).write_text(f"#!/bin/sh\n{body}\n")
        (fake / name).chmod(stat.S_IRWXU)
    env = {**os.environ, "PATH": f"{fake}:{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    for k in ("TELECHAT_SKIP_REPORT", "TELECHAT_SKIP_ALLOWLIST", "PYTEST_ADDOPTS"):
        env.pop(k, None)
    return subprocess.run(["bash", str(repo / ".ci" / "run")], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.slow
def test_allowed_skips_pass(tmp_path):
    r = run_ci(tmp_path, {"test_allowed.py": ALLOWED})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "error:" not in r.stderr and "2 skipped" in r.stdout


@pytest.mark.slow
def test_unexpected_skips_fail_and_are_listed(tmp_path):
    r = run_ci(tmp_path, {"test_allowed.py": ALLOWED, "test_unexpected.py": UNEXPECTED,
                          "test_module.py": "import pytest\npytest.importorskip('no_such_module_h7')\n"})
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    err = r.stderr
    assert "error: 3 test(s) skipped for reasons not in tests/skip_allowlist.txt:" in err
    assert "tests/test_unexpected.py::test_needs_data: /somewhere/shared/oracle/v12 not available" in err
    assert "tests/test_unexpected.py::test_in_body: the moon is full" in err
    assert "tests/test_module.py: could not import 'no_such_module_h7'" in err
    assert "needs CUDA" not in err and "root reads" not in err and "xfail" not in err


@pytest.mark.slow
def test_pytest_exit_status_is_kept(tmp_path):
    # a collection error (pytest exits 2) beside an unexpected skip: the run exits 2, not 1
    r = run_ci(tmp_path, {"test_module.py": "import pytest\npytest.importorskip('no_such_module_h7')\n",
                          "test_broken.py": "def oops(:\n"})
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "tests/test_module.py: could not import 'no_such_module_h7'" in r.stderr  # still listed


def test_allowlist_patterns_are_valid():
    from conftest import read_skip_allowlist

    patterns = read_skip_allowlist(ROOT / "tests" / "skip_allowlist.txt")
    assert any(p.search("needs CUDA") for p in patterns)
    assert not any(p.search(f"{ROOT.parent / 'shared' / 'oracle'} not available") for p in patterns)

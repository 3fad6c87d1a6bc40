"""A persistent torch.compile cache under $TELECHAT_HOME, so a second start skips most compiling."""
from __future__ import annotations

import os


def enable_compile_cache() -> str:
    """Point inductor's on-disk caches at $TELECHAT_HOME/compile-cache unless the user chose a place."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        from .default_model import telechat_home

        path = telechat_home() / "compile-cache"
        path.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]

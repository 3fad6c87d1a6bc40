"""`--device auto` and `--dtype auto`: what this machine runs fastest, decided at run time."""
from __future__ import annotations

import functools
import os
import sys

import torch


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matrix math in hardware (faster than fp32). AVX2-only CPUs emulate
    bf16 and run it slower than fp32."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_summary() -> str:
    """The flags that decide kernels and dtypes here, e.g. "avx2 fma f16c" or "... avx512_bf16 amx_bf16"."""
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return " ".join(f for f in wanted if f in cpu_flags()) or "none of avx2/avx512/amx"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto" (or None): CUDA when present, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype, device: torch.device) -> torch.dtype | str | None:
    """"auto": bf16 on GPUs with bf16 (else fp16) and on CPUs with native bf16, fp32 on other CPUs;
    $TELECHAT_DTYPE, when set, is what auto means. Anything else is returned unchanged (None keeps
    the checkpoint's own)."""
    if dtype != "auto":
        return dtype
    if os.environ.get("TELECHAT_DTYPE"):
        return os.environ["TELECHAT_DTYPE"]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return None


def describe(device: torch.device, dtype: torch.dtype, decoder: str | bool) -> str:
    """One line for the start of chat/serve/eval: what was chosen and why. decoder: the engine's
    ("native", "compiled" or "eager"; a bool: compiled or not)."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_summary()})"
    if isinstance(decoder, bool):
        decoder = "compiled" if decoder else "eager"
    return f"device {device} [{where}], dtype {str(dtype).removeprefix('torch.')}, {decoder} decode"


def release_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim; nothing elsewhere). glibc keeps
    freed memory otherwise, and long prefills leave it fragmented: resident memory then grows with the
    number of chunks, not with what is in use."""
    if not sys.platform.startswith("linux"):
        return
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@functools.lru_cache(maxsize=1)
def _libc():
    import ctypes

    return ctypes.CDLL(None)

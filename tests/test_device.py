"""`--device auto` / `--dtype auto`: the choice follows the machine (CPU flags, CUDA)."""
from __future__ import annotations

import torch

import telechat
from telechat import device as dev


def _flags(monkeypatch, flags: str):
    monkeypatch.setattr(dev, "cpu_flags", lambda: frozenset(flags.split()))


def test_auto_dtype_follows_cpu_flags(monkeypatch):
    monkeypatch.delenv("TELECHAT_DTYPE", raising=False)
    cpu = torch.device("cpu")
    _flags(monkeypatch, "sse4_2 avx2 fma f16c")  # AVX2 only: bf16 is emulated, slower than fp32
    assert dev.resolve_dtype("auto", cpu) == torch.float32 and not dev.cpu_has_native_bf16()
    _flags(monkeypatch, "avx2 fma avx512f avx512_bf16")
    assert dev.resolve_dtype("auto", cpu) == torch.bfloat16
    _flags(monkeypatch, "avx2 fma avx512f amx_bf16 amx_tile")
    assert dev.resolve_dtype("auto", cpu) == torch.bfloat16
    assert dev.resolve_dtype("float16", cpu) == "float16" and dev.resolve_dtype(None, cpu) is None
    monkeypatch.setenv("TELECHAT_DTYPE", "float32")  # the user's override of what auto means
    assert dev.resolve_dtype("auto", cpu) == "float32"


def test_auto_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dev.resolve_device("auto") == torch.device("cpu") and dev.resolve_device(None).type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.resolve_device("auto") == torch.device("cuda")
    assert dev.resolve_device("cpu") == torch.device("cpu")


def test_load_defaults_to_this_machines_choice(monkeypatch, tmp_path):
    """On this machine, with no override, load() picks what its CPU flags say (bf16 with AVX-512
    BF16/AMX, else fp32), whatever the checkpoint stores; dtype=None keeps the checkpoint's."""
    monkeypatch.delenv("TELECHAT_DTYPE", raising=False)
    dev.cpu_flags.cache_clear()
    telechat.from_preset("tiny", seed=0).save(tmp_path)  # a float32 checkpoint
    want = torch.bfloat16 if dev.cpu_has_native_bf16() else torch.float32
    llm = telechat.load(tmp_path)
    assert llm.dtype == want and llm.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert telechat.load(tmp_path, dtype=None).dtype == torch.float32
    assert "dtype" in dev.describe(llm.device, llm.dtype, False)

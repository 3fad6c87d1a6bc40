"""telechat's CPU operators for quantized and 16-bit weights, built with the C++ compiler at first use.

`torch.ops.telechat.qlinear(x, codes, scales, mins, zeros, bias, bits, group_size)` multiplies
activations by 4- or 8-bit weight codes the way llama.cpp does: each block of 32 activations is
rounded to int8 with its own scale and the codes enter integer dot products (AVX-512 VNNI
`vpdpbusd`, AVX2 `vpmaddubsw`), so the weights are read once, as codes, on every core. The layout
is in csrc/qgemm_kernel.cpp; the result equals, up to fp32 rounding, the dequantized weight times
`fake_quantize_activations(x)` (the tests hold every instruction set to that float64 reference).
`torch.ops.telechat.hlinear(x, w, bias)` is F.linear for a weight read as stored (fp32, or bf16/fp16
kept 16-bit, e.g. a tied lm_head) in fp32 arithmetic, for a few rows.

Both are registered with TORCH_LIBRARY and have fake implementations, so torch.compile places them
in its graphs as they are. The kernel source is compiled once per instruction set (portable C, AVX2,
AVX-512 VNNI) into one library under $TELECHAT_HOME/kernels, and the operator chooses the best one
the CPU has when it is first called; `TELECHAT_CPU_ISA=avx2|portable` (or `cpu_isa("avx2")`) forces
a lower one. Without a compiler `available()` is False and quantized layers dequantize instead.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

_CSRC = Path(__file__).with_name("csrc")
# name -> (TELECHAT_ISA, compiler flags); a variant the compiler cannot build is left out of the library
_VARIANTS = {"portable": (0, []),
             "avx2": (1, ["-mavx2", "-mfma", "-mf16c"]),
             "avx512": (2, ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"])}
_COMMON = ["-O3", "-fPIC", "-std=c++17", "-fopenmp"]
_OP_SOURCES = ("qgemm_op.cpp", "decode_op.cpp")  # with torch's headers, over the kernels of isa.h
BLOCK = 32  # activations are rounded to int8 per block of this many columns


def supports(bits: int, in_features: int, out_features: int, group_size: int) -> bool:
    """The shapes qlinear takes: whole blocks of 32 columns, groups made of whole blocks."""
    return bits in (4, 8) and group_size % BLOCK == 0 and in_features % group_size == 0 and out_features > 0


def _compiler() -> str | None:
    for cc in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cc and shutil.which(cc):
            return cc
    return None


def _build(cxx: str, folder: Path, key: str) -> Path:
    from torch.utils.cpp_extension import include_paths, library_paths

    lib = folder / f"telechat_ops-{key}.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        objects = []
        for name, (level, flags) in _VARIANTS.items():
            obj = os.path.join(tmp, f"kernel_{name}.o")
            cmd = [cxx, *_COMMON, *flags, f"-DTELECHAT_ISA={level}", f"-DTELECHAT_SUFFIX=_{name}", "-c",
                   str(_CSRC / "qgemm_kernel.cpp"), "-o", obj]
            done = subprocess.run(cmd, capture_output=True, timeout=300)
            if done.returncode == 0:
                objects.append(obj)
            elif name == "portable":
                raise subprocess.CalledProcessError(done.returncode, cmd, done.stdout, done.stderr)
        includes = [f"-I{p}" for p in include_paths()]
        libdirs = library_paths()
        ops = []
        for name in _OP_SOURCES:
            ops.append(os.path.join(tmp, f"{name}.o"))
            subprocess.run([cxx, *_COMMON, abi, *includes, "-c", str(_CSRC / name), "-o", ops[-1]],
                           check=True, capture_output=True, timeout=600)
        out = os.path.join(tmp, "ops.so")
        subprocess.run([cxx, "-shared", "-fopenmp", *ops, *objects, "-o", out, *[f"-L{d}" for d in libdirs],
                        *[f"-Wl,-rpath,{d}" for d in libdirs], "-lc10", "-ltorch_cpu"],
                       check=True, capture_output=True, timeout=300)
        os.replace(out, lib)  # atomic: a concurrent build leaves one complete file
    return lib


@functools.lru_cache(maxsize=None)
def _library() -> Path | None:
    """The operators' library (built on first use, then loaded from the cache folder), or None."""
    from ..default_model import telechat_home

    cxx = _compiler()
    if cxx is None or sys.platform == "win32":
        return None
    sources = "\0".join((_CSRC / n).read_text() for n in ("qgemm_kernel.cpp", "isa.h", *_OP_SOURCES))
    key = hashlib.sha256("\0".join([sources, cxx, torch.__version__, *_COMMON, repr(_VARIANTS),
                                    os.uname().machine]).encode()).hexdigest()[:16]
    try:
        lib = _build(cxx, telechat_home() / "kernels", key)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        warnings.warn(f"telechat: could not build the int4/int8 CPU operators with {cxx} "
                      f"({e}; {detail.decode(errors='replace')[-400:]}); using dequantize-then-matmul")
        return None
    torch.ops.load_library(str(lib))
    _register_fakes()
    want = os.environ.get("TELECHAT_CPU_ISA", "auto")
    got = torch.ops.telechat.cpu_isa("")
    if want not in ("auto", "", got):
        warnings.warn(f"telechat: TELECHAT_CPU_ISA={want!r} is not an instruction set this CPU has; using {got!r} "
                      f"(choices: avx512_vnni, avx2, portable, auto)")
    return lib


def _register_fakes() -> None:
    @torch.library.register_fake("telechat::qlinear")
    def _(x, codes, scales, mins, zeros, bias, bits, group_size):
        return x.new_empty(*x.shape[:-1], codes.shape[0])

    @torch.library.register_fake("telechat::hlinear")
    def _(x, weight, bias):
        return x.new_empty(*x.shape[:-1], weight.shape[0])


_loaded: dict[str, bool] = {}  # read, not called, inside compiled graphs


def _load() -> bool:
    _loaded["ok"] = _library() is not None
    return _loaded["ok"]


def available() -> bool:
    ok = _loaded.get("ok")
    if ok is not None:
        return ok
    if torch.compiler.is_compiling():  # traced: build and load outside the graph
        return torch.compiler.disable(_load)()
    return _load()  # (no decorator at import: torch.compiler.disable imports torch._dynamo, ~150 MiB)


def cpu_isa(want: str = "") -> str:
    """The instruction set the operators use (avx512_vnni, avx2 or portable); `want` switches to another
    one the CPU has ("auto": the best)."""
    if not available():
        raise RuntimeError("telechat's CPU operators are not built on this machine (no C++ compiler)")
    return torch.ops.telechat.cpu_isa(want)


def qlinear(x: Tensor, codes: Tensor, scales: Tensor, mins: Tensor | None, zeros: Tensor | None,
            bias: Tensor | None, bits: int, group_size: int) -> Tensor:
    """x [..., K] -> [..., N] (x's dtype) for weights in the rows layout (see the module docstring)."""
    return torch.ops.telechat.qlinear(x, codes, scales, mins, zeros, bias, bits, group_size)


def fake_quantize_activations(x: Tensor) -> Tensor:
    """x [..., K] as qlinear sees it: each block of 32 rounded to int8 steps of max|x| / 127 (fp32)."""
    xb = x.float().reshape(*x.shape[:-1], -1, BLOCK)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(xb * inv) * (amax / 127.0)).reshape(x.shape)


_HALF = (torch.float16, torch.bfloat16)
HALF_MAX_ROWS = 16  # above this many rows, BLAS on the upcast weight is faster than one pass per row


def half_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) for fp32 x and a 16-bit weight [N, K] kept 16-bit, in fp32 arithmetic.

    On CPU the operator reads the weight once, as 16-bit, on every core; elsewhere the weight is
    upcast for the call."""
    rows = x.numel() // max(x.shape[-1], 1)
    if (x.dtype != torch.float32 or weight.dtype not in _HALF or x.device.type != "cpu" or rows > HALF_MAX_ROWS
            or not weight.is_contiguous() or not available()):
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return torch.ops.telechat.hlinear(x, weight, None if bias is None else bias.float())

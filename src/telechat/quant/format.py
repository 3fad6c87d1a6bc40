"""The GPTQ checkpoint format TeleChat publishes (AutoGPTQ "v1"; spec section 7).

Per quantized linear layer with K input and N output features, G = K / group_size groups:

    qweight  int32 [K * bits / 32, N]   codes q[k, n] in 0 .. 2^bits - 1, packed along K, low bits first
    qzeros   int32 [G, N * bits / 32]   zero points minus one, packed along N the same way
    scales   fp16  [G, N]
    g_idx    int32 [K]                  the group of each input feature (not sorted with act-order)

    w[n, k] = scales[g, n] * (q[k, n] - zero[g, n]),  g = g_idx[k]

plus `quantize_config.json` and a `quantization_config` block in config.json (what transformers
and vLLM look for).

One extension, for GGUF Q4_1 weights kept as they are (`telechat import --keep-quantized`): their
offsets are not whole codes, so such a layer stores `mins` fp16 [G, N] in place of `qzeros`,

    w[n, k] = scales[g, n] * q[k, n] + mins[g, n],

and quantize_config.json says `"meta": {"zero_point": "float"}`. AutoGPTQ cannot read those
layers; every other folder this project writes is plain AutoGPTQ v1.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..config import read_json

SUPPORTED_BITS = (4, 8)
METHODS = ("gptq", "rtn")
ZERO_POINTS = ("int", "float")
# The published true-sequential order: each group is quantized seeing the already quantized groups before it.
MODULE_ORDER: tuple[tuple[str, ...], ...] = (
    ("self_attention.key_value", "self_attention.query"),
    ("self_attention.dense",),
    ("mlp.up_proj", "mlp.gate_proj"),
    ("mlp.down_proj",),
)
QUANTIZED_MODULES = tuple(name for group in MODULE_ORDER for name in group)
# Layers whose outputs become cached keys and values: every later token attends to the first token's (the
# attention sink's), so its error there weighs far more than its one-in-a-window share of the Hessian says.
SINK_WEIGHTED_MODULES = ("self_attention.key_value",)


class QuantError(ValueError):
    """A quantization request or quantized checkpoint that cannot be used; the message names the problem."""


@dataclass
class QuantConfig:
    bits: int = 4
    group_size: int = 128  # -1: one group per output row (all K inputs)
    sym: bool = True
    desc_act: bool = False  # act-order: quantize columns by decreasing Hessian diagonal
    # Hessian dampening, a fraction of its mean diagonal (wider layers get proportionally more; see gptq()).
    # AutoGPTQ's 0.01 fits the calibration text so closely that GPTQ lost to round-to-nearest on other text.
    damp_percent: float = 1.5
    true_sequential: bool = True
    sink_weight: float = 1.0  # the first token of each sample, in key_value's Hessian, weighs as much as all others
    method: str = "gptq"  # how the codes were found (gptq or rtn); the tensors are the same format
    zero_point: str = "int"  # "float": fp16 `mins` in place of qzeros (GGUF Q4_1 kept as it is)
    source: str | None = None  # where the codes came from when not quantized here (e.g. "gguf Q4_1")

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise QuantError(f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {self.bits}")
        g = self.group_size
        if not (g == -1 or (isinstance(g, int) and g >= 16 and g & (g - 1) == 0)):
            raise QuantError(f"group_size must be -1 (one group per row) or a power of two >= 16, got {g}")
        if not 0 < self.damp_percent <= 100:
            raise QuantError(f"damp_percent must be in (0, 100], got {self.damp_percent}")
        if not 0 <= self.sink_weight <= 1000:
            raise QuantError(f"sink_weight must be in [0, 1000], got {self.sink_weight}")
        if self.method not in METHODS:
            raise QuantError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.zero_point not in ZERO_POINTS:
            raise QuantError(f"zero_point must be one of {', '.join(ZERO_POINTS)}, got {self.zero_point!r}")

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    @property
    def pack_factor(self) -> int:
        return 32 // self.bits

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def check_layer(self, name: str, in_features: int, out_features: int) -> None:
        """A clear error when a layer's shape cannot be stored with these settings."""
        gs = self.group_size_for(in_features)
        if in_features % gs:
            raise QuantError(f"{name}: in_features {in_features} is not divisible by group_size {gs}; "
                             f"choose a group size dividing it (e.g. {_largest_pow2_divisor(in_features)}) or -1")
        for what, n in (("in_features", in_features), ("out_features", out_features)):
            if n % self.pack_factor:
                raise QuantError(f"{name}: {what} {n} is not divisible by {self.pack_factor} "
                                 f"(int32 words hold {self.pack_factor} {self.bits}-bit values)")

    # ---- json ----------------------------------------------------------------------------------
    def to_quantize_config(self) -> dict:
        """quantize_config.json, AutoGPTQ's field names (the published files have the first six)."""
        return {"bits": self.bits, "group_size": self.group_size, "damp_percent": self.damp_percent,
                "desc_act": self.desc_act, "sym": self.sym, "true_sequential": self.true_sequential,
                "model_name_or_path": None, "model_file_base_name": "model",
                "quant_method": "gptq", "checkpoint_format": "gptq",
                "meta": {"quantizer": ["telechat"], "method": self.method, "sink_weight": self.sink_weight,
                         **({"zero_point": self.zero_point} if self.zero_point != "int" else {}),
                         **({"source": self.source} if self.source else {})}}

    def to_hf(self) -> dict:
        """config.json's `quantization_config` (transformers' GPTQConfig fields; not
        `modules_in_block_to_quantize`, which makes transformers require optimum)."""
        d = self.to_quantize_config()
        for k in ("model_name_or_path", "model_file_base_name"):
            d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "QuantConfig":
        if not isinstance(d, dict):
            raise QuantError(f"{source}: expected a JSON object, got {type(d).__name__}")
        method = d.get("quant_method", "gptq")
        if str(method).lower() != "gptq":
            raise QuantError(f"{source}: quant_method {method!r} is not supported (expected 'gptq')")
        fmt = d.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", None):
            raise QuantError(f"{source}: checkpoint_format {fmt!r} is not supported (expected 'gptq', "
                             f"AutoGPTQ's v1 layout)")
        missing = [k for k in ("bits", "group_size") if k not in d]
        if missing:
            raise QuantError(f"{source}: missing field(s) {', '.join(missing)}")
        meta = d.get("meta") if isinstance(d.get("meta"), dict) else {}
        damp = d.get("damp_percent", 0.01)
        sink = meta.get("sink_weight", 0.0)  # files from other quantizers: the plain Hessian
        for key, v in (("damp_percent", damp), ("meta.sink_weight", sink)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise QuantError(f"{source}: {key} must be a number, got {v!r:.60}")
        origin = meta.get("source")
        try:
            return cls(bits=d["bits"], group_size=d["group_size"], sym=bool(d.get("sym", True)),
                       desc_act=bool(d.get("desc_act", False)), damp_percent=float(damp),
                       true_sequential=bool(d.get("true_sequential", True)), method=meta.get("method", "gptq"),
                       sink_weight=float(sink), zero_point=meta.get("zero_point", "int"),
                       source=origin if isinstance(origin, str) else None)
        except (QuantError, TypeError, ValueError) as e:  # float("x"), bits "4", ...
            raise QuantError(f"{source}: {e}") from None

    def describe(self) -> str:
        if self.source:
            return f"{self.source} (int{self.bits} g{self.group_size})"
        g = "per-row" if self.group_size == -1 else f"g{self.group_size}"
        return (f"{self.method} int{self.bits} {g} {'sym' if self.sym else 'asym'}"
                f"{' act-order' if self.desc_act else ''}")


def _largest_pow2_divisor(n: int) -> int:
    return n & -n


def read_quant_config(path: str | Path) -> QuantConfig | None:
    """The quantization of a checkpoint folder (config.json `quantization_config` and/or
    quantize_config.json; they must agree), or None for a float checkpoint."""
    path = Path(path)
    found: dict[str, QuantConfig] = {}
    cfg_file = path / "config.json"
    try:
        block = read_json(cfg_file, QuantError).get("quantization_config")
    except (FileNotFoundError, QuantError):
        block = None  # the config loader reports a missing or broken config.json
    if block is not None:
        found["config.json"] = QuantConfig.from_dict(block, f"{cfg_file}: quantization_config")
    qc_file = path / "quantize_config.json"
    if os.path.lexists(qc_file):
        try:
            d = read_json(qc_file, QuantError, expect=None)
        except FileNotFoundError:
            raise QuantError(f"{qc_file}: cannot be read (dangling link)") from None
        found["quantize_config.json"] = QuantConfig.from_dict(d, str(qc_file))
    if len(found) == 2:
        a, b = found["config.json"], found["quantize_config.json"]
        for f in ("bits", "group_size", "sym", "desc_act"):
            if getattr(a, f) != getattr(b, f):
                raise QuantError(f"{path}: config.json quantization_config has {f}={getattr(a, f)} but "
                                 f"quantize_config.json has {f}={getattr(b, f)}")
    return found.get("config.json") or found.get("quantize_config.json")


def write_quant_config(path: str | Path, qcfg: QuantConfig) -> None:
    Path(path, "quantize_config.json").write_text(json.dumps(qcfg.to_quantize_config(), indent=2) + "\n")


# ---- packing ---------------------------------------------------------------------------------------
def pack(values: Tensor, bits: int, dim: int) -> Tensor:
    """Pack integer `values` in 0 .. 2^bits - 1 along `dim` into int32 words, lowest bits first."""
    f = 32 // bits
    v = values.movedim(dim, -1).to(torch.int64)
    if v.shape[-1] % f:
        raise QuantError(f"cannot pack {v.shape[-1]} values into {bits}-bit int32 words ({f} per word)")
    v = v.reshape(*v.shape[:-1], -1, f) << (torch.arange(f, device=v.device) * bits)
    words = v.sum(-1)  # the bit fields do not overlap, so the sum is their OR
    words = words - ((words >> 31) << 32)  # wrap 0 .. 2^32 - 1 into int32 two's complement
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def unpack(words: Tensor, bits: int, dim: int) -> Tensor:
    """Inverse of `pack`: int32 words -> int32 values, `32 / bits` times longer along `dim`."""
    f = 32 // bits
    w = words.movedim(dim, -1)
    shifts = torch.arange(f, device=w.device, dtype=torch.int32) * bits
    v = (w[..., None] >> shifts) & (2 ** bits - 1)  # arithmetic shift, then masked: sign bits drop out
    return v.reshape(*w.shape[:-1], -1).movedim(-1, dim)


@dataclass
class QuantizedWeight:
    """One layer's codes before packing: q [N, K] ints, scales [G, N], zeros [G, N] ints, g_idx [K]."""
    q: Tensor
    scales: Tensor
    zeros: Tensor
    g_idx: Tensor
    bits: int

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(self.q.to(device), self.scales.to(device), self.zeros.to(device),
                               self.g_idx.to(device), self.bits)

    def packed(self) -> dict[str, Tensor]:
        """The checkpoint tensors (zeros stored minus one, the v1 convention)."""
        return {"qweight": pack(self.q.t(), self.bits, 0), "qzeros": pack(self.zeros - 1, self.bits, 1),
                "scales": self.scales.to(torch.float16).contiguous(), "g_idx": self.g_idx.to(torch.int32)}

    def dequantize(self) -> Tensor:
        """w [N, K] in fp32, from fp16 scales (what the checkpoint will hold)."""
        g = self.g_idx.long()
        s = self.scales.to(torch.float16).float()
        return ((self.q.float() - self.zeros.float()[g].t()) * s[g].t())


def dequantize(qweight: Tensor, qzeros: Tensor | None, scales: Tensor, g_idx: Tensor, bits: int,
               dtype: torch.dtype = torch.float32, mins: Tensor | None = None) -> Tensor:
    """The weight [N, K] that checkpoint tensors describe (the reference every kernel is checked against):
    with `qzeros`, or with float `mins` (qzeros None)."""
    q = unpack(qweight, bits, 0)  # [K, N]
    g = g_idx.long()
    if mins is not None:
        return (q.float() * scales.float()[g] + mins.float()[g]).t().to(dtype)
    z = unpack(qzeros, bits, 1) + 1  # [G, N]
    return ((q - z[g]).float() * scales.float()[g]).t().to(dtype)

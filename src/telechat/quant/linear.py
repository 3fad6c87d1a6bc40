"""QuantLinear: a GPTQ layer that loads and saves the checkpoint tensors, and the matmuls that run it.

After loading, `prepare` turns the checkpoint tensors into a "rows" layout (codes [N, K] as bytes,
columns sorted by group so each group is a contiguous run, 4-bit codes two per byte in GGML's order
within each block of 32 columns; scales and zero points [N, G]) and drops them; `state_dict`
rebuilds them exactly. Paths (each checked against `format.dequantize` in the tests):

  native    the telechat::qlinear operator (kernels.py) on CPU: int8 activations, integer dot
            products, any number of rows; also inside torch.compile graphs.
  dequant   w = dequantize(codes), then x @ w.T: any shape and device; the fallback.
  int4pack  torch's tinygemm int4 kernels (_weight_int4pack_mm_for_cpu, _weight_int4pack_mm on
            CUDA), bf16 activations. The default on CUDA.
  int8pack  torch._weight_int8pack_mm (CPU), once per group, bf16 activations.
  triton    telechat's Triton kernel (triton_kernels.py) on the rows layout, dequantizing tile by
            tile in registers: int8 on CUDA, and int4 where tinygemm does not take the shape.

The packed paths keep the kernel's own copy of the codes beside the rows layout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels, triton_kernels
from .format import QUANTIZED_MODULES, QuantConfig, QuantizedWeight, dequantize, pack, unpack

KERNELS = ("auto", "native", "packed", "triton", "dequant")
_INT4_GROUP_SIZES = (32, 64, 128, 256)
_PACKED = ("_w", "_s", "_zcorr")


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int,
                 dtype: torch.dtype = torch.float32, device=None, zero_point: str = "int"):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.zero_point = zero_point
        f, groups = 32 // bits, in_features // group_size
        self.register_buffer("qweight", torch.zeros(in_features // f, out_features, dtype=torch.int32, device=device))
        if zero_point == "float":  # w = s q + m (GGUF Q4_1): fp16 offsets in place of integer zero points
            self.register_buffer("mins", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        else:
            self.register_buffer("qzeros", torch.zeros(groups, out_features // f, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("zrows", None, persistent=False)  # rows layout: uint8 zero points [N, G]
        self.register_buffer("mrows", None, persistent=False)  # or fp16 offsets [N, G]
        self.path = "dequant"
        self.requested = "auto"
        self._reorder = False
        self.rows_version = 0  # bumped when the rows layout is made or moved (a stack of them goes stale)

    @classmethod
    def from_weight(cls, qw: QuantizedWeight, bias: Tensor | None, dtype: torch.dtype) -> "QuantLinear":
        """A layer holding the checkpoint tensors of `qw` (on qw's device) and `bias` in `dtype`."""
        N, K = qw.q.shape
        layer = cls(K, N, bias is not None, qw.bits, K // qw.scales.shape[0], dtype, device="meta")
        for name, t in qw.packed().items():
            layer._buffers[name] = t
        if bias is not None:
            layer._buffers["bias"] = bias.detach().to(device=qw.q.device, dtype=dtype).clone()
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, path={self.path}")

    @property
    def groups(self) -> int:
        return self.in_features // self.group_size

    @property
    def in_rows(self) -> bool:
        return "qrows" in self._buffers

    # ---- layouts ---------------------------------------------------------------------------------
    def _group_order(self) -> Tensor | None:
        """The column order that makes each group a contiguous run of group_size columns (empty
        when the columns already are in that order), or None when the groups allow no such order."""
        g = self.g_idx.long()
        order = torch.argsort(g, stable=True)
        if not torch.equal(g[order], torch.arange(self.in_features, device=g.device) // self.group_size):
            return None
        return order[:0] if torch.equal(order, torch.arange(self.in_features, device=g.device)) else order

    def _codes(self) -> Tensor:
        """Codes [N, K] (int32) in group order, from the rows layout."""
        q = self.qrows.to(torch.int32)
        if self.bits == 4:  # per block of 32 columns: low nibbles hold columns 0..15, high nibbles 16..31
            q = q.view(self.out_features, -1, 16)
            q = torch.cat([q & 15, q >> 4], -1).view(self.out_features, self.in_features)
        return q

    @property
    def float_zero(self) -> bool:
        return self.zero_point == "float"

    def _to_rows(self, perm: Tensor) -> None:
        q = unpack(self.qweight, self.bits, 0)  # [K, N]
        codes = (q[perm] if perm.numel() else q).t()
        if self.bits == 4:
            codes = self._pack_nibbles(codes)
        rows = {"qrows": codes.to(torch.uint8).contiguous(), "srows": self.scales.t().contiguous(), "perm": perm}
        if self.float_zero:
            rows["mrows"] = self.mins.t().contiguous()
        else:
            rows["zrows"] = (unpack(self.qzeros, self.bits, 1) + 1).t().to(torch.uint8).contiguous()
        for name in ("qweight", "qzeros", "mins", "scales"):
            self._buffers.pop(name, None)
        for name, t in rows.items():
            self.register_buffer(name, t, persistent=False)
        self.rows_version += 1

    @staticmethod
    def _pack_nibbles(codes: Tensor) -> Tensor:
        """[N, K] 4-bit codes -> [N, K/2] bytes, GGML's order (see _codes); K a multiple of 32."""
        if codes.shape[1] % 32:
            raise ValueError(f"4-bit rows need in_features divisible by 32, got {codes.shape[1]}")
        b = codes.reshape(codes.shape[0], -1, 2, 16)
        return (b[:, :, 0] | b[:, :, 1] << 4).reshape(codes.shape[0], -1)

    def _checkpoint_tensors(self) -> dict[str, Tensor]:
        """qweight, qzeros (or mins), scales and g_idx as the checkpoint stores them."""
        zero = "mins" if self.float_zero else "qzeros"
        if not self.in_rows:
            return {n: self._buffers[n] for n in ("qweight", zero, "scales", "g_idx")}
        codes = self._codes()
        if self.perm.numel():
            codes = torch.empty_like(codes).index_copy_(1, self.perm, codes)  # back to checkpoint column order
        return {"qweight": pack(codes.t(), self.bits, 0),
                zero: self.mrows.t().contiguous() if self.float_zero
                else pack(self.zrows.t().to(torch.int32) - 1, self.bits, 1),
                "scales": self.srows.t().contiguous(), "g_idx": self.g_idx}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self.in_rows:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, t in self._checkpoint_tensors().items():
            destination[prefix + name] = t
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight [N, K] in checkpoint column order."""
        t = self._checkpoint_tensors()
        return dequantize(t["qweight"], t.get("qzeros"), t["scales"], self.g_idx, self.bits, dtype, t.get("mins"))

    def _weight_in_group_order(self, dtype: torch.dtype) -> Tensor:
        N, G, gs = self.out_features, self.groups, self.group_size
        q, s = self._codes().view(N, G, gs).float(), self.srows.float()[..., None]
        w = q * s + self.mrows.float()[..., None] if self.float_zero else (q - self.zrows.float()[..., None]) * s
        return w.view(N, self.in_features).to(dtype)

    # ---- choosing a path -------------------------------------------------------------------------
    def prepare(self, kernel: str = "auto") -> str:
        """Choose the matmul path for the current device and build what it needs; returns the path."""
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        self.requested = kernel
        for name in _PACKED:
            self._buffers.pop(name, None)
        self.path, self._reorder = "dequant", False
        if self.g_idx.device.type == "meta":
            return self.path
        if not self.in_rows:
            perm = self._group_order()
            # groups that are not runs of group_size columns, or 4-bit rows not in blocks of 32: plain path only
            if perm is None or (self.bits == 4 and self.in_features % 32):
                return self.path
            self._to_rows(perm)
        self._reorder = bool(self.perm.numel())
        device = self.qrows.device
        if self.float_zero:  # the packed and Triton kernels take integer zero points
            kernel = "native" if kernel in ("packed", "triton") else kernel
        if kernel == "packed" or (kernel == "auto" and device.type == "cuda"):
            self.path = (self._int4pack() if self.bits == 4 else self._int8pack()) or self.path
        if self.path == "dequant" and not self.float_zero \
                and (kernel == "triton" or (kernel == "auto" and device.type == "cuda")) \
                and triton_kernels.supports(self.bits, self.in_features, self.group_size) \
                and triton_kernels.available():
            self.path = "triton"
        if self.path == "dequant" and kernel in ("auto", "native") and device.type == "cpu" \
                and kernels.supports(self.bits, self.in_features, self.out_features, self.group_size) \
                and kernels.available():
            self.path = "native"
        return self.path

    def _apply(self, fn, recurse=True):
        """`.to()`, `.cuda()`, `.half()`...: buffers follow the device, but the fp16 scales keep their
        dtype (they are the checkpoint's, and bf16 would round them); kernel layouts are rebuilt."""
        keep = {n: self._buffers.pop(n) for n in ("scales", "srows", "mins", "mrows") if self._buffers.get(n) is not None}
        rows = self._buffers.get("qrows")
        super()._apply(fn, recurse)
        if self._buffers.get("qrows") is not rows:  # moved: a stack holding the old rows no longer serves
            self.rows_version += 1
        if keep:
            device = fn(torch.empty(0, device=next(iter(keep.values())).device)).device
            self._buffers.update({n: t.to(device) for n, t in keep.items()})
        if self.path != "dequant":
            self.prepare(self.requested)
        return self

    def _set(self, name: str, t: Tensor | None) -> None:
        self.register_buffer(name, t, persistent=False)

    def _int4pack(self) -> str | None:
        K, N, gs = self.in_features, self.out_features, self.group_size
        device = self.qrows.device
        if gs not in _INT4_GROUP_SIZES:
            return None
        s = self.srows.t().float()  # [G, N]
        zero = s * (8 - self.zrows.t().float())  # tinygemm dequantizes (q - 8) * scale + zero
        if device.type == "cpu" and N % 16 == 0:
            w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self._codes(), 1)
        elif device.type == "cuda" and N % 8 == 0 and any(K % (t * 16) == 0 for t in (8, 4, 2)):
            tiles = next(t for t in (8, 4, 2) if K % (t * 16) == 0)
            q = self._codes()
            w = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), tiles)
        else:
            return None
        self._set("_w", w)
        self._set("_s", torch.stack([s, zero], -1).to(torch.bfloat16).contiguous())  # [G, N, 2]
        return "int4pack"

    def _int8pack(self) -> str | None:
        if self.qrows.device.type != "cpu":
            return None
        G, gs, N = self.groups, self.group_size, self.out_features
        q = (self._codes() - 128).to(torch.int8)  # signed around the symmetric zero 128
        self._set("_w", q.view(N, G, gs).permute(1, 0, 2).contiguous())  # [G, N, gs]: one matrix per group
        s = self.srows.t().float()
        self._set("_s", s.to(torch.bfloat16).contiguous())  # the kernel reads scales as contiguous
        zcorr = (s * (self.zrows.t().float() - 128)).contiguous()  # w = s (q - 128) - s (z - 128)
        self._set("_zcorr", zcorr if zcorr.any() else None)
        return "int8pack"

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.path == "native" and x.is_cpu:
            fp32_bias = self.bias is not None and self.bias.dtype == torch.float32
            y = kernels.qlinear(self._in_group_order(x, flat=False), self.qrows, self.srows, self.mrows, self.zrows,
                                self.bias if fp32_bias else None, self.bits, self.group_size)
            return y if self.bias is None or fp32_bias else y + self.bias
        if self.path == "int4pack":
            y = self._int4_mm(self._in_group_order(x).to(torch.bfloat16).contiguous())
        elif self.path == "int8pack":
            y = self._int8_mm(self._in_group_order(x).to(torch.bfloat16))
        elif self.path == "triton":
            y = triton_kernels.gptq_mm(self._in_group_order(x), self.qrows, self.srows, self.zrows, self.bits,
                                       self.group_size)
        elif self.in_rows:
            return F.linear(self._in_group_order(x, flat=False), self._weight_in_group_order(x.dtype), self.bias)
        else:
            return F.linear(x, self.dequantize(x.dtype), self.bias)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _in_group_order(self, x: Tensor, flat: bool = True) -> Tensor:
        if flat:
            x = x.reshape(-1, self.in_features)
        return x[..., self.perm] if self._reorder else x

    def _int4_mm(self, xb: Tensor) -> Tensor:
        if xb.device.type == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self._w, self.group_size, self._s)
        return torch.ops.aten._weight_int4pack_mm(xb, self._w, self.group_size, self._s)

    def _int8_mm(self, xb: Tensor) -> Tensor:
        xg = xb.view(-1, self.groups, self.group_size)
        y = torch._weight_int8pack_mm(xg[:, 0].contiguous(), self._w[0], self._s[0]).float()
        for g in range(1, self.groups):
            y += torch._weight_int8pack_mm(xg[:, g].contiguous(), self._w[g], self._s[g])
        if self._zcorr is not None:
            y -= xg.float().sum(-1) @ self._zcorr
        return y


# ---- whole models ------------------------------------------------------------------------------------
def quantize_modules(model: nn.Module, qcfg: QuantConfig) -> None:
    """Swap every quantized projection of every block for an empty QuantLinear of the same shape
    (on the model's device, meta included); everything else stays as it is."""
    for i, block in enumerate(model.transformer.h):
        for name in QUANTIZED_MODULES:
            lin = block.get_submodule(name)
            qcfg.check_layer(f"transformer.h.{i}.{name}", lin.in_features, lin.out_features)
            q = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, qcfg.bits,
                            qcfg.group_size_for(lin.in_features), lin.weight.dtype, lin.weight.device,
                            qcfg.zero_point)
            parent, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent), attr, q)


class StackedQuantLinear(nn.Module):
    """QuantLinear layers that read the same input (query and key_value; gate_proj and up_proj) run as
    one operator call: their rows stacked, and the layers' own rows made views of the stack, so nothing
    is stored twice. `serves(*layers)` says whether it still stands for exactly those layers, unmoved
    and on the native path (else the model calls them one by one)."""

    def __init__(self, layers: list[QuantLinear]):
        super().__init__()
        first = layers[0]
        self.parts = tuple(layers)  # not submodules: their parents own them
        self.bits, self.group_size, self.sizes = first.bits, first.group_size, [m.out_features for m in layers]
        names = ("qrows", "srows", "mrows" if first.float_zero else "zrows")
        self.stack = {n: torch.cat([getattr(m, n) for m in layers]) for n in names}
        start = 0
        for m in layers:
            for n, t in self.stack.items():
                m._buffers[n] = t[start:start + m.out_features]
            start += m.out_features
        self.versions = tuple(m.rows_version for m in layers)

    @staticmethod
    def possible(layers: list[nn.Module]) -> bool:
        a = layers[0]
        return all(isinstance(m, QuantLinear) and m.path == "native" and m.bias is None and not m._reorder
                   and (m.bits, m.group_size, m.zero_point, m.in_features) == (a.bits, a.group_size, a.zero_point,
                                                                              a.in_features)
                   for m in layers)

    def serves(self, *layers: nn.Module) -> bool:
        return len(layers) == len(self.parts) and all(
            m is p and m.path == "native" and m.rows_version == v for m, p, v in zip(layers, self.parts, self.versions))

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        st = self.stack
        y = kernels.qlinear(x, st["qrows"], st["srows"], st.get("mrows"), st.get("zrows"), None, self.bits,
                            self.group_size)
        return y.split(self.sizes, dim=-1)

    def _apply(self, fn, recurse=True):
        return self  # moved layers get rows of their own (their version changes): this stack then serves no more


_SIBLINGS = {"qkv": ("query", "key_value"), "gate_up": ("gate_proj", "up_proj")}


def use_kernel(model: nn.Module, kernel: str = "auto") -> dict[str, int]:
    """(Re)choose every QuantLinear's path (see the module docstring), and stack the layers that share
    their input where the native path allows; returns {path: layers}."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            path = m.prepare(kernel)
            counts[path] = counts.get(path, 0) + 1
    for m in list(model.modules()):
        for attr, names in _SIBLINGS.items():
            if hasattr(m, attr) and all(hasattr(m, n) for n in names):
                layers = [getattr(m, n) for n in names]
                setattr(m, attr, StackedQuantLinear(layers) if StackedQuantLinear.possible(layers) else None)
    return counts


def quantized_layers(model: nn.Module) -> list[QuantLinear]:
    return [m for m in model.modules() if isinstance(m, QuantLinear)]

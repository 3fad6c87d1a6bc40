"""nn.Linear with faster CPU paths for decode-sized inputs, swapped into a model at load.

The model file builds plain nn.Linear layers; `swap_linears` replaces them (sharing the same
Parameters, so tied weights stay tied) the way quantized layers are swapped in. Results are those
of nn.Linear; only the kernels differ.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DecodeLinear(nn.Linear):
    """nn.Linear, plus: CPU decode paths, and a 16-bit weight kept 16-bit under fp32 compute (a
    quantized model's lm_head) multiplied by telechat's half operator (compiled graphs included) or
    upcast per call."""

    def forward(self, x: Tensor) -> Tensor:
        compiling = torch.compiler.is_compiling()
        if self.weight.dtype != x.dtype:
            from .quant.kernels import half_linear

            return half_linear(x, self.weight, self.bias)
        if x.device.type == "cpu":
            rows = x.shape[:-1].numel()
            if compiling and rows == 1:
                # One-row decode: inductor turns this multiply-reduce into a GEMV that streams the
                # weight on every core (the BLAS matrix-vector path runs on one), ~2x faster on CPU.
                y = (x.reshape(1, -1) * self.weight).sum(-1).view(*x.shape[:-1], -1)
                return y if self.bias is None else y + self.bias
            if not compiling and 1 < rows <= 16:
                # A few rows (batched decode): W @ x^T takes BLAS's skinny-matrix path, 1.5-3x
                # faster on CPU than x @ W^T, whose small-M GEMM path is slow.
                y = torch.mm(self.weight, x.reshape(rows, -1).t()).t().reshape(*x.shape[:-1], -1)
                return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


def swap_linears(model: nn.Module) -> nn.Module:
    """Replace every plain nn.Linear of `model` by a DecodeLinear over the same Parameters."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                new = DecodeLinear.__new__(DecodeLinear)
                nn.Module.__init__(new)
                new.in_features, new.out_features = child.in_features, child.out_features
                new.weight, new.bias = child.weight, child.bias
                new.training = child.training
                setattr(parent, name, new)
    return model

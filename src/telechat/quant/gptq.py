"""GPTQ (Frantar et al., 2022) and round-to-nearest for one weight matrix, and the Hessians GPTQ needs.

GPTQ quantizes the columns of W [N, K] one at a time and spreads each column's rounding error over
the columns not yet quantized, weighted by the inverse Hessian H^-1 of the layer's inputs
(H = X^T X over the calibration tokens). With the upper Cholesky factor U of H^-1, column k's error
e = (w_k - q_k) / U[k, k] updates the rest by -e U[k, k:]. Updates within a block of columns are
applied at once to the rest of the matrix ("lazy batch updates").
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .format import QuantConfig, QuantError, QuantizedWeight

BLOCK_COLUMNS = 128


def find_params(w: Tensor, cfg: QuantConfig) -> tuple[Tensor, Tensor]:
    """Scale and zero point per row of `w` [..., n] (one group): the grid covers the row's range.

    Scales are rounded up to fp16 first (what the checkpoint stores), so the codes fit them.
    v1 checkpoints store zero - 1, so asymmetric zeros are kept >= 1.
    """
    xmin = w.amin(-1).clamp(max=0)
    xmax = w.amax(-1).clamp(min=0)
    if cfg.sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = xmax == xmin
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    scale = _fp16_at_least((xmax - xmin) / cfg.maxq)
    if cfg.sym:
        return scale, torch.full_like(scale, (cfg.maxq + 1) // 2)
    zero = torch.round(-xmin / scale)
    low = zero < 1  # all values >= 0: put zero at 1 and stretch the grid to still reach xmax
    scale = torch.where(low, _fp16_at_least(xmax / (cfg.maxq - 1)), scale)
    return scale, zero.clamp(1, cfg.maxq)


def _fp16_at_least(x: Tensor) -> Tensor:
    """The smallest fp16 value >= x (as fp32): a grid step rounded down would clip the range's ends."""
    h = x.clamp(min=torch.finfo(torch.float16).tiny).half()
    h = torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return h.float()


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def rtn(weight: Tensor, cfg: QuantConfig) -> QuantizedWeight:
    """Round-to-nearest: each group's codes from its own range, no error compensation."""
    N, K = weight.shape
    gs = cfg.group_size_for(K)
    w = weight.float().reshape(N, K // gs, gs)
    scale, zero = find_params(w, cfg)  # [N, G]
    q = quantize_codes(w, scale[..., None], zero[..., None], cfg.maxq).reshape(N, K)
    g_idx = torch.arange(K, device=weight.device) // gs
    return QuantizedWeight(q.to(torch.int32), scale.t().contiguous(), zero.t().to(torch.int32).contiguous(),
                           g_idx.to(torch.int32), cfg.bits)


def gptq(weight: Tensor, hessian: Tensor, cfg: QuantConfig, name: str = "layer",
         damp_scale: float = 1.0) -> QuantizedWeight:
    """GPTQ codes for `weight` [N, K] given the Hessian [K, K] of its inputs.

    The dampening added to H's diagonal is `cfg.damp_percent * damp_scale` times its mean. It keeps GPTQ
    from pushing the rounding error into directions the calibration text rarely uses (which other text
    does use); the pipeline scales it with the layer's input width (down_proj's: ffn / hidden), since a
    wider input leaves more such directions.
    """
    W = weight.float().clone()
    N, K = W.shape
    gs = cfg.group_size_for(K)
    H = hessian.float().clone()
    dead = H.diagonal() == 0  # inputs that never fire: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(H.diagonal(), descending=True) if cfg.desc_act else None
    if perm is not None:  # act-order: the columns with the largest inputs first
        W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(cfg.damp_percent * damp_scale * H.diagonal().mean())
    try:
        L = torch.linalg.cholesky(H)
        U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # H^-1 = U^T U
    except torch.linalg.LinAlgError:
        raise QuantError(f"{name}: the Hessian of its calibration inputs is not positive definite even after "
                         f"dampening {cfg.damp_percent}; raise --damp-percent or use more calibration text") from None

    Q = torch.zeros_like(W)
    scales = torch.zeros(K // gs, N, device=W.device)
    zeros = torch.zeros(K // gs, N, device=W.device)
    block = max(BLOCK_COLUMNS, gs)  # a multiple of gs (both powers of two), so groups never straddle blocks
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if (i1 + i) % gs == 0:  # a new group: its grid from its (already error-updated) columns
                scale, zero = find_params(W1[:, i:i + gs], cfg)
                scales[(i1 + i) // gs], zeros[(i1 + i) // gs] = scale, zero
            w = W1[:, i]
            q = quantize_codes(w, scale, zero, cfg.maxq)
            Q[:, i1 + i] = q
            err = (w - scale * (q - zero)) / U1[i, i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)  # in place, no [N, block] temporary
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # the block's errors, applied to every later column at once

    g_idx = torch.arange(K, device=W.device) // gs
    if perm is not None:  # back to the original column order; each column keeps its group
        inv = torch.argsort(perm)
        Q, g_idx = Q[:, inv], g_idx[inv]
    return QuantizedWeight(Q.to(torch.int32), scales, zeros.to(torch.int32), g_idx.to(torch.int32), cfg.bits)


# ---- Hessians ------------------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by a hook once every layer of the group has seen its input: the rest of the block is not needed."""


class HessianCollector:
    """Accumulates H = sum of x^T x over the inputs of `modules` while the block runs forward.

    Layers fed the same tensor (key_value and query; up_proj and gate_proj) share one sum.
    The first token of each sample (the attention sink) is also summed on its own, for `hessian`'s
    `sink_weight`. The forward stops as soon as every layer has its input.
    """

    def __init__(self, modules: dict[str, nn.Linear]):
        self.modules = modules
        self.sums: dict[str, Tensor] = {}
        self.first: dict[str, list[Tensor]] = {}
        self.alias: dict[str, str] = {}
        self.tokens = 0
        self.samples = 0
        self._seen: dict[str, Tensor] = {}

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            same = next((other for other, t in self._seen.items() if t is x), None)
            if same is not None:
                self.alias[name] = same
            else:
                x2, x0 = x.reshape(-1, x.shape[-1]).float(), x[:, 0].float()
                if name not in self.sums:
                    self.sums[name] = torch.zeros(x2.shape[1], x2.shape[1], device=x2.device)
                    self.first[name] = []
                self.sums[name].addmm_(x2.t(), x2)
                self.first[name].append(x0)  # a few rows, not a second [K, K] sum (down_proj's is large)
            self._seen[name] = x
            if len(self._seen) == len(self.modules):
                raise _Stop

        return hook

    def run(self, forward, batches) -> None:
        """Call `forward(batch)` for each batch with the hooks on."""
        handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]
        try:
            for batch in batches:
                self._seen = {}
                try:
                    forward(batch)
                except _Stop:
                    pass
                self.tokens += batch.shape[0] * batch.shape[1]
                self.samples += batch.shape[0]
        finally:
            for h in handles:
                h.remove()
            self._seen = {}

    def hessian(self, name: str, sink_weight: float = 0.0) -> Tensor:
        """The mean of x^T x over all tokens, plus `sink_weight` times its mean over the first tokens."""
        key = self.alias.get(name, name)
        H = self.sums[key] / max(self.tokens, 1)
        if not sink_weight:
            return H
        x0 = torch.cat(self.first[key])
        return H + (sink_weight / max(self.samples, 1)) * (x0.t() @ x0)

"""Rotary position embeddings with length scaling (TeleChat's NTK base + attention mscale, YaRN, ...).

The one home of the rotary arithmetic: the model, the decode loops, evaluation and quantization
all take their cos/sin tables from `rope_cos_sin`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import RopeScaling, TeleChatConfig

# YaRN's defaults (its paper and released code): frequencies that turn more than BETA_FAST times over
# the training length keep their value, those turning fewer than BETA_SLOW times are interpolated.
YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0


def inv_frequencies(config: TeleChatConfig, scaling: RopeScaling) -> Tensor:
    """Rotary inverse frequencies [head_dim / 2] (fp32) for one scaling."""
    d = config.head_dim
    exponent = torch.arange(0, d, 2, dtype=torch.float32) / d
    if scaling.yarn_factor == 1.0:
        return 1.0 / scaling.base ** exponent
    # YaRN as its authors' code (and transformers, vLLM, llama.cpp) computes it: a linear ramp over the
    # dimension indices between the correction dimensions of BETA_FAST and BETA_SLOW, in float64.
    s, base, L = scaling.yarn_factor, scaling.base, config.training_seqlen
    extrapolated = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)

    def correction_dim(rotations: float) -> float:
        return d * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(YARN_BETA_FAST)), 0)
    high = min(math.ceil(correction_dim(YARN_BETA_SLOW)), d - 1)
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
    keep = 1 - ramp  # 1: the frequency is kept (extrapolated), 0: divided by s (interpolated)
    return (extrapolated / s * (1 - keep) + extrapolated * keep).float()


def rope_cos_sin(config: TeleChatConfig, positions: Tensor,
                 total_len: int | list[int] | Tensor) -> tuple[Tensor, Tensor]:
    """cos/sin tables [..., T, head_dim] in fp32 for `positions`, scaled for a sequence of `total_len`.

    Per-row positions [B, T] may come with one total length per row (a batch of unrelated sequences),
    or with a tensor of per-position lengths shaped like `positions` (packed samples: each token is
    scaled for its own segment's length).
    """
    dev = positions.device
    if isinstance(total_len, int):
        scaling = config.rope_scaling(total_len)
        inv_freq, mscale = inv_frequencies(config, scaling).to(dev), scaling.mscale
    else:  # same arithmetic per distinct scaling, so a row matches its single-sequence tables
        if isinstance(total_len, Tensor):
            lengths, index = torch.unique(total_len, return_inverse=True)
            scalings = [config.rope_scaling(int(n)) for n in lengths.tolist()]
        else:
            scalings = [config.rope_scaling(n) for n in total_len]
            index = torch.arange(len(scalings), device=dev)[:, None]  # [B, 1]
        tables = {s: inv_frequencies(config, s).to(dev) for s in set(scalings)}
        inv_freq = torch.stack([tables[s] for s in scalings])[index]  # [B, 1 or T, d/2]
        mscale = torch.tensor([s.mscale for s in scalings], device=dev)[index][..., None]
    theta = positions.float()[..., None] * inv_freq
    emb = torch.cat((theta, theta), dim=-1)
    return emb.cos() * mscale, emb.sin() * mscale


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin

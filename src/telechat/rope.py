"""Rotary position embeddings with TeleChat's length scaling (NTK base + attention mscale).

The one home of the rotary arithmetic: the model, the decode loops, evaluation and quantization
all take their cos/sin tables from `rope_cos_sin`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .config import TeleChatConfig


def rope_cos_sin(config: TeleChatConfig, positions: Tensor,
                 total_len: int | list[int] | Tensor) -> tuple[Tensor, Tensor]:
    """cos/sin tables [..., T, head_dim] in fp32 for `positions`, scaled for a sequence of `total_len`.

    Per-row positions [B, T] may come with one total length per row (a batch of unrelated sequences),
    or with a tensor of per-position lengths shaped like `positions` (packed samples: each token is
    scaled for its own segment's length).
    """
    d = config.head_dim
    exponent = torch.arange(0, d, 2, dtype=torch.float32, device=positions.device) / d
    if isinstance(total_len, int):
        base, mscale = config.rope_scaling(total_len)
        inv_freq = 1.0 / base ** exponent
    else:  # same arithmetic per distinct (base, mscale), so a row matches its single-sequence tables
        if isinstance(total_len, Tensor):
            lengths, index = torch.unique(total_len, return_inverse=True)
            scalings = [config.rope_scaling(int(n)) for n in lengths.tolist()]
        else:
            scalings = [config.rope_scaling(n) for n in total_len]
            index = torch.arange(len(scalings), device=positions.device)[:, None]  # [B, 1]
        tables = {s: 1.0 / s[0] ** exponent for s in set(scalings)}
        inv_freq = torch.stack([tables[s] for s in scalings])[index]  # [B, 1 or T, d/2]
        mscale = torch.tensor([s[1] for s in scalings], device=positions.device)[index][..., None]
    theta = positions.float()[..., None] * inv_freq
    emb = torch.cat((theta, theta), dim=-1)
    return emb.cos() * mscale, emb.sin() * mscale


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin

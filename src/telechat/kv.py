"""KV caches passed to `TeleChat.forward(cache=...)`: the model itself keeps no cache state.

A cache *step* is what forward receives: it knows the positions of the tokens being run, the
length each token's rotary tables are scaled for, and how to write their keys/values and attend.

- `DenseKV`: contiguous [B, n_kv, max_len, d] per layer (scoring, tests, a reference).
- `PagedKV`: one pool of fixed-size blocks shared by every sequence (the engine's); memory grows
  with the tokens in use. `PagedStep` runs a flat batch: decode rows (one token each) attend in one
  batched call, prefill chunks each attend over their own context.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


# Attention scores of one prefill chunk over its whole context are materialised when a mask is needed;
# chunks are sized so that they stay under this (a 32K-token prompt then needs ~1/4 GB beyond its cache).
ATTENTION_SCRATCH_BYTES = 256 << 20


def prefill_chunk(context: int, n_head: int, budget: int = ATTENTION_SCRATCH_BYTES) -> int:
    """The most query tokens one prefill chunk attending over `context` keys may hold, so that its
    fp32 scores [n_head, chunk, context] fit in `budget` bytes (at least 16)."""
    return max(16, budget // (4 * n_head * max(context, 1)))


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False,
         dropout: float = 0.0) -> Tensor:
    """SDPA with grouped KV heads; keys/values are cast to the query's dtype."""
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=causal,
                                          dropout_p=dropout, **gqa)


def causal_mask(positions: Tensor, kv_len: int, attention_mask: Tensor | None = None) -> Tensor | None:
    """Boolean [B|1, 1, T, kv_len] mask, or None where plain causal attention (or none) is exact.

    positions [T] (shared) or [B, T] (each row its own sequence). attention_mask [B, >= kv_len]:
    0 hides a (padding) key; a key always sees itself so padded rows never go all -inf."""
    T = positions.shape[-1]
    if attention_mask is None and positions.dim() == 1 and (T == 1 or T == kv_len):
        return None
    keys = torch.arange(kv_len, device=positions.device)
    mask = keys <= positions[..., None]
    if attention_mask is not None:
        mask = (mask & attention_mask[:, None, :kv_len].bool()) | (keys == positions[..., None])
        return mask[:, None]
    return mask[:, None] if positions.dim() == 2 else mask[None, None]


class DenseKV:
    """Contiguous keys/values [B, n_kv, max_len, d] for every layer."""

    def __init__(self, config, batch_size: int, max_len: int, dtype: torch.dtype, device=None):
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, positions)."""
        return self.k[0].shape[0], self.k[0].shape[2]

    def resized(self, max_len: int) -> "DenseKV":
        """A copy with room for `max_len` positions (the first min(old, new) kept)."""
        new = DenseKV.__new__(DenseKV)
        keep = min(max_len, self.shape[1])

        def grow(t):
            out = t.new_zeros(*t.shape[:2], max_len, t.shape[3])
            out[:, :, :keep] = t[:, :, :keep]
            return out

        new.k, new.v = [grow(t) for t in self.k], [grow(t) for t in self.v]
        return new

    def copy_rows(self, src: int, dst: slice, length: int) -> None:
        """Rows `dst` get row `src`'s first `length` positions."""
        for t in (*self.k, *self.v):
            t[dst, :, :length] = t[src:src + 1, :, :length]

    def at(self, positions: Tensor, kv_len: int | None = None, attention_mask: Tensor | None = None,
           rows: slice | None = None) -> "DenseStep":
        """A step writing the tokens at `positions` ([T] for every row, or [B, T] per row) into cache
        rows `rows` (default 0..B-1) and attending over positions 0..kv_len-1 (default max + 1)."""
        kv_len = int(kv_len or int(positions.max()) + 1)
        if positions.dim() == 2:  # each row its own sequence: NTK scaled for its own length
            total = [int(p) + 1 for p in positions.amax(1)]
        else:
            total = kv_len
        return DenseStep(self, positions, total, kv_len, causal_mask(positions, kv_len, attention_mask),
                         rows or slice(None))


@dataclass
class DenseStep:
    cache: DenseKV
    positions: Tensor
    rope_total: int | list[int]
    kv_len: int
    mask: Tensor | None
    rows: slice

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        B = k.shape[0]
        kc, vc = self.cache.k[layer][self.rows], self.cache.v[layer][self.rows]
        if self.positions.dim() == 1:
            kc[:B].index_copy_(2, self.positions, k.to(kc.dtype))
            vc[:B].index_copy_(2, self.positions, v.to(vc.dtype))
        else:
            r = torch.arange(B, device=k.device)[:, None]
            kc[r, :, self.positions] = k.transpose(1, 2).to(kc.dtype)
            vc[r, :, self.positions] = v.transpose(1, 2).to(vc.dtype)
        T = q.shape[2]
        return sdpa(q, kc[:B, :, :self.kv_len], vc[:B, :, :self.kv_len], self.mask,
                    causal=self.mask is None and T > 1)


class PagedKV:
    """A pool of `block_size`-token blocks per layer, [slots, n_kv, d] with slot = block * size + offset.

    Grows on demand (by at least a quarter, one layer at a time so that the old and new pools never
    coexist whole) up to `max_blocks`. Block 0 is scratch: padding rows write there.
    """

    def __init__(self, config, dtype: torch.dtype, device, block_size: int = 16, max_blocks: int = 1 << 20,
                 initial_blocks: int = 64):
        self.n_layer, self.n_kv, self.head_dim = config.n_layer, config.n_kv_head, config.head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.block_size = block_size
        self.max_blocks = max(2, max_blocks)
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        self.capacity = 0
        self._grow(min(initial_blocks, self.max_blocks))

    def bytes_per_block(self) -> int:
        return 2 * self.n_layer * self.block_size * self.n_kv * self.head_dim * torch.finfo(self.dtype).bits // 8

    def _grow(self, blocks: int) -> None:
        blocks = min(max(blocks, self.capacity + self.capacity // 4), self.max_blocks)
        if blocks <= self.capacity:
            return
        shape = (blocks * self.block_size, self.n_kv, self.head_dim)
        old = self.capacity * self.block_size
        if not self.k:
            self.k, self.v = [None] * self.n_layer, [None] * self.n_layer
        for pool in (self.k, self.v):
            for i, t in enumerate(pool):
                new = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if t is not None:
                    new[:old] = t
                pool[i] = new  # the old layer is freed here
        self.capacity = blocks

    def ensure(self, blocks: int) -> None:
        """Room for block ids < `blocks` (must be <= max_blocks)."""
        if blocks > self.capacity:
            self._grow(blocks)

    def copy_block(self, src: int, dst: int) -> None:
        s, d, n = src * self.block_size, dst * self.block_size, self.block_size
        for t in (*self.k, *self.v):
            t[d:d + n] = t[s:s + n]


@dataclass
class PagedStep:
    """One engine step over a flat batch input_ids [1, N]: first the decode rows (one token each,
    as many as `decode_slots` has rows), then prefill chunks as (flat start, length, context
    slots, first position)."""
    pool: PagedKV
    positions: Tensor  # [N]
    rope_total: Tensor  # [N] length each token's rotary tables are scaled for
    write_slots: Tensor  # [N]
    decode_slots: Tensor | None  # [n_decode, S] context slots of each decode row
    decode_mask: Tensor | None  # [n_decode, 1, 1, S]
    chunks: list[tuple[int, int, Tensor, int]]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        kp, vp = self.pool.k[layer], self.pool.v[layer]
        kp.index_copy_(0, self.write_slots, k[0].transpose(0, 1).to(kp.dtype))
        vp.index_copy_(0, self.write_slots, v[0].transpose(0, 1).to(vp.dtype))
        out = []
        if self.decode_slots is not None:
            nd = self.decode_slots.shape[0]
            qd = q[0, :, :nd].transpose(0, 1)[:, :, None]  # [nd, H, 1, d]
            kd = kp[self.decode_slots].transpose(1, 2)  # [nd, n_kv, S, d]
            vd = vp[self.decode_slots].transpose(1, 2)
            out.append(sdpa(qd, kd, vd, self.decode_mask)[:, :, 0].transpose(0, 1)[None])
        for start, n, slots, first in self.chunks:
            qc = q[:, :, start:start + n]
            kc, vc = kp[slots].transpose(0, 1)[None], vp[slots].transpose(0, 1)[None]
            if first == 0:
                out.append(sdpa(qc, kc, vc, causal=n > 1))
            else:
                L = slots.shape[0]
                mask = torch.arange(L, device=q.device) <= (first + torch.arange(n, device=q.device))[:, None]
                out.append(sdpa(qc, kc, vc, mask[None, None]))
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)

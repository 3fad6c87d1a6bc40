"""The TeleChat decoder: RMSNorm, rotary attention with NTK + mscale length scaling, SwiGLU.

Module names follow the official checkpoint, so `state_dict()` keys are the published keys
(`transformer.h.{i}.self_attention.key_value.weight`, ...).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TeleChatConfig
from .rope import apply_rope, rope_cos_sin


def _upcast_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


class Linear(nn.Linear):
    # x times a weight of another dtype: a quantized model's lm_head kept 16-bit under fp32 compute.
    # telechat.quant.kernels installs its native decode kernel here (this file imports nothing of ours).
    mixed_dtype_linear = staticmethod(_upcast_linear)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.shape[:-1].numel()
        if self.weight.dtype != x.dtype and not torch.compiler.is_compiling():
            return Linear.mixed_dtype_linear(x, self.weight, self.bias)
        if x.device.type == "cpu" and torch.compiler.is_compiling() and rows == 1:
            # One-row decode: inductor turns this multiply-reduce into a GEMV that streams the weight
            # on every core (the BLAS matrix-vector path runs on one), ~2x faster on CPU.
            y = (x.reshape(1, -1) * self.weight.to(x.dtype)).sum(-1).view(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        if x.device.type == "cpu" and 1 < rows <= 16 and not torch.compiler.is_compiling():
            # A few rows (batched decode): W @ x^T takes BLAS's skinny-matrix path, 1.5-3x faster
            # on CPU than x @ W^T, whose small-M GEMM path is slow.
            y = torch.mm(self.weight, x.reshape(rows, -1).t()).t().reshape(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight.to(x.dtype), self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class KVCache(nn.Module):
    """Preallocated keys/values [B, n_kv, max_len, d]: decoding writes in place, never reallocates."""

    def __init__(self, batch_size: int, n_kv: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v [B, n_kv, T, d] at positions [T] (all rows) or [B, T] (per row, cache rows 0..B-1)."""
        if input_pos.dim() == 1:
            self.k.index_copy_(2, input_pos, k)
            self.v.index_copy_(2, input_pos, v)
            return self.k, self.v
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[rows, :, input_pos] = k.transpose(1, 2)
        self.v[rows, :, input_pos] = v.transpose(1, 2)
        return self.k[: k.shape[0]], self.v[: k.shape[0]]

    def rows(self, start: int, stop: int) -> "KVCache":
        """A cache over rows start:stop of this one; it shares the storage, so writes land here."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.register_buffer("k", self.k[start:stop], persistent=False)
        view.register_buffer("v", self.v[start:stop], persistent=False)
        return view

    def resized(self, max_len: int) -> "KVCache":
        """A copy with room for `max_len` positions (the first min(old, new) positions kept)."""
        B, n_kv, old, d = self.k.shape
        new = KVCache(B, n_kv, max_len, d, self.k.dtype, self.k.device)
        keep = min(old, max_len)
        new.k[:, :, :keep] = self.k[:, :, :keep]
        new.v[:, :, :keep] = self.v[:, :, :keep]
        return new


class Attention(nn.Module):
    def __init__(self, config: TeleChatConfig):
        super().__init__()
        H, d = config.hidden_size, config.head_dim
        self.n_head, self.n_kv, self.head_dim = config.n_head, config.n_kv_head, d
        self.query = Linear(H, self.n_head * d, bias=config.qkv_bias)
        # Rows interleaved per KV head: [K_h (d rows), V_h (d rows)] for each head h.
        self.key_value = Linear(H, 2 * self.n_kv * d, bias=config.qkv_bias)
        self.dense = Linear(self.n_head * d, H, bias=config.bias)
        self.dropout = config.attention_dropout
        self.cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                input_pos: Tensor | None, kv_len: int, last_only: bool = False) -> Tensor:
        """With `last_only`, keys/values cover every position but only the last one is attended from."""
        B, T, _ = x.shape
        k, v = self.key_value(x).view(B, T, self.n_kv, 2, self.head_dim).unbind(3)
        k, v = apply_rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)
        if last_only:
            x, cos, sin, T = x[:, -1:], cos[..., -1:, :], sin[..., -1:, :], 1
            mask = None if mask is None else mask[..., -1:, :]  # the last query sees every key it may see
        q = apply_rope(self.query(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2), cos, sin)
        if self.cache is not None and input_pos is not None:
            k, v = self.cache.update(input_pos, k, v)
            k, v = k[:, :, :kv_len], v[:, :, :kv_len]
        dropout = self.dropout if self.training else 0.0
        if isinstance(mask, PackedSegments):
            y = mask.attend(q, k, v, dropout)
        else:
            gqa = {"enable_gqa": True} if self.n_kv != self.n_head else {}
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               dropout_p=dropout, **gqa)
        return self.dense(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: TeleChatConfig):
        super().__init__()
        H, Fd = config.hidden_size, config.ffn_hidden_size
        self.gate_proj = Linear(H, Fd, bias=False)
        self.up_proj = Linear(H, Fd, bias=False)
        self.down_proj = Linear(Fd, H, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: TeleChatConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.self_attention = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = MLP(config)
        self.dropout = config.hidden_dropout

    def forward(self, h, cos, sin, mask, input_pos, kv_len, last_only: bool = False):
        a = self.self_attention(self.input_layernorm(h), cos, sin, mask, input_pos, kv_len, last_only)
        h = (h[:, -1:] if last_only else h) + F.dropout(a, self.dropout, self.training)
        m = self.mlp(self.post_attention_layernorm(h))
        return h + F.dropout(m, self.dropout, self.training)


class Transformer(nn.Module):
    """Embeddings, blocks and final norm: hidden states [B, T, H] for `input_ids` [B, T]."""

    def __init__(self, config: TeleChatConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.embed_layernorm:
            self.word_embeddings_layernorm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.gradient_checkpointing = False

    def forward(self, input_ids: Tensor, input_pos: Tensor | None = None, attention_mask: Tensor | None = None,
                kv_len: int | None = None, rope: tuple[Tensor, Tensor] | None = None,
                last_only: bool = False, segment_ids: Tensor | None = None) -> Tensor:
        """last_only: hidden state of the last position only ([B, 1, H]); the last block then runs
        its query, attention output and MLP for that position alone (keys/values still cover all).
        segment_ids [B, T] (packed training samples): each segment attends only within itself and
        its positions start at 0, as if it were alone; 0 marks padding."""
        B, T = input_ids.shape
        packed = None
        if segment_ids is not None:
            packed = PackedSegments(segment_ids)
            input_pos, kv_len, cached = packed.positions, T, None
            rope = rope_cos_sin(self.config, input_pos, packed.lengths)  # each segment scaled for its own length
        elif input_pos is None:
            input_pos, kv_len, cached = torch.arange(T, device=input_ids.device), T, None
        else:
            kv_len = kv_len or int(input_pos.max()) + 1
            cached = input_pos
        if rope is not None:
            cos, sin = rope
        elif input_pos.dim() == 2:  # each row its own sequence: its own length for the NTK rule
            cos, sin = rope_cos_sin(self.config, input_pos, [int(p) + 1 for p in input_pos.amax(1)])
        else:
            cos, sin = rope_cos_sin(self.config, input_pos, kv_len)
        if input_pos.dim() == 2 and cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        h = self.word_embeddings(input_ids).to(self.ln_f.weight.dtype)  # the embedding may be 16-bit
        if self.config.embed_layernorm:
            h = self.word_embeddings_layernorm(h)
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        mask = packed if packed is not None else build_mask(input_pos, kv_len, attention_mask)
        for i, block in enumerate(self.h):
            last = last_only and i == len(self.h) - 1
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(block, h, cos, sin, mask, cached, kv_len, last,
                                                      use_reentrant=False)
            else:
                h = block(h, cos, sin, mask, cached, kv_len, last)
        return self.ln_f(h[:, -1:] if last_only else h)

class TeleChat(nn.Module):
    """TelechatForCausalLM. `model(input_ids)` returns logits [B, T, V]."""

    def __init__(self, config: TeleChatConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.word_embeddings.weight
        self.generation_config: dict = {}  # filled by the loader; used by `chat`

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (that of the norms: a quantized model may keep its embedding 16-bit)."""
        return self.transformer.ln_f.weight.dtype

    # ---- KV cache ----------------------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> None:
        for block in self.transformer.h:
            block.self_attention.cache = KVCache(batch_size, self.config.n_kv_head, max_len, self.config.head_dim,
                                                 dtype or self.dtype, device or self.lm_head.weight.device)

    def clear_cache(self) -> None:
        for block in self.transformer.h:
            block.self_attention.cache = None

    def resize_cache(self, max_len: int) -> None:
        """Grow (or shrink) the allocated cache to `max_len` positions, keeping its contents."""
        for block in self.transformer.h:
            block.self_attention.cache = block.self_attention.cache.resized(max_len)

    @contextmanager
    def cache_rows(self, start: int, stop: int):
        """Within the block the model sees only cache rows start:stop (e.g. to prefill one sequence
        of a batch whose other rows keep decoding)."""
        caches = [block.self_attention.cache for block in self.transformer.h]
        try:
            for block, cache in zip(self.transformer.h, caches):
                block.self_attention.cache = cache.rows(start, stop)
            yield self
        finally:
            for block, cache in zip(self.transformer.h, caches):
                block.self_attention.cache = cache

    @property
    def cache_shape(self) -> tuple[int, int] | None:
        """(batch_size, max_len) of the allocated cache, or None."""
        c = self.transformer.h[0].self_attention.cache
        return None if c is None else (c.k.shape[0], c.k.shape[2])

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, input_pos: Tensor | None = None, attention_mask: Tensor | None = None,
                last_only: bool = False, kv_len: int | None = None,
                rope: tuple[Tensor, Tensor] | None = None, segment_ids: Tensor | None = None) -> Tensor:
        """Logits for `input_ids` [B, T].

        input_pos: positions [T] of these tokens, or [B, T] per row; with a cache set up, keys/values
            are written there and attention covers cache positions 0..kv_len-1 (default max + 1).
        attention_mask: [B, >= kv_len] with 0 on (left) padding, over all positions seen so far.
        last_only: return logits of the last position only ([B, 1, V]), as generation needs.
        rope: precomputed (cos, sin) for these positions (lets a compiled step avoid recompiles).
        segment_ids: [B, T] for packed training samples: segments attend only within themselves,
            with positions from 0 (0 = padding), as `data prepare` writes them.
        """
        return self.lm_head(self.transformer(input_ids, input_pos, attention_mask, kv_len, rope, last_only,
                                             segment_ids))

    def chat(self, tokenizer, question: str, history=None, generation_config=None, stream: bool = False, **kwargs):
        """The published calling convention: `model.chat(tokenizer, question, history, generation_config)`."""
        try:  # absolute import: this file also travels as transformers remote code
            from telechat.chat import chat
        except ImportError as e:
            raise RuntimeError("model.chat needs the telechat package (pip install telechat)") from e
        return chat(self, tokenizer, question, history, generation_config=generation_config, stream=stream, **kwargs)


class PackedSegments:
    """Packed training samples (`segment_ids` [B, T], 0 = padding) as attention sees them.

    Each segment attends causally within itself with positions from 0, as if it were alone; a
    padding token sees only itself. No [T, T] mask is built: on CUDA FlexAttention runs a document
    block mask, elsewhere SDPA runs once per segment.
    """

    def __init__(self, segment_ids: Tensor):
        self.ids = segment_ids
        B, T = segment_ids.shape
        idx = torch.arange(T, device=segment_ids.device).expand(B, T)
        starts = torch.ones_like(segment_ids, dtype=torch.bool)
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        ends = torch.ones_like(starts)
        ends[:, :-1] = starts[:, 1:]
        first = torch.where(starts, idx, 0).cummax(1).values
        last = torch.where(ends, idx, T).flip(1).cummin(1).values.flip(1)
        self.positions = idx - first
        self.lengths = last - first + 1
        self._starts = starts
        self._block_mask = None

    def spans(self) -> list[tuple[int, int, int, bool]]:
        """(row, start, stop, is_padding) of every segment, in order."""
        rows, cols = self._starts.nonzero(as_tuple=True)
        lengths = self.lengths[rows, cols]
        pad = self.ids[rows, cols] == 0
        return [(r, c, c + n, p) for r, c, n, p in zip(rows.tolist(), cols.tolist(), lengths.tolist(), pad.tolist())]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, dropout: float = 0.0) -> Tensor:
        """Attention output [B, n_head, T, d] for q [B, n_head, T, d] and k, v [B, n_kv, T, d]."""
        if q.is_cuda and dropout == 0.0:
            return flex_document_attention(q, k, v, self)
        group = q.shape[1] // k.shape[1]
        gqa = {"enable_gqa": True} if group > 1 else {}
        y = torch.empty_like(q)
        for b, s, e, pad in self.spans():
            if pad:  # a padding token attends to itself only: its own value
                y[b, :, s:e] = v[b, :, s:e].repeat_interleave(group, dim=0)
            else:
                y[b, :, s:e] = F.scaled_dot_product_attention(q[b, :, s:e], k[b, :, s:e], v[b, :, s:e],
                                                              is_causal=True, dropout_p=dropout, **gqa)
        return y

    def block_mask(self):
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask

            ids = self.ids

            def document_causal(b, h, q, kv):
                same = (ids[b, q] == ids[b, kv]) & (ids[b, q] != 0) & (kv <= q)
                return same | (q == kv)

            B, T = ids.shape
            self._block_mask = create_block_mask(document_causal, B, None, T, T, device=ids.device)
        return self._block_mask


_flex_attention = None


def flex_document_attention(q: Tensor, k: Tensor, v: Tensor, packed: PackedSegments) -> Tensor:
    """FlexAttention (compiled once per process) over the packed samples' document block mask."""
    global _flex_attention
    if _flex_attention is None:
        from torch.nn.attention.flex_attention import flex_attention

        _flex_attention = torch.compile(flex_attention, dynamic=False)
    if torch.is_autocast_enabled(q.device.type):  # autocast does not cover flex_attention: cast as it would
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    else:
        k, v = k.to(q.dtype), v.to(q.dtype)
    return _flex_attention(q, k, v, block_mask=packed.block_mask(), enable_gqa=q.shape[1] != k.shape[1])


def build_mask(input_pos: Tensor, kv_len: int, attention_mask: Tensor | None) -> Tensor | None:
    """Boolean [B|1, 1, T, kv_len] mask, or None when plain causal attention (or none) is exact.

    Positions [B, T] (one sequence per row) give each row its own causal mask."""
    T = input_pos.shape[-1]
    if attention_mask is None and input_pos.dim() == 1 and (T == 1 or T == kv_len):
        return None
    keys = torch.arange(kv_len, device=input_pos.device)
    mask = keys <= input_pos[..., None]  # causal, [(B,) T, kv_len]
    if input_pos.dim() == 2 and attention_mask is None:
        return mask[:, None]
    if attention_mask is not None:
        # Padding keys are hidden; a key always sees itself so padded rows never go all -inf.
        mask = (mask & attention_mask[:, None, :kv_len].bool()) | (keys == input_pos[..., None])
        return mask[:, None]
    return mask[None, None]


def causal_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Plain shifted cross-entropy (the model's own training loss)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=ignore_index)


def packed_labels(input_ids: Tensor, loss_mask: Tensor | None = None, segment_ids: Tensor | None = None,
                  ignore_index: int = -100) -> Tensor:
    """Labels for `causal_lm_loss`: tokens without loss, padding and each segment's first token
    (nothing before it in its own segment predicts it) become `ignore_index`."""
    labels = input_ids.clone()
    if loss_mask is not None:
        labels[loss_mask == 0] = ignore_index
    if segment_ids is not None:
        labels[segment_ids == 0] = ignore_index
        first = torch.ones_like(segment_ids, dtype=torch.bool)
        first[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        labels[first] = ignore_index
    return labels

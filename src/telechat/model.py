"""The TeleChat decoder: RMSNorm, rotary attention with NTK + mscale length scaling, SwiGLU.

Module names follow the official checkpoint, so `state_dict()` keys are the published keys
(`transformer.h.{i}.self_attention.key_value.weight`, ...).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TeleChatConfig
from .kv import causal_mask, sdpa
from .rope import apply_rope, rope_cos_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, config: TeleChatConfig, layer: int = 0):
        super().__init__()
        H, d = config.hidden_size, config.head_dim
        self.n_head, self.n_kv, self.head_dim, self.layer = config.n_head, config.n_kv_head, d, layer
        self.query = nn.Linear(H, self.n_head * d, bias=config.qkv_bias)
        # Rows interleaved per KV head: [K_h (d rows), V_h (d rows)] for each head h.
        self.key_value = nn.Linear(H, 2 * self.n_kv * d, bias=config.qkv_bias)
        self.dense = nn.Linear(self.n_head * d, H, bias=config.bias)
        self.dropout = config.attention_dropout
        self.qkv = None  # query and key_value as one call, where quantized layers allow (quant.use_kernel)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, *, mask=None, cache=None) -> Tensor:
        B, T, _ = x.shape
        if self.qkv is not None and self.qkv.serves(self.query, self.key_value):
            q, kv = self.qkv(x)
        else:
            kv = self.key_value(x)
            q = self.query(x)
        k, v = kv.view(B, T, self.n_kv, 2, self.head_dim).unbind(3)
        k, v = apply_rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)
        q = apply_rope(q.view(B, T, self.n_head, self.head_dim).transpose(1, 2), cos, sin)
        dropout = self.dropout if self.training else 0.0
        if cache is not None:  # the cache step writes these keys/values and attends
            y = cache.attend(self.layer, q, k, v)
        elif isinstance(mask, PackedSegments):
            y = mask.attend(q, k, v, dropout)
        else:
            y = sdpa(q, k, v, mask, causal=mask is None and T > 1, dropout=dropout)
        return self.dense(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: TeleChatConfig):
        super().__init__()
        H, Fd = config.hidden_size, config.ffn_hidden_size
        self.gate_proj = nn.Linear(H, Fd, bias=False)
        self.up_proj = nn.Linear(H, Fd, bias=False)
        self.down_proj = nn.Linear(Fd, H, bias=config.bias)
        self.gate_up = None  # gate_proj and up_proj as one call, where quantized layers allow (quant.use_kernel)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up is not None and self.gate_up.serves(self.gate_proj, self.up_proj):
            gate, up = self.gate_up(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: TeleChatConfig, layer: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.self_attention = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = MLP(config)
        self.dropout = config.hidden_dropout

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, mask=None, cache=None) -> Tensor:
        a = self.self_attention(self.input_layernorm(h), cos, sin, mask=mask, cache=cache)
        h = h + F.dropout(a, self.dropout, self.training)
        return h + F.dropout(self.mlp(self.post_attention_layernorm(h)), self.dropout, self.training)


class Transformer(nn.Module):
    """Embeddings, blocks and final norm: hidden states [B, T, H] for `input_ids` [B, T]."""

    def __init__(self, config: TeleChatConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.embed_layernorm:
            self.word_embeddings_layernorm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.gradient_checkpointing = False

    def forward(self, input_ids: Tensor, *, cache=None, attention_mask: Tensor | None = None,
                rope: tuple[Tensor, Tensor] | None = None, segment_ids: Tensor | None = None,
                select: Tensor | None = None) -> Tensor:
        """Hidden states; `select` (indices along T) keeps only those positions before the final norm.

        Without `cache` the tokens are positions 0..T-1 of each row (`attention_mask` [B, T]: 0 on
        left padding). With a cache step (telechat.kv) the step supplies positions, rotary lengths
        and attention. segment_ids [B, T] (packed training samples): each segment attends only
        within itself with positions from 0, as if it were alone; 0 marks padding."""
        B, T = input_ids.shape
        mask = None
        if segment_ids is not None:
            mask = PackedSegments(segment_ids)
            positions, total = mask.positions, mask.lengths  # each segment scaled for its own length
        elif cache is not None:
            if attention_mask is not None:
                raise ValueError("with a cache, padding goes into the cache step (DenseKV.at(attention_mask=...))")
            positions, total = cache.positions, cache.rope_total
        else:
            positions, total = torch.arange(T, device=input_ids.device), T
            mask = causal_mask(positions, T, attention_mask)
        cos, sin = rope if rope is not None else rope_cos_sin(self.config, positions, total)
        if cos.dim() == 3:  # per-row tables [B, T, d]: broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        h = self.word_embeddings(input_ids).to(self.ln_f.weight.dtype)  # the embedding may be 16-bit
        if self.config.embed_layernorm:
            h = self.word_embeddings_layernorm(h)
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        for block in self.h:
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(block, h, cos, sin, mask, cache, use_reentrant=False)
            else:
                h = block(h, cos, sin, mask, cache)
        return self.ln_f(h if select is None else h[:, select])


class TeleChat(nn.Module):
    """TelechatForCausalLM. `model(input_ids)` returns logits [B, T, V]; it keeps no cache state."""

    def __init__(self, config: TeleChatConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.word_embeddings.weight

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (that of the norms: a quantized model may keep its embedding 16-bit)."""
        return self.transformer.ln_f.weight.dtype

    def forward(self, input_ids: Tensor, *, cache=None, attention_mask: Tensor | None = None,
                rope: tuple[Tensor, Tensor] | None = None, segment_ids: Tensor | None = None,
                last_only: bool = False, select: Tensor | None = None) -> Tensor:
        """Logits for `input_ids` [B, T].

        cache: a cache step (`telechat.kv`: `DenseKV.at(...)` or the engine's paged step) that
            holds the positions of these tokens and the keys/values before them.
        attention_mask: [B, T] with 0 on left padding (no cache).
        rope: precomputed (cos, sin) for these positions.
        segment_ids: [B, T] for packed training samples (segments attend only within themselves).
        last_only: logits of the last position only ([B, 1, V]); select: of these positions only.
        """
        if last_only:
            select = torch.tensor([input_ids.shape[1] - 1], device=input_ids.device)
        return self.lm_head(self.transformer(input_ids, cache=cache, attention_mask=attention_mask, rope=rope,
                                             segment_ids=segment_ids, select=select))


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
        y = torch.empty_like(q)
        for b, s, e, pad in self.spans():
            if pad:  # a padding token attends to itself only: its own value
                y[b, :, s:e] = v[b, :, s:e].repeat_interleave(group, dim=0)
            else:
                y[b:b + 1, :, s:e] = sdpa(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e],
                                          causal=True, dropout=dropout)
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

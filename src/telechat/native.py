"""CPU decoding with the decoder blocks as one C++ call (`torch.classes.telechat.DecodeStack`).

A decode step of a small model on CPU spends more time between kernels than in them: hundreds of
operator calls per token, each through Python (eager) or inductor's Python wrapper (compiled), each
forking the thread pool. Here the embedding, the final norm, the head and sampling stay in torch, and
every block (norms, projections, rotary, the paged KV write, attention, MLP) runs in one operator that
reads the weights where the model keeps them: int4/int8 rows through the integer kernels of
`telechat::qlinear`, fp32/bf16/fp16 weights through fp32 dot products. Activations stay fp32 inside (a
bf16 model's hidden state is not rounded between blocks); the keys/values are stored in the pool's
dtype, as the model's own path stores them.

`NativeDecoder.build(model)` gives None (and `unsupported(model)` the reason) where the model has
anything the operator does not run: LoRA wrappers, act-order quantized layers, another device, training mode.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .kv import PagedKV
from .linear import DecodeLinear
from .quant.kernels import HALF_MAX_ROWS

_DENSE = (torch.float32, torch.bfloat16, torch.float16)


def unsupported(model: nn.Module) -> str | None:
    """Why `model` cannot decode through the native operator (None: it can)."""
    from .model import MLP, Attention, Block, RMSNorm
    from .quant import kernels
    from .quant.linear import QuantLinear

    if model.lm_head.weight.device.type != "cpu":
        return "not on the CPU"
    if model.training:
        return "in training mode"
    if not kernels.available():
        return "telechat's CPU operators are not built (no C++ compiler)"
    c = model.config
    if c.head_dim > 512 or c.head_dim % 2 or c.n_head % c.n_kv_head:
        return "its head shape"
    for i, block in enumerate(model.transformer.h):
        if type(block) is not Block or type(block.self_attention) is not Attention or type(block.mlp) is not MLP \
                or type(block.input_layernorm) is not RMSNorm or type(block.post_attention_layernorm) is not RMSNorm:
            return f"block {i} has modules of other kinds (e.g. LoRA)"
        if any(_altered(m) for m in block.modules()):
            return f"block {i} has hooks or a replaced forward"
        for name, m in _linears(block):
            if isinstance(m, QuantLinear):
                if m.path != "native" or m._reorder:
                    return f"block {i} {name}: a quantized layer off the native path or in act order"
            elif type(m) not in (nn.Linear, DecodeLinear) or m.weight.dtype not in _DENSE:
                return f"block {i} {name}: a {type(m).__module__}.{type(m).__name__} layer (e.g. LoRA)"
        if {block.input_layernorm.eps, block.post_attention_layernorm.eps} != {c.layer_norm_epsilon}:
            return f"block {i} has a norm epsilon other than the config's"
    return None


def _altered(m: nn.Module) -> bool:
    """Hooks or an instance-level forward: behaviour only the module's own call would run."""
    return bool(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__)


def _linears(block) -> list[tuple[str, nn.Module]]:
    a, m = block.self_attention, block.mlp
    return [("query", a.query), ("key_value", a.key_value), ("dense", a.dense), ("gate_proj", m.gate_proj),
            ("up_proj", m.up_proj), ("down_proj", m.down_proj)]


class NativeDecoder:
    """The decode step of `model` for a PagedKV pool; see the module docstring."""

    def __init__(self, model: nn.Module):
        from .quant import kernels

        if not kernels.available():
            raise RuntimeError("telechat's CPU operators are not built on this machine (no C++ compiler)")
        self.model = model
        c = model.config
        self.stack = torch.classes.telechat.DecodeStack(c.hidden_size, c.n_head, c.n_kv_head, c.head_dim,
                                                        c.ffn_hidden_size, float(c.layer_norm_epsilon))
        for block in model.transformer.h:
            self.stack.add_layer(block.input_layernorm.weight.detach(), block.post_attention_layernorm.weight.detach())
            a, m = block.self_attention, block.mlp
            self._add("attn_in", [a.query, a.key_value], a.qkv)
            self._add("dense", [a.dense], None)
            self._add("mlp_in", [m.gate_proj, m.up_proj], m.gate_up)
            self._add("down", [m.down_proj], None)
        self.signature = self._signature()

    @classmethod
    def build(cls, model: nn.Module) -> "NativeDecoder | None":
        return None if unsupported(model) else cls(model)

    def _add(self, part: str, layers: list[nn.Module], stacked) -> None:
        if stacked is not None and stacked.serves(*layers):  # one call over the stacked rows
            st = stacked.stack
            self.stack.add_linear(part, st["qrows"], st["srows"], st.get("mrows"), st.get("zrows"), None, None,
                                  stacked.bits, stacked.group_size)
            return
        for m in layers:
            bias = None if m.bias is None else m.bias.detach()
            if hasattr(m, "qrows"):
                self.stack.add_linear(part, m.qrows, m.srows, m.mrows, m.zrows, None, bias, m.bits, m.group_size)
            else:
                self.stack.add_linear(part, None, None, None, None, m.weight.detach(), bias, 0, 0)

    def _signature(self) -> tuple:
        """What the registered tensors are: ids of every parameter and buffer, and the quantized rows'
        versions (a layer moved or re-prepared gets new rows)."""
        m = self.model
        return (tuple(map(id, m.parameters())), tuple(map(id, m.buffers())), m.training,
                tuple((type(x), getattr(x, "rows_version", 0), _altered(x)) for x in m.modules()))

    def current(self) -> bool:
        """Whether the model still holds the tensors this decoder registered."""
        return self._signature() == self.signature

    @torch.inference_mode()
    def __call__(self, ids: Tensor, cos: Tensor, sin: Tensor, pool: PagedKV, write_slots: Tensor,
                 ctx_slots: Tensor, ctx_lens: Tensor, select: Tensor | None = None) -> Tensor:
        """Logits [B, V] (fp32) of rows `ids` [B], one token each: cos/sin [B, head_dim], the pool the rows'
        keys and values go to (`write_slots` [B]) and are read from (`ctx_slots` [B, S], first `ctx_lens`
        [B]). Every row's key/value is written before any row attends, so the rows of a prompt chunk
        (each with its own context length) attend causally within it. select: logits of these rows only."""
        t = self.model.transformer
        h = t.word_embeddings(ids)
        if self.model.config.embed_layernorm:
            h = t.word_embeddings_layernorm(h.to(t.ln_f.weight.dtype))
        h = h.float().contiguous()
        h = self.stack.step(h, cos.float().contiguous(), sin.float().contiguous(), pool.k, pool.v,
                            write_slots.contiguous(), ctx_slots.contiguous(), ctx_lens.contiguous())
        if select is not None:
            h = h[select]
        x = t.ln_f(h.to(t.ln_f.weight.dtype))
        head = self.model.lm_head
        if type(head) in (nn.Linear, DecodeLinear) and head.weight.dtype in _DENSE and len(x) <= HALF_MAX_ROWS \
                and not _altered(head):
            # fp32 sums over the weight as stored, on every core (BLAS's one-row path takes one)
            return torch.ops.telechat.hlinear(x.float(), head.weight, None if head.bias is None else head.bias.float())
        return head(x).float()

"""Interop with transformers: the same weights as an HF `LlamaForCausalLM`.

TeleChat at lengths where NTK scaling is off (alpha 1, mscale 1) is LLaMA math with biases on
`dense` and `down_proj`, so a Llama model with attention/MLP biases (zero where TeleChat has
none) computes the same function. Used by the parity test and the benchmarks.
"""
from __future__ import annotations

import torch

from .config import TeleChatConfig
from .model import TeleChat


def split_key_value(weight: torch.Tensor, config: TeleChatConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-head interleaved `key_value` weight [2*n_kv*d, H] -> (K weight, V weight), each [n_kv*d, H]."""
    kv = weight.view(config.n_kv_head, 2, config.head_dim, -1)
    return kv[:, 0].reshape(-1, weight.shape[-1]), kv[:, 1].reshape(-1, weight.shape[-1])


def merge_key_value(k: torch.Tensor, v: torch.Tensor, config: TeleChatConfig) -> torch.Tensor:
    """Inverse of `split_key_value`."""
    n, d = config.n_kv_head, config.head_dim
    return torch.stack([k.view(n, d, -1), v.view(n, d, -1)], dim=1).reshape(2 * n * d, -1)


def llama_config(config: TeleChatConfig):
    from transformers import LlamaConfig

    base, mscale = config.rope_scaling(config.training_seqlen)
    if mscale != 1.0:
        raise ValueError("this config has NTK scaling at its training length; no plain LLaMA equivalent")
    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head,
        head_dim=config.head_dim, rms_norm_eps=config.layer_norm_epsilon, rope_theta=base,
        max_position_embeddings=config.training_seqlen, tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=config.bias, mlp_bias=config.bias, hidden_act="silu",
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)


def llama_state_dict(model: TeleChat) -> dict[str, torch.Tensor]:
    """Our weights under LlamaForCausalLM's key names."""
    c = model.config
    sd = model.state_dict()
    out = {"model.embed_tokens.weight": sd["transformer.word_embeddings.weight"],
           "model.norm.weight": sd["transformer.ln_f.weight"]}
    out["lm_head.weight"] = sd["lm_head.weight"]  # the same tensor as the embedding when tied
    for i in range(c.n_layer):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        k, v = split_key_value(sd[p + "self_attention.key_value.weight"], c)
        out.update({
            q + "input_layernorm.weight": sd[p + "input_layernorm.weight"],
            q + "post_attention_layernorm.weight": sd[p + "post_attention_layernorm.weight"],
            q + "self_attn.q_proj.weight": sd[p + "self_attention.query.weight"],
            q + "self_attn.k_proj.weight": k,
            q + "self_attn.v_proj.weight": v,
            q + "self_attn.o_proj.weight": sd[p + "self_attention.dense.weight"],
            q + "mlp.gate_proj.weight": sd[p + "mlp.gate_proj.weight"],
            q + "mlp.up_proj.weight": sd[p + "mlp.up_proj.weight"],
            q + "mlp.down_proj.weight": sd[p + "mlp.down_proj.weight"],
        })
        if c.bias:
            zeros = lambda n: torch.zeros(n, dtype=k.dtype, device=k.device)  # noqa: E731
            out.update({
                q + "self_attn.q_proj.bias": zeros(c.n_head * c.head_dim),
                q + "self_attn.k_proj.bias": zeros(c.n_kv_head * c.head_dim),
                q + "self_attn.v_proj.bias": zeros(c.n_kv_head * c.head_dim),
                q + "self_attn.o_proj.bias": sd[p + "self_attention.dense.bias"],
                q + "mlp.gate_proj.bias": zeros(c.ffn_hidden_size),
                q + "mlp.up_proj.bias": zeros(c.ffn_hidden_size),
                q + "mlp.down_proj.bias": sd[p + "mlp.down_proj.bias"],
            })
    return out


def to_hf_llama(model: TeleChat):
    """A transformers LlamaForCausalLM carrying a copy of `model`'s weights."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(llama_config(model.config)).to(model.lm_head.weight.dtype)
    hf.load_state_dict(llama_state_dict(model), strict=True)
    return hf.eval()

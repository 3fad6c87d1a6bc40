"""Interop with transformers: the same weights as an HF `LlamaForCausalLM`.

TeleChat at lengths where NTK scaling is off (alpha 1, mscale 1) is LLaMA math with biases on
`dense` and `down_proj`, so a Llama model with attention/MLP biases (zero where TeleChat has
none) computes the same function. Used by the parity test and the benchmarks.

Also the transformers Auto classes: `write_remote_code` (saved folders load with trust_remote_code)
and, on request only, `register_auto_classes` (model_type "telechat" without remote code). Importing
this module registers nothing: `LLM.save` and the converters import it.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import torch

from .config import TeleChatConfig
from .model import TeleChat


def split_key_value(weight: torch.Tensor, config: TeleChatConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-head interleaved `key_value` weight [2*n_kv*d, H] -> (K weight, V weight), each [n_kv*d, H]."""
    kv = weight.reshape(config.n_kv_head, 2, config.head_dim, -1)
    if weight.dim() == 1:  # the bias
        return kv[:, 0].reshape(-1), kv[:, 1].reshape(-1)
    return kv[:, 0].reshape(-1, weight.shape[-1]), kv[:, 1].reshape(-1, weight.shape[-1])


def merge_key_value(k: torch.Tensor, v: torch.Tensor, config: TeleChatConfig) -> torch.Tensor:
    """Inverse of `split_key_value`; also for the [n_kv*d] biases (returns [2*n_kv*d])."""
    n, d = config.n_kv_head, config.head_dim
    merged = torch.stack([k.reshape(n, d, -1), v.reshape(n, d, -1)], dim=1).reshape(2 * n * d, -1)
    return merged.squeeze(-1) if k.dim() == 1 else merged


def llama_config(config: TeleChatConfig):
    from transformers import LlamaConfig

    base, mscale, _ = config.rope_scaling(config.training_seqlen)
    if mscale != 1.0:
        raise ValueError("this config has NTK scaling at its training length; no plain LLaMA equivalent")
    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head,
        head_dim=config.head_dim, rms_norm_eps=config.layer_norm_epsilon, rope_theta=base,
        max_position_embeddings=config.training_seqlen, tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=config.bias or config.qkv_bias, mlp_bias=config.bias or config.qkv_bias, hidden_act="silu",
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
        if c.bias or c.qkv_bias:
            zeros = lambda n: torch.zeros(n, dtype=k.dtype, device=k.device)  # noqa: E731
            qb = sd.get(p + "self_attention.query.bias")
            kb, vb = split_key_value(sd[p + "self_attention.key_value.bias"], c) if c.qkv_bias else (None, None)
            ob, db = sd.get(p + "self_attention.dense.bias"), sd.get(p + "mlp.down_proj.bias")
            out.update({
                q + "self_attn.q_proj.bias": qb if qb is not None else zeros(c.n_head * c.head_dim),
                q + "self_attn.k_proj.bias": kb if kb is not None else zeros(c.n_kv_head * c.head_dim),
                q + "self_attn.v_proj.bias": vb if vb is not None else zeros(c.n_kv_head * c.head_dim),
                q + "self_attn.o_proj.bias": ob if ob is not None else zeros(c.hidden_size),
                q + "mlp.gate_proj.bias": zeros(c.ffn_hidden_size),
                q + "mlp.up_proj.bias": zeros(c.ffn_hidden_size),
                q + "mlp.down_proj.bias": db if db is not None else zeros(c.hidden_size),
            })
    return out


def to_hf_llama(model: TeleChat):
    """A transformers LlamaForCausalLM carrying a copy of `model`'s weights."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(llama_config(model.config)).to(model.dtype)
    hf.load_state_dict(llama_state_dict(model), strict=True)
    return hf.eval()


# ---- transformers Auto classes and remote code --------------------------------------------------
_REMOTE = Path(__file__).parent / "hf_remote"
AUTO_MAP = {"AutoConfig": "configuration_telechat.TelechatConfig",
            "AutoModelForCausalLM": "modeling_telechat.TelechatForCausalLM"}


def write_remote_code(folder: str | Path) -> None:
    """Put the files `trust_remote_code=True` needs into a saved folder: thin transformers wrappers
    plus copies of telechat's own `config.py`, `rope.py`, `kv.py` and `model.py` (so the folder works without telechat)."""
    folder = Path(folder)
    src = Path(__file__).parent
    for name in ("configuration_telechat.py", "modeling_telechat.py", "tokenization_telechat.py"):
        shutil.copyfile(_REMOTE / name, folder / name)
    shutil.copyfile(src / "config.py", folder / "telechat_config.py")
    for name, dest in (("rope.py", "telechat_rope.py"), ("kv.py", "telechat_kv.py"), ("model.py", "telechat_model.py")):
        text = (src / name).read_text(encoding="utf-8").replace("from .config import", "from .telechat_config import")
        text = text.replace("from .rope import", "from .telechat_rope import").replace("from .kv import", "from .telechat_kv import")
        (folder / dest).write_text(text, encoding="utf-8")
    tok_cfg = folder / "tokenizer_config.json"
    if (folder / "tokenizer.model").exists() and not (folder / "tokenizer.json").exists():
        cfg = json.loads(tok_cfg.read_text(encoding="utf-8")) if tok_cfg.exists() else {}
        cfg.update({"tokenizer_class": "TelechatTokenizer",
                    "auto_map": {"AutoTokenizer": ["tokenization_telechat.TelechatTokenizer", None]}})
        cfg.setdefault("add_bos_token", False)
        cfg.setdefault("add_eos_token", False)
        tok_cfg.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    elif (folder / "tokenizer.json").exists():
        cfg = json.loads(tok_cfg.read_text(encoding="utf-8")) if tok_cfg.exists() else {}
        if cfg.get("tokenizer_class") in (None, "TelechatTokenizer"):
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
            cfg.pop("auto_map", None)
            tok_cfg.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def register_auto_classes() -> None:
    """Make transformers' AutoConfig / AutoModelForCausalLM resolve model_type "telechat" natively
    (folders then load without trust_remote_code). Imports transformers; `import telechat` never calls
    this, `import telechat.hf_remote` does."""
    from .hf_remote import register

    register()


class _RegisterWhenImported(importlib.abc.MetaPathFinder):
    """Registers the Auto classes right after `transformers` is first imported (for
    `install_auto_registration`). Probes with find_spec leave it in place."""

    def __init__(self):
        self.busy = False

    def find_spec(self, name, path=None, target=None):
        if name != "transformers" or self.busy:
            return None
        self.busy = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.busy = False
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            try:
                register_auto_classes()
            except Exception:  # never break `import transformers`
                pass

        spec.loader.exec_module = exec_and_register
        return spec


def install_auto_registration() -> None:
    """`register_auto_classes` now if transformers is loaded, else (through an import hook, removed once
    it has run) when it is first imported, so the caller does not pay for importing it. Only on request:
    nothing in telechat calls it."""
    if "transformers" in sys.modules:
        try:
            register_auto_classes()
        except Exception:
            pass
    elif importlib.util.find_spec("transformers") is not None:
        sys.meta_path.insert(0, _RegisterWhenImported())

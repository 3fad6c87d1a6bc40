"""`telechat.load(path) -> LLM`: a model, its tokenizer and its generation defaults in one object."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from . import chat as _chat
from .checkpoint import CheckpointError, dtype_name, load_model, save_model
from .config import ROPE_SCALING_TYPES, ConfigError, TeleChatConfig, check_int, check_number, preset, read_json
from .default_model import resolve_model
from .engine import Engine
from .linear import swap_linears
from .generate import SamplingParams, default_max_new_tokens, resolve_params
from .model import TeleChat
from .tokenizer import Tokenizer, has_tokenizer, load_tokenizer

_GEN_KEYS = ("max_length", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
             "pad_token_id", "bos_token_id", "eos_token_id", "user_token_id", "bot_token_id")


def default_generation_config(config: TeleChatConfig, tokenizer: Tokenizer | None) -> dict:
    gen = {"max_length": config.seq_length, "do_sample": False, "pad_token_id": config.pad_token_id,
           "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    if tokenizer is not None:
        keys = [("eos_token_id", "eos_id"), ("pad_token_id", "pad_id"), ("bos_token_id", "bos_id")]
        if _chat.chat_format(tokenizer) == "telechat":  # <_user> is a stop id only in TeleChat's own format
            keys += [("user_token_id", "user_id"), ("bot_token_id", "bot_id")]
        for key, attr in keys:
            if getattr(tokenizer, attr) is not None:
                gen[key] = getattr(tokenizer, attr)
    return gen


class LLM:
    """A loaded model: `.model` (nn.Module), `.tokenizer` (or None), `.generation_config` (dict)."""

    def __init__(self, model: TeleChat, tokenizer: Tokenizer | None = None, generation_config: dict | None = None,
                 path: str | Path | None = None):
        self.model = swap_linears(model)
        self.tokenizer = tokenizer
        self.generation_config = dict(generation_config or default_generation_config(model.config, tokenizer))
        self.path = Path(path) if path is not None else None
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        """The engine every generation on this model runs through (created on first use)."""
        if self._engine is None or self._engine.stopped:  # a server's shutdown stops it
            self._engine = Engine(self.model)
        return self._engine

    @property
    def config(self) -> TeleChatConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def chat_format(self) -> str:
        return _chat.chat_format(self.tokenizer)

    def sampling_params(self, **kwargs) -> SamplingParams:
        return resolve_params(self.generation_config, self.config.vocab_size, **kwargs)

    def generate(self, input_ids, max_new_tokens: int | None = None, do_sample: bool | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float | None = None, eos_token_id: int | list[int] | None = None,
                 seed: int | None = None, attention_mask: Tensor | None = None, compile: bool | None = None) -> Tensor:
        """Greedy or sampled continuation of `input_ids` [B, T] (or one list of ids) -> [B, T + n].

        Unset arguments come from generation_config.json. A row stops at a stop id (the
        checkpoint's `<_end>` and `<_user>` unless `eos_token_id` is given; -1 disables stopping)
        and is padded after it. `attention_mask` [B, T] marks left padding with 0; every row is
        generated as its own sequence. `compile` sets the engine's compiled decode step on or off
        (default: on where it is faster).
        """
        ids = self._ids(input_ids)
        steps = list(self.stream(ids, attention_mask=attention_mask, compile=compile, max_new_tokens=max_new_tokens,
                                 do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                 repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, seed=seed))
        return torch.cat([ids, torch.stack(steps, 1)], dim=1) if steps else ids.clone()

    def stream(self, input_ids, attention_mask: Tensor | None = None, compile: bool | None = None, **sampling):
        """Like generate, but yields the next token of every row [B] as it is produced (rows that
        ended yield the pad id; a stop token is yielded)."""
        ids = self._ids(input_ids)
        sampling["max_new_tokens"] = self._max_new(ids, sampling.get("max_new_tokens"))
        p = self.sampling_params(**sampling)
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask).reshape(ids.shape).bool().cpu()
            rows = [r[m].tolist() for r, m in zip(ids.cpu(), mask)]
        else:
            rows = ids.tolist()
        if compile is not None:
            self.engine.configure(compile=compile)
        return self._stream(rows, p)

    def _stream(self, rows: list[list[int]], p: SamplingParams):
        if p.max_new_tokens == 0:
            return
        for step in self.engine.iter_tokens(rows, [p] * len(rows),
                                            max_len=max(len(r) for r in rows) + p.max_new_tokens):
            yield torch.tensor([p.pad_id if t is None else t for t in step], device=self.device)

    def _ids(self, input_ids) -> Tensor:
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        return (ids[None] if ids.dim() == 1 else ids).to(self.device)

    def _max_new(self, ids: Tensor, max_new_tokens: int | None) -> int:
        """Explicit value, else generation_config's max_new_tokens, else DEFAULT_MAX_NEW_TOKENS,
        within what max_length leaves after the prompt."""
        if max_new_tokens is not None:
            return max_new_tokens
        return default_max_new_tokens(self.generation_config, ids.shape[1], self.config.seq_length)

    def chat(self, question: str, history: list[dict] | None = None, stream: bool = False, **generation_kwargs):
        """`(answer, history)`; with `stream=True`, an iterator of text increments (history is
        extended when it is exhausted). History: [{"role": "user"|"bot"|"assistant", "content": str}]."""
        return _chat.chat(self.model, self.tokenizer, question, history, generation_config=self.generation_config,
                          stream=stream, engine=self.engine, **generation_kwargs)

    def encode_chat(self, question: str, history: list[dict] | None = None, max_length: int | None = None) -> list[int]:
        return _chat.encode_conversation(self.tokenizer, question, history, max_length)

    def save(self, path: str | Path, max_shard_bytes: int = 2 * 1024**3) -> Path:
        """Write an official-layout folder (safetensors, config.json, generation_config.json, tokenizer)."""
        from .hf import AUTO_MAP, write_remote_code

        path = Path(path)
        self.config.extra["auto_map"] = dict(AUTO_MAP)
        save_model(self.model, path, max_shard_bytes)
        (path / "generation_config.json").write_text(json.dumps(self.generation_config, indent=2) + "\n")
        if self.tokenizer is not None:
            self.tokenizer.save(path)
        write_remote_code(path)  # so transformers' Auto classes load it with trust_remote_code=True
        return path

    def info(self) -> dict:
        from .quant import QuantConfig, quantized_layers

        c = self.config
        quant = c.extra.get("quantization_config")
        quantized = sum(m.in_features * m.out_features + (0 if m.bias is None else m.bias.numel())
                        for m in quantized_layers(self.model))
        return {
            "path": str(self.path) if self.path else None,
            "layers": c.n_layer, "hidden_size": c.hidden_size, "heads": c.n_head, "kv_heads": c.n_kv_head,
            "head_dim": c.head_dim, "ffn_hidden_size": c.ffn_hidden_size, "vocab_size": c.vocab_size,
            "tied_embeddings": c.tie_word_embeddings, "context": c.seq_length, "training_seqlen": c.training_seqlen,
            "rope_base_seqlen": c.rope_base_seqlen, "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling_type,
            "parameters": sum(p.numel() for p in self.model.parameters()) + quantized,
            "dtype": dtype_name(self.dtype), "device": str(self.device), "chat_format": self.chat_format,
            "quantization": QuantConfig.from_dict(quant, "config.json").describe() if quant else None,
            "tokenizer": repr(self.tokenizer) if self.tokenizer else None,
        }

    def __repr__(self) -> str:
        return f"LLM({self.path or 'in-memory'}, {self.info()['parameters'] / 1e6:.1f}M params, {dtype_name(self.dtype)})"


def _read_generation_config(path: Path) -> dict | None:
    f = path / "generation_config.json"
    if not os.path.lexists(f):
        return None
    try:
        d = read_json(f, CheckpointError)
    except FileNotFoundError:
        raise CheckpointError(f"{f}: cannot be read (dangling link)") from None
    gen = {k: v for k, v in d.items() if k in _GEN_KEYS or k.endswith("_token_id") or k == "max_new_tokens"}
    try:
        for key, value in gen.items():
            _check_generation_value(key, value)
    except ConfigError as e:
        raise CheckpointError(f"{f}: {e}") from None
    return gen


def _check_generation_value(key: str, value) -> None:
    """Types and ranges, so that a bad value fails at load rather than at the first generate."""
    if value is None:
        return
    if key.endswith("_token_id"):
        ids = value if isinstance(value, list) else [value]
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ConfigError(f"{key} must be an integer or a list of integers, got {value!r:.60}")
    elif key == "max_length":
        check_int(key, value, 1)
    elif key in ("max_new_tokens", "top_k"):
        check_int(key, value, 0)
    elif key == "do_sample":
        if not isinstance(value, bool):
            raise ConfigError(f"do_sample must be true or false, got {value!r:.60}")
    elif key == "temperature":
        check_number(key, value, 0)
    elif key == "top_p":
        check_number(key, value, 0, 1, low_open=True)
    elif key == "repetition_penalty":
        check_number(key, value, 0, low_open=True)


def load(path: str | Path, device: str | torch.device = "auto", dtype="auto",
         adapter: str | Path | None = None, rope_scaling: str | None = None) -> LLM:
    """Load a TeleChat checkpoint folder (official layout: .bin or safetensors, sharded or not).

    "default" loads the default model (SmolLM2-135M-Instruct, imported once into $TELECHAT_HOME).

    device "auto": CUDA when present, else the CPU. dtype "auto": bf16 on GPUs and on CPUs with
    native bf16 (AVX-512 BF16 / AMX), fp32 on other CPUs; None keeps the checkpoint's own;
    "float32", "bfloat16", "float16" or a torch dtype converts while loading. Quantized
    checkpoints keep their format (dtype applies to what is not quantized). A folder without
    tokenizer files gives `llm.tokenizer` None.

    adapter: a LoRA adapter folder in PEFT's format (`telechat train --lora-dim`, PEFT's
    save_pretrained) trained on this base. On a float model its update is merged into the weights
    at load (W += (alpha / r) * B @ A in fp32: decoding costs what the base costs); on a GPTQ model
    it is kept beside the quantized layers (PEFT-style wrapping). An adapter that does not fit the
    base raises `lora.AdapterError` (a ValueError) naming the file, the key and the shapes.

    rope_scaling: how positions past the training length are scaled (none, ntk, ntk-mscale,
    dynamic, yarn; see `telechat.config.ROPE_SCALING_TYPES`); None keeps the checkpoint's
    (`rope_scaling_type` in its config.json, else ntk-mscale: what TeleChat's published code does).
    """
    from .device import resolve_device

    if rope_scaling is not None and rope_scaling not in ROPE_SCALING_TYPES:
        raise ValueError(f"rope_scaling must be one of {', '.join(ROPE_SCALING_TYPES)}, got {rope_scaling!r}")
    device = resolve_device(device)
    path = resolve_model(path)
    if adapter is not None:  # a bad adapter fails before the base loads
        from .lora import check_adapter_for

        check_adapter_for(path, adapter)
    model = load_model(path, device=device, dtype=dtype)
    if rope_scaling is not None:
        model.config.rope_scaling_type = rope_scaling
    own = _read_generation_config(path)  # checked before the tokenizer, which reads it too
    tokenizer = load_tokenizer(path) if has_tokenizer(path) else None
    gen = default_generation_config(model.config, tokenizer)
    gen.update(own or {})
    try:  # the combination too (e.g. temperature 0 with do_sample), as generate would see it
        resolve_params(gen, model.config.vocab_size)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / 'generation_config.json'}: {e}") from None
    llm = LLM(model, tokenizer, gen, path)
    if adapter is not None:
        from .lora import apply_adapter

        apply_adapter(llm, adapter)
    return llm


def from_preset(name: str, device="cpu", dtype=torch.float32, seed: int = 0, tokenizer: Tokenizer | None = None,
                **overrides) -> LLM:
    """A randomly initialised model of a named size (for tests, benchmarks and pre-training)."""
    config = preset(name, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = TeleChat(config)
    init_weights(model)
    return LLM(model.to(dtype=dtype).eval(), tokenizer)


def init_weights(model: TeleChat, std: float = 0.02) -> None:
    """Normal(0, std) linears and embeddings, zero biases, unit norms."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.Embedding):
            torch.nn.init.normal_(m.weight, std=std)

"""Autoregressive decoding with a preallocated KV cache: greedy and sampled, batched, streaming."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Iterator

import torch
from torch import Tensor

from .model import TeleChat
from .rope import rope_cos_sin


# Answers stop here when neither the caller nor generation_config.json sets max_new_tokens: a model
# that never emits its stop token (greedy loops) must not run to the end of an 8k context.
DEFAULT_MAX_NEW_TOKENS = 512


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_ids: list[int] = field(default_factory=list)
    pad_id: int = 0
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def default_max_new_tokens(defaults: dict, prompt_len: int, context: int) -> int:
    """Tokens to generate when the caller gives no max_new_tokens: generation_config's own
    `max_new_tokens`, else DEFAULT_MAX_NEW_TOKENS; either way at most what `max_length` (the
    total, else `context`) leaves after the prompt, and at least 1."""
    room = int(defaults.get("max_length") or context) - prompt_len
    own = defaults.get("max_new_tokens")
    n = int(own) if own is not None else DEFAULT_MAX_NEW_TOKENS
    return max(1, min(n, room))


def resolve_params(defaults: dict, vocab_size: int, **overrides) -> SamplingParams:
    """SamplingParams from generation_config-style `defaults` and call-site overrides (None = default).

    `eos_token_id` (int or list) overrides the stop ids; ids outside the vocabulary (e.g. -1) are
    dropped, so `eos_token_id=-1` disables stopping.
    """
    names = {f.name for f in fields(SamplingParams)}
    unknown = set(overrides) - names - {"eos_token_id"}
    if unknown:
        raise TypeError(f"unknown generation argument(s): {', '.join(sorted(unknown))}")
    merged = {k: v for k, v in defaults.items() if v is not None}
    merged.update({k: v for k, v in overrides.items() if v is not None})

    def as_list(v):
        return [] if v is None else [v] if isinstance(v, int) else list(v)

    eos = overrides.get("eos_token_id")
    if eos is not None:
        stops = as_list(eos)
    elif merged.get("stop_ids") is not None:
        stops = as_list(merged["stop_ids"])
    else:  # generation_config's eos_token_id may be an int or a list (HF convention)
        stops = as_list(merged.get("eos_token_id")) + as_list(merged.get("user_token_id"))
    kw = {k: v for k, v in merged.items() if k in names and k not in ("stop_ids", "pad_id")}
    pad = overrides.get("pad_id")
    if pad is None:
        pad = merged.get("pad_token_id", merged.get("pad_id"))
    return SamplingParams(
        **kw,
        stop_ids=sorted({int(i) for i in stops if i is not None and 0 <= int(i) < vocab_size}),
        pad_id=int(pad) if pad is not None else 0,
    )


def process_logits(logits: Tensor, tokens: Tensor, p: SamplingParams) -> Tensor:
    """Repetition penalty (over `tokens`), then temperature / top-k / top-p when sampling. fp32 in and out."""
    if p.repetition_penalty != 1.0:
        scores = logits.gather(1, tokens)
        scores = torch.where(scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty)
        logits = logits.scatter(1, tokens, scores)
    if not p.do_sample:
        return logits
    if p.temperature != 1.0:
        logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already cover top_p (the first one always stays).
        drop = probs.cumsum(-1) - probs > p.top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def next_token(logits: Tensor, p: SamplingParams, generator: torch.Generator | None) -> Tensor:
    if not p.do_sample:
        return logits.argmax(-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _decode_step(model: TeleChat, token: Tensor, input_pos: Tensor, cos: Tensor, sin: Tensor,
                 attention_mask: Tensor | None, kv_len: int) -> Tensor:
    return model(token, input_pos=input_pos, attention_mask=attention_mask, last_only=True,
                 kv_len=kv_len, rope=(cos, sin))[:, -1].float()


_compiled_steps: dict = {}


def compiled_decode_step(device_type: str = "cpu"):
    """`_decode_step` under torch.compile, compiled once per process and device type.

    CPU: dynamic shapes, attention over the filled part of the cache. Accelerators: static
    shapes (attention over the whole cache behind a key mask) so that CUDA graphs can replay it.
    """
    if device_type not in _compiled_steps:
        if device_type == "cpu":
            _compiled_steps[device_type] = torch.compile(_decode_step, dynamic=True)
        else:
            _compiled_steps[device_type] = torch.compile(_decode_step, mode="reduce-overhead", dynamic=False)
    return _compiled_steps[device_type]


@torch.inference_mode()
def generate_tokens(model: TeleChat, input_ids: Tensor, p: SamplingParams, attention_mask: Tensor | None = None,
                    compile: bool = False, static_cache: bool | None = None) -> Iterator[Tensor]:
    """Yield the next token of every row [B] at each step; rows that stopped yield `p.pad_id`.

    The stop token itself is yielded; the iterator ends when every row has stopped or after
    `p.max_new_tokens` steps. `static_cache` (default: compiling on an accelerator) attends over
    the whole preallocated cache behind a key mask, so every step has the same shapes.
    """
    B, T = input_ids.shape
    device = input_ids.device
    total = T + p.max_new_tokens
    if p.max_new_tokens == 0:
        return
    shape = model.cache_shape
    if shape is None or shape[0] != B or shape[1] < total:
        # Rounded up so that later calls reuse it (and a compiled step keeps its shapes).
        model.setup_cache(B, -(-total // 256) * 256)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device=device, dtype=torch.bool)
    static = (compile and device.type != "cpu") if static_cache is None else static_cache
    if static or attention_mask is not None:
        # Key mask over the whole cache: prompt padding from the caller, generated tokens switched on per step.
        key_mask = torch.zeros(B, model.cache_shape[1], dtype=torch.bool, device=device)
        key_mask[:, :T] = True if attention_mask is None else attention_mask
    else:
        key_mask = None
    generator = None
    if p.do_sample and p.seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(p.seed))
    stops = torch.tensor(p.stop_ids, device=device, dtype=torch.long)
    tokens = torch.empty(B, total, dtype=torch.long, device=device)
    tokens[:, :T] = input_ids
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step = compiled_decode_step(device.type) if compile else _decode_step

    if static:
        # Positions and rotary tables of every decode step, made once: a step then launches no host copy.
        positions = torch.arange(T, total, device=device)
        rope_table = rope_cos_sin(model.config, positions, positions + 1)
    # On an accelerator the host learns whether every row stopped only every few steps (a check is a
    # sync that stalls the queue of launched work); the steps in between are held back and yielded
    # after the check, so the tokens seen are the same as with a check at every step.
    check_every = 8 if static else 1
    held: list[tuple[Tensor, Tensor]] = []

    logits = model(input_ids, input_pos=torch.arange(T, device=device), attention_mask=key_mask,
                   last_only=True)[:, -1].float()
    for i in range(p.max_new_tokens):
        pos = T + i
        nxt = next_token(process_logits(logits, tokens[:, :pos], p), p, generator)
        nxt = torch.where(done, torch.full_like(nxt, p.pad_id), nxt)
        tokens[:, pos] = nxt
        done |= torch.isin(nxt, stops)
        held.append((nxt, done.all()))
        last = i == p.max_new_tokens - 1
        if len(held) == check_every or last:
            flags = torch.stack([f for _, f in held]).tolist()
            for (t, _), all_done in zip(held, flags):
                yield t
                if all_done:
                    return
            held.clear()
        if last:
            return
        if static:
            input_pos, cos, sin = positions[i:i + 1], rope_table[0][i:i + 1], rope_table[1][i:i + 1]
        else:
            input_pos = torch.tensor([pos], device=device)
            cos, sin = rope_cos_sin(model.config, input_pos, pos + 1)
        if key_mask is not None:
            key_mask[:, pos] = True
        kv_len = key_mask.shape[1] if static else pos + 1
        logits = step(model, nxt[:, None], input_pos, cos, sin, key_mask, kv_len)


def generate(model: TeleChat, input_ids: Tensor, p: SamplingParams, attention_mask: Tensor | None = None,
             compile: bool = False) -> Tensor:
    """Prompt plus generated tokens, [B, T + n]; rows that stopped early are padded with `p.pad_id`."""
    out = [t[:, None] for t in generate_tokens(model, input_ids, p, attention_mask, compile)]
    return torch.cat([input_ids, *out], dim=1) if out else input_ids.clone()

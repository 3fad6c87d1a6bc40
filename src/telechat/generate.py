"""Sampling settings and the one sampler: per-row settings as tensors, a whole batch in one call.

The decode loop itself is the engine's (telechat.engine)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
import torch
from torch import Tensor



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


@dataclass
class RowSettings:
    """Per-row sampling settings as tensors [R] (one row per sequence being sampled)."""
    sample: Tensor  # bool: sample (else greedy)
    temperature: Tensor
    top_k: Tensor  # 0 = off
    top_p: Tensor
    penalty: Tensor
    seed: Tensor  # int64 (sampled rows)
    step: Tensor  # int64: index of the token being drawn (the counter of the seeded noise)

    @classmethod
    def of(cls, params: list[SamplingParams], seeds: list[int], steps: list[int], device) -> "RowSettings":
        f = lambda xs, dt: torch.tensor(xs, dtype=dt, device=device)  # noqa: E731
        return cls(f([p.do_sample for p in params], torch.bool),
                   f([p.temperature if p.do_sample else 1.0 for p in params], torch.float32),
                   f([min(p.top_k, 1 << 62) if p.do_sample else 0 for p in params], torch.long),
                   f([p.top_p if p.do_sample else 1.0 for p in params], torch.float32),
                   f([p.repetition_penalty for p in params], torch.float32),
                   f([x % (1 << 63) for x in seeds], torch.long), f(steps, torch.long))


def process_rows(logits: Tensor, seen: Tensor | None, s: RowSettings) -> Tensor:
    """Repetition penalty (over the `seen` [R, V] tokens), then for sampled rows temperature,
    top-k and top-p (HF's order and rules). fp32 in and out; greedy rows keep their logits."""
    if seen is not None:
        pen = s.penalty[:, None]
        logits = torch.where(seen & (pen != 1.0), torch.where(logits < 0, logits * pen, logits / pen), logits)
    if not torch.compiler.is_compiling() and not bool(s.sample.any()):
        return logits
    out = logits / s.temperature[:, None]
    V = logits.shape[-1]
    k = torch.where((s.top_k > 0) & (s.top_k < V), s.top_k, V)
    ordered, order = torch.sort(out, dim=-1, descending=True)
    kth = ordered.gather(1, (k - 1)[:, None])
    out = out.masked_fill(out < kth, float("-inf"))
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    probs = ordered.softmax(-1)
    # Drop a token when the tokens before it already cover top_p (the first one always stays).
    drop = (probs.cumsum(-1) - probs > s.top_p[:, None]) & (s.top_p[:, None] < 1.0)
    out = out.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.where(s.sample[:, None], out, logits)


_M32 = 0xFFFFFFFF


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (PCG output function) on int64 tensors holding values < 2^32."""
    state = (x * 747796405 + 2891336453) & _M32
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & _M32
    return (word >> 22) ^ word


def row_noise(seed: Tensor, step: Tensor, vocab: int) -> Tensor:
    """Gumbel noise [R, vocab] that depends only on (seed, step) of each row: a row draws the same
    tokens whatever else is in the batch, and a seed reproduces a whole answer."""
    lo, hi = seed & _M32, (seed >> 32) & _M32
    row = _hash32(_hash32(_hash32(lo) ^ hi) ^ (step & _M32))[:, None]
    ids = torch.arange(vocab, device=seed.device, dtype=torch.long)[None]
    h = _hash32(row ^ _hash32(ids))
    u = (h.double() + 0.5) / 4294967296.0  # in (0, 1)
    return (-torch.log(-torch.log(u))).float()


def sample_rows(logits: Tensor, s: RowSettings) -> Tensor:
    """Next token [R] from processed logits: argmax for greedy rows, Gumbel-max draws (exactly
    softmax sampling) for the others."""
    greedy = logits.argmax(-1)
    if not torch.compiler.is_compiling() and not bool(s.sample.any()):
        return greedy
    drawn = (logits + row_noise(s.seed, s.step, logits.shape[-1])).argmax(-1)
    return torch.where(s.sample, drawn, greedy)


def seen_mask(tokens: Tensor, vocab: int) -> Tensor:
    """[R, vocab] bool: which ids occur in each row of `tokens` [R, T]."""
    return torch.zeros(tokens.shape[0], vocab, dtype=torch.bool, device=tokens.device).scatter_(1, tokens, True)


def process_logits(logits: Tensor, tokens: Tensor, p: SamplingParams) -> Tensor:
    """`process_rows` for rows that share one SamplingParams; `tokens` [R, T] are each row's history."""
    R = logits.shape[0]
    s = RowSettings.of([p] * R, [0] * R, [0] * R, logits.device)
    seen = seen_mask(tokens, logits.shape[-1]) if p.repetition_penalty != 1.0 else None
    return process_rows(logits, seen, s)

"""Long context measured as TeleChat's tutorial does: perplexity by input length, and passkey retrieval.

- `longppl`: the perplexity of the last `tail` tokens of a prefix of a long text, for each length and
  rotary scaling. The prefix runs in chunks through a KV cache with every position's rotary tables
  scaled for the whole prefix, which is what one forward over it computes, in bounded memory.
- `passkey`: a 5-digit number hidden at several depths of filler text; the model, asked for it at the
  end, must continue with it (greedy, through the engine and its chunked prefill).
"""
from __future__ import annotations

import contextlib
import math
import random
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ROPE_SCALING_TYPES
from ..device import release_heap
from ..engine import LONG_PREFILL
from ..kv import DenseKV, prefill_chunk
from ..rope import rope_cos_sin
from .data import DataError

LONG_TASKS = ("longppl", "passkey")

PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
                 "memorize it. I will quiz you about the important information there.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "What is the pass key? The pass key is"


@contextlib.contextmanager
def rope_scaling(model, mode: str | None):
    """Run `model` with another rotary scaling for the duration (None: keep its own)."""
    if mode is not None and mode not in ROPE_SCALING_TYPES:
        raise ValueError(f"rope scaling must be one of {', '.join(ROPE_SCALING_TYPES)}, got {mode!r}")
    before = model.config.rope_scaling_type
    model.config.rope_scaling_type = mode or before
    try:
        yield
    finally:
        model.config.rope_scaling_type = before


def read_long_text(path: str | Path) -> str:
    """The text of a long UTF-8 file (DataError naming the problem otherwise)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: --long-text file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: --long-text must be a text file, not a folder") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: --long-text is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not text.strip():
        raise DataError(f"{path}: --long-text is empty")
    return text


@torch.inference_mode()
def tail_perplexity(model, ids: list[int], tail: int = 256) -> float:
    """exp(mean NLL) of the last `tail` tokens of `ids`, each predicted from everything before it,
    with the rotary tables of every position scaled for len(ids) (as one forward over `ids`)."""
    L = len(ids)
    if not 0 < tail < L:
        raise ValueError(f"the scored tail ({tail} tokens) must be shorter than the prefix ({L} tokens)")
    cfg, dev = model.config, model.lm_head.weight.device
    cache = DenseKV(cfg, 1, L, model.dtype, dev)
    tokens = torch.tensor(ids, device=dev)
    first = L - tail - 1  # the first position whose logits are scored
    nll, start = 0.0, 0
    while start < L - 1:  # the last position predicts nothing scored
        stop = min(L - 1, start + min(1024, prefill_chunk(min(L, start + 1024), cfg.n_head)))
        pos = torch.arange(start, stop, device=dev)
        sel = torch.arange(min(max(first, start), stop), stop, device=dev)
        logits = model(tokens[None, start:stop], cache=cache.at(pos, stop), rope=rope_cos_sin(cfg, pos, L),
                       select=sel - start if len(sel) else None)
        if len(sel):
            nll += float(F.cross_entropy(logits[0].float(), tokens[sel + 1], reduction="sum"))
        start = stop
        if stop >= LONG_PREFILL and dev.type == "cpu":
            release_heap()  # as the engine does: freed chunk temporaries would otherwise pile up
    return math.exp(nll / tail)


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> list[int]:
    """Token ids of about `length` tokens: filler with the passkey sentence at `depth` (0 = start, 1 =
    end), then the question."""
    def n(text: str) -> int:
        return len(tokenizer.encode(text))

    per_filler = n(PASSKEY_FILLER * 8) / 8
    fixed = n(PASSKEY_INTRO) + n(PASSKEY_NEEDLE.format(key=key)) + n(PASSKEY_QUESTION)
    reps = max(1, round((length - fixed) / per_filler))
    before = round(depth * reps)
    text = PASSKEY_INTRO + PASSKEY_FILLER * before + PASSKEY_NEEDLE.format(key=key) + \
        PASSKEY_FILLER * (reps - before) + PASSKEY_QUESTION
    return tokenizer.encode(text)


def greedy(llm, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of prompts of any length (the engine's chunked prefill; no context cap)."""
    p = llm.sampling_params(max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.0)
    out: list[list[int]] = [[] for _ in prompts]
    for step in llm.engine.iter_tokens(prompts, [p] * len(prompts), max_len=max(map(len, prompts)) + max_new_tokens):
        for row, t in zip(out, step):
            if t is not None:
                row.append(t)
    return out


def run_longppl(llm, text_ids: list[int], lengths: list[int], modes: list[str | None], tail: int,
                progress=None) -> list[dict]:
    rows = []
    for length in lengths:
        for mode in modes:
            with rope_scaling(llm.model, mode):
                ppl = tail_perplexity(llm.model, text_ids[:length], tail)
            rows.append({"length": length, "rope_scaling": mode or llm.config.rope_scaling_type, "ppl": ppl})
            if progress is not None:
                progress(1)
    return rows


def run_passkey(llm, lengths: list[int], modes: list[str | None], trials: int, seed: int = 0,
                progress=None) -> list[dict]:
    tok = llm.tokenizer
    rng = random.Random(seed)
    rows = []
    for length in lengths:
        depths = [(i + 0.5) / trials for i in range(trials)]  # spread over the text, never beside the question
        keys = [f"{rng.randrange(10000, 100000)}" for _ in depths]
        prompts = [passkey_prompt(tok, length, d, k) for d, k in zip(depths, keys)]
        for mode in modes:
            with rope_scaling(llm.model, mode):
                answers = [tok.decode(o) for o in greedy(llm, prompts, 8)]
            found = [(re.search(r"\d{5}", a) or [None])[0] for a in answers]
            hits = [f == k for f, k in zip(found, keys)]
            rows.append({"length": length, "rope_scaling": mode or llm.config.rope_scaling_type,
                         "accuracy": sum(hits) / len(hits), "trials": len(hits),
                         "prompt_tokens": round(sum(map(len, prompts)) / len(prompts)),
                         "items": [{"depth": d, "key": k, "answer": a, "correct": h}
                                   for d, k, a, h in zip(depths, keys, answers, hits)]})
            if progress is not None:
                progress(1)
    return rows

"""Batched generation until stop ids or stop strings, on the project's one decoding loop."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..generate import generate_tokens
from ..tokenizer import StreamDecoder


def _cut(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


@torch.inference_mode()
def generate_until(llm, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop: Sequence[str] = (),
                   batch_size: int = 8, do_sample: bool = False, temperature: float | None = None,
                   top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                   stop_ids: Sequence[int] | None = None,
                   progress: Callable[[int], None] | None = None) -> list[str]:
    """Text generated after each prompt (ids), cut before the first stop string.

    Greedy unless `do_sample`; no repetition penalty. A row ends at a stop id (default: the
    checkpoint's `<_end>`/`<_user>`), a stop string or `max_new_tokens`. Prompts are batched
    longest first and left-padded; a prompt longer than the context loses its oldest tokens.
    Batch i samples with seed `seed + i`, so repeated prompts in different batches differ.
    """
    tok = llm.tokenizer
    if tok is None:
        raise ValueError("generation needs a tokenizer: this checkpoint folder has none")
    context = int(llm.config.seq_length)
    if max_new_tokens >= context:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the "
                         f"model's context of {context} tokens")
    keep = context - max_new_tokens
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [""] * len(prompts)
    pad = tok.pad_id if tok.pad_id is not None else 0
    for bi, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start:start + batch_size]
        rows = [list(prompts[i])[-keep:] for i in idx]
        if any(not r for r in rows):
            raise ValueError("an empty prompt cannot be generated from")
        T = max(map(len, rows))
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, T - len(r):] = torch.tensor(r)
            mask[b, T - len(r):] = 1
        params = llm.sampling_params(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                     top_p=top_p, top_k=top_k, repetition_penalty=1.0,
                                     seed=None if seed is None else seed + bi,
                                     eos_token_id=list(stop_ids) if stop_ids is not None else None)
        stops = set(params.stop_ids)
        decoders = [StreamDecoder(tok) for _ in rows]
        done = [False] * len(rows)
        texts = [""] * len(rows)
        attn = None if bool(mask.all()) else mask.to(llm.device)
        for step in generate_tokens(llm.model, ids.to(llm.device), params, attn):
            for b, t in enumerate(step.tolist()):
                if done[b]:
                    continue
                if t in stops:
                    done[b] = True
                    continue
                if decoders[b].push(t) and stop:
                    texts[b], done[b] = _cut(decoders[b].text, stop)
            if all(done):
                break
        for b, i in enumerate(idx):
            if not texts[b] or not done[b]:
                decoders[b].flush()
                texts[b] = _cut(decoders[b].text, stop)[0]
            out[i] = texts[b]
        if progress is not None:
            progress(len(idx))
    return out

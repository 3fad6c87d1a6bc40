"""Generation until stop ids or stop strings, every prompt a sequence of the model's engine."""
from __future__ import annotations

from typing import Callable, Sequence

from ..tokenizer import StreamDecoder


def _cut(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def generate_until(llm, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop: Sequence[str] = (),
                   batch_size: int = 8, do_sample: bool = False, temperature: float | None = None,
                   top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                   stop_ids: Sequence[int] | None = None,
                   progress: Callable[[int], None] | None = None) -> list[str]:
    """Text generated after each prompt (ids), cut before the first stop string.

    Greedy unless `do_sample`; no repetition penalty. A row ends at a stop id (default: the
    checkpoint's `<_end>`/`<_user>`), a stop string or `max_new_tokens`. The engine batches the
    prompts continuously, `batch_size` of them submitted at a time; a prompt longer than the
    context loses its oldest tokens. Prompt i samples with seed `seed + i`.
    """
    tok = llm.tokenizer
    if tok is None:
        raise ValueError("generation needs a tokenizer: this checkpoint folder has none")
    context = int(llm.config.seq_length)
    if max_new_tokens >= context:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the "
                         f"model's context of {context} tokens")
    keep = context - max_new_tokens
    rows = [list(p)[-keep:] for p in prompts]
    if any(not r for r in rows):
        raise ValueError("an empty prompt cannot be generated from")
    out = [""] * len(rows)
    group = max(batch_size, 1) * 4  # enough in flight for continuous batching, bounded memory
    for start in range(0, len(rows), group):
        idx = list(range(start, min(start + group, len(rows))))
        params = [llm.sampling_params(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                      top_p=top_p, top_k=top_k, repetition_penalty=1.0,
                                      seed=None if seed is None else seed + i,
                                      eos_token_id=list(stop_ids) if stop_ids is not None else None) for i in idx]
        decoders = [StreamDecoder(tok) for _ in idx]
        texts: list[str | None] = [None] * len(idx)
        seqs: list = []
        for step in llm.engine.iter_tokens([rows[i] for i in idx], params, sequences=seqs):
            for b, t in enumerate(step):
                if t is None or texts[b] is not None:
                    continue
                if t in params[b].stop_ids:
                    continue
                if decoders[b].push(t) and stop:
                    text, hit = _cut(decoders[b].text, stop)
                    if hit:
                        texts[b] = text
                        seqs[b].cancel("stop")
        for b, i in enumerate(idx):
            if texts[b] is None:
                decoders[b].flush()
                texts[b] = _cut(decoders[b].text, stop)[0]
            out[i] = texts[b]
        if progress is not None:
            progress(len(idx))
    return out

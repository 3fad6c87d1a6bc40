"""Log-likelihood of continuations, batched, with shared prompt prefixes computed once.

A request is (context ids, continuation ids); its score is the sum of log p(continuation token |
everything before it) and whether greedy decoding would have produced the continuation.

How the work is shared:
1. A request needs the logits after `context + continuation[:-1]`; requests whose needed tokens are
   a prefix of another's ride on that one's row (four one-letter answers after one question are one row).
2. Rows sorted by their tokens put rows with a common beginning next to each other; a run of rows
   whose neighbours share at least `min_shared` tokens forms a group, and the group's common prefix
   (e.g. the few-shot examples of an MMLU subject) is run once through the model into KV-cache row 0,
   copied to the other cache rows, and every row then only runs its own remainder.
3. The prefix stays in the cache across groups: the next group runs only what it does not share
   with the previous one.

TeleChat's NTK RoPE depends on the total sequence length, so a row is only grouped with rows of
the same (base, mscale) and uses the tables a plain forward of its own request would use: the
result equals `log_softmax(model(context + continuation))` up to float rounding.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..kv import DenseKV
from ..model import TeleChat
from ..rope import rope_cos_sin


@dataclass
class _Row:
    tokens: list[int]
    scaling: tuple[float, float]
    total: int  # total length whose RoPE tables this row uses
    requests: list[int] = field(default_factory=list)
    first_needed: int = 0  # first position whose logits some request reads


def _lcp(a: Sequence[int], b: Sequence[int], limit: int | None = None) -> int:
    n = min(len(a), len(b)) if limit is None else min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class LoglikEngine:
    """Scores (context, continuation) token requests on a TeleChat model.

    batch_size: rows per forward pass. share_prefix: compute common prefixes once (off: every row
    runs in full, the baseline). max_length: longest sequence the model sees (default: the model's
    context); longer requests lose context tokens from the left. min_shared: shortest common
    prefix worth computing once.
    """

    def __init__(self, model: TeleChat, batch_size: int = 8, share_prefix: bool = True,
                 max_length: int | None = None, min_shared: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.config = model.config
        self.batch_size = batch_size
        self.share_prefix = share_prefix
        self.max_length = int(max_length or self.config.seq_length)
        self.min_shared = max(1, min_shared)
        self.stats = {"rows": 0, "requests": 0, "tokens_computed": 0, "tokens_requested": 0, "prefix_tokens": 0}
        self._prefix: list[int] = []  # tokens whose K/V sit in cache row 0 (and rows 1.. after a copy)
        self._prefix_scaling: tuple[float, float] | None = None
        self._rows_filled = 0  # cache rows that hold the prefix
        self._cache: DenseKV | None = None  # this scorer's own keys/values

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    # ---- public --------------------------------------------------------------------------------
    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                      progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
        """[(sum log p(continuation | context), is_greedy)] in the order of `requests`.

        progress(n) is called with the number of requests finished after each batch.
        """
        reqs = []
        for i, (ctx, cont) in enumerate(requests):
            ctx, cont = [int(t) for t in ctx], [int(t) for t in cont]
            if not cont:
                raise ValueError(f"request {i}: the continuation is empty")
            if not ctx:
                raise ValueError(f"request {i}: the context is empty (start it with a BOS/EOS token)")
            need = ctx + cont[:-1]
            first = len(ctx) - 1
            if len(need) > self.max_length:  # keep the newest tokens, as lm-eval does
                cut = len(need) - self.max_length
                if cut > first:
                    raise ValueError(f"request {i}: continuation of {len(cont)} tokens does not fit in "
                                     f"max_length {self.max_length}")
                need, first = need[cut:], first - cut
            reqs.append((need, first, cont))
        self.stats["requests"] += len(reqs)
        rows = self._rows(reqs)
        results: list[tuple[float, bool] | None] = [None] * len(reqs)
        for group, prefix_len in self._groups(rows):
            for b in range(0, len(group), self.batch_size):
                batch = group[b:b + self.batch_size]
                self._run_batch(batch, prefix_len, reqs, results)
                if progress is not None:
                    progress(sum(len(r.requests) for r in batch))
        return results  # type: ignore[return-value]

    # ---- planning ------------------------------------------------------------------------------
    def _rows(self, reqs):
        """Merge requests whose needed tokens are a prefix of another's (same RoPE scaling) into rows."""
        keyed = []
        for i, (need, first, cont) in enumerate(reqs):
            total = len(need) + 1
            keyed.append((self.config.rope_scaling(total), need, i))
        keyed.sort(key=lambda k: (k[0], k[1]))
        rows: list[_Row] = []
        for scaling, need, i in reversed(keyed):
            cur = rows[-1] if rows else None
            if cur is not None and cur.scaling == scaling and len(need) <= len(cur.tokens) \
                    and cur.tokens[:len(need)] == need:
                cur.requests.append(i)
                cur.first_needed = min(cur.first_needed, reqs[i][1])
            else:
                rows.append(_Row(need, scaling, len(need) + 1, [i], reqs[i][1]))
        rows.reverse()
        return rows

    def _groups(self, rows: list[_Row]):
        """Yield (rows, shared prefix length): runs of sorted rows whose neighbours share >= min_shared
        tokens (same scaling) share their common prefix; the rest run in full. Rows in a group
        are ordered longest first, so a batch pads little."""
        if not self.share_prefix:
            yield sorted(rows, key=lambda r: -len(r.tokens)), 0
            return
        loose: list[_Row] = []
        i = 0
        while i < len(rows):
            j, common = i + 1, rows[i].first_needed  # every row keeps at least its first needed position
            while j < len(rows) and rows[j].scaling == rows[i].scaling:
                n = _lcp(rows[j - 1].tokens, rows[j].tokens, min(common, rows[j].first_needed))
                if n < self.min_shared:
                    break
                common = min(common, n)
                j += 1
            if j - i > 1:
                if loose:
                    yield sorted(loose, key=lambda r: -len(r.tokens)), 0
                    loose = []
                yield sorted(rows[i:j], key=lambda r: -len(r.tokens)), common
            else:
                loose.append(rows[i])
            i = j
        if loose:
            yield sorted(loose, key=lambda r: -len(r.tokens)), 0

    # ---- execution -----------------------------------------------------------------------------
    def _ensure_cache(self, rows: int, length: int) -> None:
        length = -(-max(length, 1) // 256) * 256
        if self._cache is None or self._cache.shape[0] < rows:
            self._cache = DenseKV(self.config, max(rows, self.batch_size), length, self.model.dtype, self.device)
            self._prefix, self._prefix_scaling, self._rows_filled = [], None, 0
        elif self._cache.shape[1] < length:
            self._cache = self._cache.resized(length)  # keeps the cached prefix

    def _prefill(self, tokens: list[int], scaling_total: int, n_rows: int) -> None:
        """Make cache rows 0..n_rows-1 hold the K/V of `tokens`, computing only what row 0 lacks."""
        scaling = self.config.rope_scaling(scaling_total)
        keep = _lcp(self._prefix, tokens) if self._prefix_scaling == scaling else 0
        P = len(tokens)
        if keep < P:
            pos = torch.arange(keep, P, device=self.device)
            rope = rope_cos_sin(self.config, pos, scaling_total)
            ids = torch.tensor([tokens[keep:]], device=self.device)
            self.model.transformer(ids, cache=self._cache.at(pos, P, rows=slice(0, 1)), rope=rope,
                                   select=torch.tensor([P - keep - 1], device=self.device))
            self.stats["tokens_computed"] += P - keep
            self.stats["prefix_tokens"] += P - keep
        if keep < P or len(self._prefix) != P:
            self._rows_filled = 1
        self._prefix, self._prefix_scaling = list(tokens), scaling
        if n_rows > self._rows_filled:  # the other rows get row 0's prefix
            self._cache.copy_rows(0, slice(self._rows_filled, n_rows), P)
            self._rows_filled = n_rows

    def _run_batch(self, batch: list[_Row], P: int, reqs, results) -> None:
        longest = max(len(r.tokens) for r in batch)
        self._ensure_cache(len(batch), longest)
        if P > 0:
            self._prefill(batch[0].tokens[:P], batch[0].total, len(batch))
        else:
            self._prefix, self._prefix_scaling, self._rows_filled = [], None, 0  # rows are overwritten from 0
        n, R = len(batch), longest - P
        ids = torch.zeros(n, R, dtype=torch.long)
        for b, r in enumerate(batch):
            ids[b, : len(r.tokens) - P] = torch.tensor(r.tokens[P:])
        pos = (P + torch.arange(R)[None].expand(n, R)).to(self.device)
        # Each row's own RoPE tables: those of a plain forward over its request (rows of a group share them).
        cos, sin = rope_cos_sin(self.config, pos, [r.total for r in batch])
        # Positions >= P of each used row are rewritten here; the prefix below P stays intact.
        hidden = self.model.transformer(ids.to(self.device), cache=self._cache.at(pos, P + R), rope=(cos, sin))
        self.stats["rows"] += n
        self.stats["tokens_computed"] += sum(len(r.tokens) - P for r in batch)
        # The logits each request reads, computed once per distinct (row, position).
        where: dict[tuple[int, int], int] = {}
        spans = []
        for b, r in enumerate(batch):
            for i in r.requests:
                _, first, cont = reqs[i]
                idx = [where.setdefault((b, first - P + k), len(where)) for k in range(len(cont))]
                spans.append((i, idx, cont))
        keys = list(where)
        rows_idx = torch.tensor([k[0] for k in keys], device=self.device)
        pos_idx = torch.tensor([k[1] for k in keys], device=self.device)
        logp_parts, argmax_parts = [], []
        for s in range(0, len(keys), 512):  # [positions, vocab] at a time, bounded
            logits = self.model.lm_head(hidden[rows_idx[s:s + 512], pos_idx[s:s + 512]]).float()
            logp_parts.append(F.log_softmax(logits, dim=-1))
            argmax_parts.append(logits.argmax(-1))
        logp, argmax = torch.cat(logp_parts), torch.cat(argmax_parts)
        for i, idx, cont in spans:
            ix = torch.tensor(idx, device=self.device)
            target = torch.tensor(cont, device=self.device)
            score = float(logp[ix, target].double().sum())
            results[i] = (score, bool((argmax[ix] == target).all()))
            self.stats["tokens_requested"] += len(reqs[i][0]) + 1


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int, stride: int
                    ) -> list[tuple[list[int], list[int]]]:
    """Sliding-window requests scoring every token of `tokens` once.

    The sequence [prefix_token] + tokens is cut into windows of at most `max_length` tokens,
    starting every `stride` tokens; each window scores the tokens the previous ones did not,
    with the rest of the window as context. stride == max_length gives disjoint windows.
    """
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in 1..max_length ({max_length}), got {stride}")
    seq = [int(prefix_token)] + [int(t) for t in tokens]
    out = []
    scored_to = 1  # seq[1:] are the tokens to score
    begin = 0
    while scored_to < len(seq):
        end = min(begin + max_length, len(seq))
        if end > scored_to:
            out.append((seq[begin:scored_to], seq[scored_to:end]))
            scored_to = end
        begin += stride
        if begin >= scored_to:  # a stride past the scored part: keep one token of context
            begin = scored_to - 1
    return out

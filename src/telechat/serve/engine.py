"""Continuous batching: one thread owns the model; requests join and leave the batch at every step.

Each running sequence has a row ("slot") of one shared KV cache. A step first prefills newly
admitted sequences into free slots (one at a time, within a token budget, so running rows are not
starved), then decodes one token for every running row in a single batched forward with per-row
positions, each row with its own sampling settings and stop conditions.
"""
from __future__ import annotations

import asyncio
import itertools
import math
import os
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..generate import SamplingParams, next_token, process_logits
from ..model import TeleChat
from ..rope import rope_cos_sin


_MODEL_LOCKS: "weakref.WeakKeyDictionary[TeleChat, threading.Lock]" = weakref.WeakKeyDictionary()


def _model_lock(model: TeleChat) -> threading.Lock:
    return _MODEL_LOCKS.setdefault(model, threading.Lock())


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is full; `retry_after` is a hint in seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"server busy: all slots and the queue are full, retry in {retry_after}s")
        self.retry_after = retry_after


@dataclass(eq=False)
class Sequence:
    """One generation request: prompt ids in, token ids out through `on_event(kind, value)`.

    Events (called on the engine thread): ("token", id) for each generated token that is not a
    stop id, then exactly one ("done", finish_reason) with "stop", "length" or "cancelled", or
    ("error", message).
    """
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[str, object], None]
    max_len: int  # prompt + generated never exceed this (the context)
    id: int = field(default_factory=itertools.count().__next__)
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False
    slot: int | None = None
    generator: torch.Generator | None = None
    arrival: float = field(default_factory=time.perf_counter)
    admitted: float = 0.0
    first_token_at: float | None = None

    cancel_reason: str = "cancelled"

    def cancel(self, reason: str = "cancelled") -> None:
        """Free the slot at the next step (safe from any thread); `reason` "stop" when the caller
        ended it on a stop string."""
        if not self.cancelled:  # the first reason given wins
            self.cancel_reason = reason
            self.cancelled = True

    @property
    def pos(self) -> int:
        """Position of the newest token (the one the next decode step feeds in)."""
        return len(self.prompt) + len(self.tokens) - 1


class Stats:
    """Counters the server turns into /metrics (read without locks: approximate by design)."""

    def __init__(self, window: float = 10.0):
        self.requests_finished = {"stop": 0, "length": 0, "cancelled": 0, "error": 0}
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0  # of those, keys reused from a cached prefix
        self.generated_tokens = 0
        self.steps = 0
        self.ttft: deque[float] = deque(maxlen=4096)  # seconds, newest last
        self.on_ttft: Callable[[float], None] | None = None
        self.on_finish: Callable[[str, float], None] | None = None
        self._window = window
        self._recent: deque[tuple[float, int]] = deque()

    def tokens_per_second(self) -> float:
        since = time.perf_counter() - self._window
        return sum(n for t, n in list(self._recent) if t >= since) / self._window  # a snapshot: the engine appends

    def _generated(self, n: int) -> None:
        self.generated_tokens += n
        now = time.perf_counter()
        self._recent.append((now, n))
        while self._recent[0][0] < now - self._window:
            self._recent.popleft()


class Engine:
    """Continuous-batching generation over `max_concurrency` KV-cache slots and a bounded queue.

    `submit` is thread-safe and returns at once (or raises QueueFull); `stream` is the asyncio
    face. The cache grows on demand up to `max_model_len` positions per slot.
    """

    def __init__(self, model: TeleChat, max_concurrency: int = 8, max_queue: int = 64,
                 max_model_len: int | None = None, prefill_budget: int = 512, prefix_caching: bool = True):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if prefill_budget < 1:
            raise ValueError(f"prefill_budget must be >= 1, got {prefill_budget}")
        self.model = model
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.max_model_len = int(max_model_len or model.config.seq_length)
        self.prefill_budget = prefill_budget
        self.prefix_caching = prefix_caching
        self.device = model.lm_head.weight.device
        self.slots: list[Sequence | None] = [None] * max_concurrency
        self.waiting: deque[Sequence] = deque()
        self.stats = Stats()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._caches: list | None = None  # the KV cache this engine owns (installed into the model per step)
        self._slot_tokens: list[list[int]] = [[] for _ in range(max_concurrency)]  # ids whose keys each row holds
        self._cache_len = 0
        self._seq_time = 5.0  # moving average of a sequence's time in a slot, for Retry-After

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="telechat-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        for seq in [*self.waiting, *(s for s in self.slots if s)]:
            self._finish(seq, "cancelled")
        self.waiting.clear()
        with _model_lock(self.model):  # give the cache memory back
            if self._caches is not None and self.model.transformer.h[0].self_attention.cache is self._caches[0]:
                self.model.clear_cache()
            self._caches, self._cache_len = None, 0
            self._slot_tokens = [[] for _ in range(self.max_concurrency)]

    @property
    def running(self) -> int:
        return sum(s is not None for s in self.slots)

    @property
    def cache_shape(self) -> tuple[int, int] | None:
        """(rows, positions) of this engine's KV cache, or None before the first request."""
        return None if self._caches is None else (self.max_concurrency, self._cache_len)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- submission --------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> Sequence:
        if not seq.prompt:
            raise ValueError("empty prompt: at least one token is needed")
        if seq.params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {seq.params.max_new_tokens}")
        if len(seq.prompt) >= min(seq.max_len, self.max_model_len):
            raise ValueError(f"prompt of {len(seq.prompt)} tokens leaves no room in a context of "
                             f"{min(seq.max_len, self.max_model_len)}")
        if seq.params.do_sample and seq.params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(int(seq.params.seed))
        with self._cond:
            if self._stop:
                raise RuntimeError("the engine is stopped")
            waiting = sum(not w.cancelled for w in self.waiting)
            if self.running + waiting >= self.max_concurrency + self.max_queue:
                raise QueueFull(self.retry_after())
            self.waiting.append(seq)
            self._cond.notify_all()
        return seq

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead, at the recent time per sequence, over the slots."""
        est = (len(self.waiting) + 1) * self._seq_time / self.max_concurrency
        return max(1, min(60, math.ceil(est)))

    def open(self, prompt: list[int], params: SamplingParams, max_len: int | None = None) -> "Stream":
        """Submit now (QueueFull / ValueError raised here) and return the async stream of its events.

        Call from the event loop that will consume it.
        """
        return Stream(self, prompt, params, max_len or self.max_model_len)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ---- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self.waiting and self.running == 0:
                    self._cond.wait()
                if self._stop:
                    return
            try:
                self._drop_cancelled()
                with _model_lock(self.model):  # engines sharing a model (tests, several apps) take turns
                    self._install_cache()
                    try:
                        self._admit()
                        if self.running:
                            self._decode()
                    finally:  # out of the model between steps: other callers (generate, chat) get their own
                        self.model.clear_cache()
            except Exception as e:  # never a dead engine: fail what was running, keep serving
                msg = f"{type(e).__name__}: {e}"
                self._slot_tokens = [[] for _ in range(self.max_concurrency)]
                for seq in self.slots:
                    if seq is not None:
                        self._finish(seq, "error", msg)
                if isinstance(e, torch.OutOfMemoryError) or "memory" in str(e).lower():
                    self._caches, self._cache_len = None, 0
                    with _model_lock(self.model):
                        self.model.clear_cache()

    def _drop_cancelled(self) -> None:
        with self._cond:
            for seq in [s for s in self.waiting if s.cancelled]:
                self.waiting.remove(seq)
                self._finish(seq, seq.cancel_reason)
        for seq in self.slots:
            if seq is not None and seq.cancelled:
                self._finish(seq, seq.cancel_reason)

    def _finish(self, seq: Sequence, reason: str, message: str | None = None) -> None:
        if seq.finished:
            return
        seq.finished = True
        if seq.slot is not None:
            self.slots[seq.slot] = None
            seq.slot = None
            self._seq_time = 0.8 * self._seq_time + 0.2 * (time.perf_counter() - seq.admitted)
        self.stats.requests_finished[reason if reason in self.stats.requests_finished else "error"] += 1
        if self.stats.on_finish is not None:
            self.stats.on_finish(reason, time.perf_counter() - seq.arrival)
        self._emit(seq, "error", message) if reason == "error" else self._emit(seq, "done", reason)

    def _emit(self, seq: Sequence, kind: str, value) -> None:
        """Deliver an event; a listener that raises loses its sequence, never the engine."""
        try:
            seq.on_event(kind, value)
        except Exception:
            if not seq.finished:
                seq.cancel()

    def _install_cache(self) -> None:
        """Put this engine's KV cache (if any) into the model's attention modules."""
        if self._caches is not None:
            for block, cache in zip(self.model.transformer.h, self._caches):
                block.self_attention.cache = cache

    def _ensure_cache(self, length: int) -> None:
        if self._cache_len >= length:
            return
        new_len = min(self.max_model_len, max(256, -(-max(length, 2 * self._cache_len) // 256) * 256))
        if self._caches is None:
            self.model.setup_cache(self.max_concurrency, new_len)
        else:
            self.model.resize_cache(new_len)
        self._caches = [block.self_attention.cache for block in self.model.transformer.h]
        self._cache_len = new_len

    @torch.inference_mode()
    def _admit(self) -> None:
        budget = self.prefill_budget
        while budget > 0:
            with self._cond:
                free = next((i for i, s in enumerate(self.slots) if s is None), None)
                if free is None or not self.waiting:
                    return
                seq = self.waiting.popleft()
                if seq.cancelled:  # gone before it started
                    self._finish(seq, seq.cancel_reason)
                    continue
                seq.slot, self.slots[free] = free, seq
                seq.admitted = time.perf_counter()
            try:
                self._ensure_cache(len(seq.prompt) + 1)
                start = self._reuse_prefix(free, seq.prompt)
                budget -= len(seq.prompt) - start
                ids = torch.tensor([seq.prompt[start:]], device=self.device)
                with self.model.cache_rows(free, free + 1):
                    logits = self.model(ids, input_pos=torch.arange(start, len(seq.prompt), device=self.device),
                                        last_only=True)[:, -1].float()
            except Exception as e:  # this prompt failed (e.g. out of memory): only its sequence ends
                self._slot_tokens[free] = []
                self._finish(seq, "error", f"{type(e).__name__}: {e}")
                continue
            self._slot_tokens[free] = list(seq.prompt)
            self.stats.prompt_tokens += len(seq.prompt)
            self.stats.cached_prompt_tokens += start
            self._sample([seq], logits)

    def _reuse_prefix(self, slot: int, prompt: list[int]) -> int:
        """Prefix caching: copy the longest prefix of `prompt` that some slot still holds into `slot`
        and return its length (the rest is prefilled). Keys are only reused while the NTK scaling
        is the same for both sequences (within training_seqlen), so the result is unchanged."""
        limit = self.model.config.training_seqlen
        if not self.prefix_caching or len(prompt) > limit:
            return 0
        best, src = 0, slot
        for i, held in enumerate(self._slot_tokens):
            if len(held) <= limit:
                n = len(os.path.commonprefix([held, prompt]))
                if n > best or (n == best and i == slot):
                    best, src = n, i
        best = min(best, len(prompt) - 1)  # the last prompt token is always run: its logits are needed
        if best > 0 and src != slot:
            for cache in self._caches:
                cache.k[slot, :, :best] = cache.k[src, :, :best]
                cache.v[slot, :, :best] = cache.v[src, :, :best]
        self._slot_tokens[slot] = list(prompt[:best])
        return best

    @torch.inference_mode()
    def _decode(self) -> None:
        rows = [s for s in self.slots if s is not None]
        n = max(s.slot for s in rows) + 1  # free slots below n ride along (their rows are ignored)
        self._ensure_cache(max(s.pos for s in rows) + 1)
        tokens, pos = [0] * n, [0] * n
        for i in range(n):
            if self.slots[i] is None:
                self._slot_tokens[i] = []  # a free row riding along overwrites position 0 of what it held
        for s in rows:
            tokens[s.slot], pos[s.slot] = s.tokens[-1], s.pos
            self._slot_tokens[s.slot].append(s.tokens[-1])
        ids = torch.tensor(tokens, device=self.device)[:, None]
        if n == 1:  # one sequence: shared positions, no mask (the plain single-sequence path)
            pos_t = torch.tensor(pos, device=self.device)
            with self.model.cache_rows(0, 1):
                logits = self.model(ids, input_pos=pos_t, last_only=True)[:, -1].float()
        else:  # per-row positions write cache rows 0..n-1 and mask each row to its own length
            pos_t = torch.tensor(pos, device=self.device)[:, None]
            rope = rope_cos_sin(self.model.config, pos_t, [p + 1 for p in pos])
            logits = self.model(ids, input_pos=pos_t, last_only=True, kv_len=max(pos) + 1, rope=rope)[:, -1].float()
        self.stats.steps += 1
        self._sample(rows, logits[[s.slot for s in rows]])

    def _sample(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        """Pick each row's next token (plain greedy rows in one argmax), emit it, retire finished rows."""
        plain = [i for i, s in enumerate(rows) if not s.params.do_sample and s.params.repetition_penalty == 1.0]
        picked: dict[int, int] = {}
        if plain:
            picked.update(zip(plain, logits[plain].argmax(-1).tolist()))
        failed: dict[int, str] = {}
        for i, s in enumerate(rows):
            if i not in picked:
                try:  # a row's own settings can fail (e.g. a temperature that overflows): only that row ends
                    history = torch.tensor([s.prompt + s.tokens], device=self.device)
                    picked[i] = int(next_token(process_logits(logits[i:i + 1], history, s.params), s.params,
                                               s.generator)[0])
                except Exception as e:  # noqa: BLE001 (any error here is this row's alone)
                    failed[i] = f"sampling failed: {type(e).__name__}: {e}"
        now = time.perf_counter()
        self.stats._generated(len(rows))
        for i, s in enumerate(rows):
            if i in failed:
                self._finish(s, "error", failed[i])
                continue
            tok = picked[i]
            s.tokens.append(tok)
            if s.first_token_at is None:
                s.first_token_at = now
                self.stats.ttft.append(now - s.arrival)
                if self.stats.on_ttft is not None:
                    self.stats.on_ttft(now - s.arrival)
            if s.cancelled:
                self._finish(s, s.cancel_reason)
            elif tok in s.params.stop_ids:
                self._finish(s, "stop")
            else:
                self._emit(s, "token", tok)
                if len(s.tokens) >= s.params.max_new_tokens or len(s.prompt) + len(s.tokens) >= \
                        min(s.max_len, self.max_model_len):
                    self._finish(s, "length")


class Stream:
    """Async iterator over one sequence's events: ("token", id) ... then ("done", reason) or
    ("error", message). `cancel()` (or leaving early and calling it) frees the slot at the next step."""

    def __init__(self, engine: Engine, prompt: list[int], params: SamplingParams, max_len: int):
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._engine = engine
        self._ended = False

        def on_event(kind, value):
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, (kind, value))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        self.seq = engine.submit(Sequence(prompt, params, on_event, max_len))

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[str, object]:
        if self._ended:
            raise StopAsyncIteration
        kind, value = await self._queue.get()
        self._ended = kind != "token"
        return kind, value

    def cancel(self, reason: str = "cancelled") -> None:
        if not self.seq.finished:
            self.seq.cancel(reason)
            self._engine._wake()

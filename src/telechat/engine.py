"""The inference engine: the one owner of KV memory and scheduling.

`LLM.generate`, `LLM.chat`, `telechat chat`, `telechat serve` and generation in `telechat eval`
all submit `Sequence`s here. One thread runs steps; each step is one forward over a flat batch:
every running sequence that needs one token (decoding) plus chunks of prompts being prefilled,
under a per-step token budget, so a long prompt delays running streams by about one chunk.

KV memory is a pool of fixed-size blocks (telechat.kv.PagedKV) that grows with the tokens in use.
Full prompt blocks are kept by content hash (with the prompt's RoPE scaling) and shared by later
prompts that start the same way (exact prefix caching). Sampling is vectorised: per-row settings
are tensors and one device-to-host copy per step brings every row's next token.

A sequence's state is (tokens, computed): the step computes tokens[computed:computed + n] and,
when that reaches the end, samples the next token. Decoding, chunked prefill, prefix hits and
recomputation after preemption are all that one rule.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import math
import os
import queue
import threading
import time
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .device import release_heap
from .generate import RowSettings, SamplingParams, process_rows, sample_rows
from .kv import PagedKV, PagedStep, prefill_chunk
from .rope import rope_cos_sin

# Past this many positions, a CPU prefill step hands freed heap memory back (device.release_heap).
LONG_PREFILL = 4096

IDLE_EXIT_SECONDS = 5.0  # the engine thread ends when idle this long (and restarts on the next submit)

_live: "weakref.WeakSet[Engine]" = weakref.WeakSet()
_atexit_registered = False


def _stop_all() -> None:
    # An engine thread still inside torch when the interpreter finalizes aborts the process.
    for engine in list(_live):
        engine.stop()


class QueueFull(Exception):
    """Every running place is busy and the waiting queue is full; `retry_after` is a hint in seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"server busy: all slots and the queue are full, retry in {retry_after}s")
        self.retry_after = retry_after


@dataclass(eq=False)
class Sequence:
    """One generation request: prompt ids in, token ids out through `on_event(kind, value)`.

    Events (called on the engine thread): ("token", id) for each generated token that is not a
    stop id, then exactly one ("done", finish_reason) with "stop", "length" or "cancelled", or
    ("error", message). `max_len` caps prompt + generated (default: the engine's max_model_len).
    """
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[str, object], None]
    max_len: int | None = None
    id: int = field(default_factory=itertools.count().__next__)
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False
    arrival: float = field(default_factory=time.perf_counter)
    admitted: float = 0.0
    first_token_at: float | None = None
    cancel_reason: str = "cancelled"
    # engine state
    computed: int = 0  # tokens whose keys/values are in the cache
    blocks: list[int] = field(default_factory=list)
    seed: int = 0
    seen: Tensor | None = None  # [V] bool, for the repetition penalty
    hashes: list[bytes | None] = field(default_factory=list)  # prefix-cache keys of its full blocks
    registered: int = 0  # of those, entered in the prefix cache

    def cancel(self, reason: str = "cancelled") -> None:
        """Free the sequence's memory at the next step (safe from any thread); `reason` "stop" when
        the caller ended it on a stop string."""
        if not self.cancelled:  # the first reason given wins
            self.cancel_reason = reason
            self.cancelled = True

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.tokens)

    def token_at(self, i: int) -> int:
        return self.prompt[i] if i < len(self.prompt) else self.tokens[i - len(self.prompt)]


class Stats:
    """Counters the server turns into /metrics (read without locks: approximate by design)."""

    def __init__(self, window: float = 10.0):
        self.requests_finished = {"stop": 0, "length": 0, "cancelled": 0, "error": 0}
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0  # of those, keys reused from a cached prefix
        self.generated_tokens = 0
        self.steps = 0
        self.preempted = 0
        self.ttft: deque[float] = deque(maxlen=4096)  # seconds, newest last
        self.on_ttft: Callable[[float], None] | None = None
        self.on_finish: Callable[[str, float], None] | None = None
        self._window = window
        self._recent: deque[tuple[float, int]] = deque()

    def tokens_per_second(self) -> float:
        since = time.perf_counter() - self._window
        return sum(n for t, n in list(self._recent) if t >= since) / self._window  # a snapshot: the engine appends

    def add_generated(self, n: int) -> None:
        self.generated_tokens += n
        now = time.perf_counter()
        self._recent.append((now, n))
        while self._recent[0][0] < now - self._window:
            self._recent.popleft()


class BlockTable:
    """Block ids of a PagedKV: reference counts, free list, and the exact prefix cache (full
    prompt blocks by content key; unreferenced ones stay cached until their memory is needed)."""

    def __init__(self, kv: PagedKV):
        self.kv = kv
        self.next = 1  # block 0 is scratch
        self.free: list[int] = []
        self.ref: dict[int, int] = {}
        self.by_key: dict[bytes, int] = {}
        self.key_of: dict[int, bytes] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()

    @property
    def available(self) -> int:
        return len(self.free) + len(self.evictable) + self.kv.max_blocks - self.next

    @property
    def used(self) -> int:
        return len(self.ref)

    def alloc(self) -> int | None:
        if self.free:
            b = self.free.pop()
        elif self.next < self.kv.max_blocks:
            b, self.next = self.next, self.next + 1
            self.kv.ensure(self.next)
        elif self.evictable:
            b, _ = self.evictable.popitem(last=False)
            del self.by_key[self.key_of.pop(b)]
        else:
            return None
        self.ref[b] = 1
        return b

    def release(self, b: int) -> None:
        n = self.ref[b] - 1
        if n:
            self.ref[b] = n
            return
        del self.ref[b]
        if b in self.key_of:
            self.evictable[b] = None
        else:
            self.free.append(b)

    def lookup(self, key: bytes) -> int | None:
        b = self.by_key.get(key)
        if b is not None:
            if b in self.evictable:
                del self.evictable[b]
            self.ref[b] = self.ref.get(b, 0) + 1
        return b

    def register(self, key: bytes, b: int) -> None:
        if key not in self.by_key and b not in self.key_of:
            self.by_key[key], self.key_of[b] = b, key


def default_compile(model, device: torch.device) -> bool:
    """Compile the decode step where it pays: on accelerators, and on CPU for models big enough that
    decoding streams weights (tiny models spend longer compiling than decoding). Quantized layers
    count by their weights; on CPU they must run telechat's operator (other paths break the graph)."""
    if os.environ.get("TELECHAT_COMPILE") in ("0", "1"):
        return os.environ["TELECHAT_COMPILE"] == "1"
    from .quant import quantized_layers

    layers = quantized_layers(model)
    if device.type != "cpu":
        return not layers  # quantized CUDA steps have not been measured compiled
    if any(layer.path != "native" for layer in layers):
        return False
    weights = sum(p.numel() for p in model.parameters()) + sum(m.in_features * m.out_features for m in layers)
    return weights >= 50_000_000


def choose_decoder(model, device: torch.device, compile: bool | str = "auto") -> str:
    """How decode steps run: "native" (the blocks as one C++ operator, telechat.native; CPU, where the
    model's layers allow), "compiled" (torch.compile) or "eager". compile=True asks for torch.compile,
    False for plain eager torch; "auto" takes native where it runs, else compiles where that pays.
    TELECHAT_DECODER=native|compiled|eager overrides "auto"."""
    if compile not in (True, False, "auto") or not isinstance(compile, (bool, str)):
        raise ValueError(f"compile must be True (torch.compile), False (eager) or 'auto', got {compile!r}")
    want = os.environ.get("TELECHAT_DECODER", "") if compile == "auto" else ("compiled" if compile else "eager")
    if want not in ("", "auto", "native", "compiled", "eager"):
        import warnings

        warnings.warn(f"telechat: TELECHAT_DECODER={want!r} is not one of native, compiled, eager, auto; using auto",
                      stacklevel=2)
    if want in ("compiled", "eager"):
        return want
    if device.type == "cpu":
        from .native import unsupported

        if unsupported(model) is None:
            return "native"
    return "compiled" if default_compile(model, device) else "eager"


def _memory_budget_bytes(device: torch.device) -> int:
    """What the KV pool may grow to by default: 40% of available RAM, or 60% of free GPU memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.6)
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return int(info.get("MemAvailable", 8 << 30) * 0.4)
    except OSError:
        return 4 << 30


# Steps of at most this many tokens (decode rows and prompt chunks) run wholly in the native step; a
# longer prefill goes through the model, whose large matrix products are more efficient per token.
NATIVE_MAX_ROWS = 48
# The fewest prompt tokens a step carries beside running streams: late chunks of a long prompt attend
# over all of it, and even a few such rows can cost more than the decode rows they delay.
MIN_CHUNK = 2


def _bucket(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _decode_forward(model, ids: Tensor, cos: Tensor, sin: Tensor, step: PagedStep) -> Tensor:
    return model(ids, cache=step, rope=(cos, sin))[0].float()


class Engine:
    """Continuous batching with chunked prefill over a paged KV pool.

    `submit` is thread-safe and returns at once (or raises QueueFull); `stream` is the asyncio face
    and `iter_tokens` the synchronous one. The engine thread starts on demand.

    max_concurrency: sequences running at once. max_queue: waiting requests beyond those.
    max_model_len: cap on prompt + generated tokens (default: the model's context, for sequences
    that give no max_len of their own; set explicitly, it caps every sequence). prefill_budget: prompt tokens per
    step (None: adaptive, so that a step with prefill costs about two decode steps while streams
    are decoding). kv_cache_tokens: the most positions the pool may hold (default:
    max_concurrency x max_model_len, within 40% of free memory). compile: "auto", True or False.
    """

    def __init__(self, model, max_concurrency: int = 8, max_queue: int = 64, max_model_len: int | None = None,
                 prefill_budget: int | None = None, prefix_caching: bool = True, kv_cache_tokens: int | None = None,
                 block_size: int = 16, compile: bool | str = "auto", autostart: bool = True):
        self.model = model
        self.autostart = autostart  # the thread starts at the first submit (else at start())
        self.device = model.lm_head.weight.device
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.stats = Stats()
        self.waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stopped = False
        self._claimed = False
        self._pledged = 0
        self._kv: PagedKV | None = None
        self._blocks: BlockTable | None = None
        self._seq_time = 5.0  # moving average of a sequence's running time, for Retry-After
        self._decode_time: float | None = None  # moving average, for the adaptive prefill budget
        self._prefill_costs: deque[tuple[int, float]] = deque(maxlen=32)  # (prompt tokens, seconds) of steps
        self._compiled = None
        self._admissions = self._native_seen = 0
        self.configure(max_concurrency=max_concurrency, max_queue=max_queue, max_model_len=max_model_len,
                       prefill_budget=prefill_budget, kv_cache_tokens=kv_cache_tokens, compile=compile)

    def configure(self, *, max_concurrency: int | None = None, max_queue: int | None = None,
                  max_model_len: int | None = None, prefill_budget: int | None = None,
                  kv_cache_tokens: int | None = None, compile: bool | str | None = None) -> "Engine":
        """Change limits (None keeps a setting; max_model_len/prefill_budget None on first call: defaults)."""
        first = not hasattr(self, "max_concurrency")
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_queue is not None and max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if prefill_budget is not None and prefill_budget < 1:
            raise ValueError(f"prefill_budget must be >= 1, got {prefill_budget}")
        if max_concurrency is not None:
            self.max_concurrency = max_concurrency
        if max_queue is not None:
            self.max_queue = max_queue
        if max_model_len is not None or first:
            self.max_model_len = int(max_model_len or self.model.config.seq_length)
            self._len_cap = max_model_len  # set explicitly (a server's context): caps every sequence
        if prefill_budget is not None or first:
            self.prefill_budget = prefill_budget
        if kv_cache_tokens is not None or first or max_concurrency is not None or max_model_len is not None:
            want = kv_cache_tokens or getattr(self, "_kv_tokens_asked", None) or \
                self.max_concurrency * self.max_model_len
            self._kv_tokens_asked = kv_cache_tokens or getattr(self, "_kv_tokens_asked", None)
            if kv_cache_tokens is None:
                want = min(want, max(_memory_budget_bytes(self.device) // self._bytes_per_token(),
                                     4 * self.max_model_len))
            self.kv_cache_tokens = int(want)
            if self._kv is not None:
                self._kv.max_blocks = max(self._kv.max_blocks, self._max_blocks())
        if compile is not None:
            self.decoder = choose_decoder(self.model, self.device, compile)
            self.compile = self.decoder == "compiled"
            self._native = None
        return self

    def _bytes_per_token(self) -> int:
        c = self.model.config
        return 2 * c.n_layer * c.n_kv_head * c.head_dim * torch.finfo(self.model.dtype).bits // 8

    def _max_blocks(self) -> int:
        return -(-self.kv_cache_tokens // self.block_size) + 1

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "Engine":
        with self._cond:
            self._stopping = self._stopped = False
            self._start_locked()
        return self

    def _start_locked(self) -> None:
        global _atexit_registered
        if not _atexit_registered:
            import atexit

            atexit.register(_stop_all)
            _atexit_registered = True
        _live.add(self)
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="telechat-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Cancel everything (waiting and running) and end the thread; submit then refuses until start()."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=30)
        with self._cond:
            for seq in [*self.waiting, *self._running]:
                self._finish(seq, "cancelled")
            self.waiting.clear()
            self._thread = None
            self._stopping, self._stopped = False, True

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def alive(self) -> bool:
        """Accepting and running work (with autostart the thread itself starts on demand)."""
        if self._stopping or self._stopped:
            return False
        return self.autostart or (self._thread is not None and self._thread.is_alive())

    @property
    def stopped(self) -> bool:
        return self._stopped

    def claim(self) -> bool:
        """True for the first caller (a server taking this engine for its limits and lifetime)."""
        with self._cond:
            if self._claimed:
                return False
            self._claimed = True
            return True

    @property
    def kv(self) -> PagedKV | None:
        """The KV pool (None before the first step, or after an out-of-memory error dropped it)."""
        return self._kv

    def kv_usage(self) -> dict:
        """Blocks in use, cached (reusable prefixes), allocated and the cap, and the block size."""
        b = self._blocks
        return {"block_size": self.block_size, "used_blocks": b.used if b else 0,
                "cached_blocks": len(b.evictable) if b else 0,
                "allocated_blocks": self._kv.capacity if self._kv else 0, "max_blocks": self._max_blocks()}

    # ---- submission --------------------------------------------------------------------------
    def submit(self, seq: Sequence, bounded: bool = True) -> Sequence:
        """Queue `seq` (ValueError for bad input; QueueFull when `bounded` and the queue is full)."""
        limit = self._limit(seq)
        if not seq.prompt:
            raise ValueError("empty prompt: at least one token is needed")
        if seq.params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {seq.params.max_new_tokens}")
        if len(seq.prompt) >= limit:
            raise ValueError(f"prompt of {len(seq.prompt)} tokens leaves no room in a context of {limit}")
        V = self.model.config.vocab_size
        bad = next((t for t in seq.prompt if not 0 <= t < V), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{V - 1})")
        need = -(-min(limit, len(seq.prompt) + seq.params.max_new_tokens) // self.block_size)
        if need > self._max_blocks() - 1 and self._kv_tokens_asked is None:
            # A sequence longer than the default pool (past the model's context, e.g. with RoPE
            # scaling) grows it, within the memory the pool may take.
            fits = _memory_budget_bytes(self.device) // self._bytes_per_token()
            if need * self.block_size <= fits:
                self.kv_cache_tokens = max(self.kv_cache_tokens, need * self.block_size)  # the pool follows
        if need > self._max_blocks() - 1:
            raise ValueError(f"a sequence of up to {need * self.block_size} tokens needs more KV memory than this "
                             f"engine may use ({self.kv_cache_tokens} positions)")
        seq.seed = int(seq.params.seed) if seq.params.seed is not None else \
            int(torch.randint(0, 2**62, (), dtype=torch.long))
        with self._cond:
            if self._stopping or self._stopped:
                raise RuntimeError("the engine is stopped")
            waiting = sum(not w.cancelled for w in self.waiting)
            if bounded and self.running + waiting >= self.max_concurrency + self.max_queue:
                raise QueueFull(self.retry_after())
            self.waiting.append(seq)
            if self.autostart or self._thread is not None:
                self._start_locked()
            self._cond.notify_all()
        return seq

    def _limit(self, seq: Sequence) -> int:
        limit = int(seq.max_len) if seq.max_len is not None else self.max_model_len
        return min(limit, self._len_cap) if self._len_cap is not None else limit

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the queue ahead, at the recent time per sequence."""
        est = (len(self.waiting) + 1) * self._seq_time / self.max_concurrency
        return max(1, min(60, math.ceil(est)))

    def open(self, prompt: list[int], params: SamplingParams, max_len: int | None = None) -> "Stream":
        """Submit now (QueueFull / ValueError raised here) and return the async stream of its events.

        Call from the event loop that will consume it."""
        return Stream(self, prompt, params, max_len)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def iter_tokens(self, prompts: list[list[int]], params: list[SamplingParams], max_len: int | None = None,
                    sequences: list[Sequence] | None = None) -> Iterator[list[int | None]]:
        """Run each prompt as its own sequence; yield, step by step, every row's next token (None
        once a row has ended). A stop token is yielded, then the row ends. Leaving early cancels.
        `sequences`, if given, receives the Sequence objects (to cancel single rows)."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        seqs = [Sequence(list(p), sp, (lambda i: lambda kind, value: events.put((i, kind, value)))(i), max_len)
                for i, (p, sp) in enumerate(zip(prompts, params))]
        if sequences is not None:
            sequences.extend(seqs)
        out: list[list[int]] = [[] for _ in seqs]
        ended = [False] * len(seqs)
        try:
            for s in seqs:
                self.submit(s, bounded=False)
            k = 0
            while True:
                while all(ended[i] or len(out[i]) > k for i in range(len(seqs))):
                    if all(ended[i] and len(out[i]) <= k for i in range(len(seqs))):
                        return
                    yield [out[i][k] if len(out[i]) > k else None for i in range(len(seqs))]
                    k += 1
                i, kind, value = events.get()
                if kind == "token":
                    out[i].append(value)
                elif kind == "error":
                    raise RuntimeError(f"generation failed: {value}")
                else:
                    if value == "stop":
                        out[i].append(seqs[i].tokens[-1])
                    ended[i] = True
        finally:
            for s in seqs:
                s.cancel()
            self.wake()

    # ---- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        me = threading.current_thread()
        with torch.inference_mode():
            while True:
                with self._cond:
                    idle_since = time.monotonic()
                    while not self._stopping and not self.waiting and not self._running:
                        left = IDLE_EXIT_SECONDS - (time.monotonic() - idle_since) if self.autostart else None
                        if left is not None and left <= 0:
                            if self._thread is me:
                                self._thread = None
                            return
                        self._cond.wait(left)
                    if self._stopping:
                        return
                try:
                    self._step()
                except Exception as e:  # never a dead engine: fail what was running, keep serving
                    self._fail_running(f"{type(e).__name__}: {e}", isinstance(e, torch.OutOfMemoryError)
                                       or "memory" in str(e).lower())

    def _fail_running(self, message: str, drop_memory: bool) -> None:
        for seq in list(self._running):
            self._finish(seq, "error", message)
        if drop_memory:
            self._kv = self._blocks = None

    def _finish(self, seq: Sequence, reason: str, message: str | None = None) -> None:
        if seq.finished:
            return
        seq.finished = True
        if seq in self._running:
            self._running.remove(seq)
            self._seq_time = 0.8 * self._seq_time + 0.2 * (time.perf_counter() - seq.admitted)
        self._free(seq)
        self.stats.requests_finished[reason if reason in self.stats.requests_finished else "error"] += 1
        if self.stats.on_finish is not None:
            self.stats.on_finish(reason, time.perf_counter() - seq.arrival)
        self._emit(seq, "error", message) if reason == "error" else self._emit(seq, "done", reason)

    def _free(self, seq: Sequence) -> None:
        if self._blocks is not None:
            for b in seq.blocks:
                if b in self._blocks.ref:
                    self._blocks.release(b)
        seq.blocks, seq.computed, seq.registered = [], 0, 0

    def _emit(self, seq: Sequence, kind: str, value) -> None:
        """Deliver an event; a listener that raises loses its sequence, never the engine."""
        try:
            seq.on_event(kind, value)
        except Exception:
            if not seq.finished:
                seq.cancel()

    def _drop_cancelled(self) -> None:
        with self._cond:
            for seq in [s for s in self.waiting if s.cancelled]:
                self.waiting.remove(seq)
                self._finish(seq, seq.cancel_reason)
        for seq in [s for s in self._running if s.cancelled]:
            self._finish(seq, seq.cancel_reason)

    # ---- scheduling --------------------------------------------------------------------------
    def _budget(self, n_decode: int) -> int:
        """Prompt tokens this step may prefill."""
        if self.prefill_budget is not None:
            return self.prefill_budget
        if n_decode == 0:
            return 2048
        cost = self._prefill_cost()
        if self._decode_time is None or cost is None:
            return 16
        # The chunk may take as long as a decode step: a step that prefills then costs ~2 decode steps.
        fixed, per = cost
        budget = int(min(2048, max(MIN_CHUNK, (self._decode_time - fixed) / per)))
        if self.decoder == "native":  # stay within one native step (a step beyond it prefills through the model)
            budget = min(budget, max(MIN_CHUNK, NATIVE_MAX_ROWS - n_decode))
        return budget

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Prompt tokens of `seq` to prefill now: within the step's budget, and few enough that the
        chunk's attention over its whole context stays within the scratch memory bound."""
        n = min(seq.length - seq.computed, budget)
        return min(n, prefill_chunk(seq.computed + n, self.model.config.n_head))

    def _step(self) -> None:
        self._pledged = 0
        self._drop_cancelled()
        if self._kv is None:
            self._kv = PagedKV(self.model.config, self.model.dtype, self.device, self.block_size,
                               max_blocks=self._max_blocks())
            self._blocks = BlockTable(self._kv)
        self._kv.max_blocks = max(self._kv.max_blocks, self._max_blocks())  # submit may have raised the limit
        plan = [(s, 1) for s in self._running if s.computed == s.length - 1]
        budget = self._budget(len(plan))
        for s in self._running:
            if s.computed < s.length - 1 and budget > 0:
                n = self._chunk(s, budget)
                plan.append((s, n))
                budget -= n
        while budget > 0 and self.running < self.max_concurrency:
            s = self._admit()
            if s is None:
                break
            n = self._chunk(s, budget)
            plan.append((s, n))
            budget -= n
        ready = []
        for s, n in plan:
            if s in self._running and self._reserve(s, s.computed + n):
                ready.append((s, n))
        ready = [(s, n) for s, n in ready if s in self._running]  # a later reservation may preempt
        if ready:
            self._forward(ready)
            if self.device.type == "cpu" and any(n > 1 and s.computed >= LONG_PREFILL for s, n in ready):
                release_heap()  # each chunk of a long prompt would otherwise leave the heap larger

    def _admit(self) -> Sequence | None:
        with self._cond:
            while self.waiting and self.waiting[0].cancelled:
                seq = self.waiting.popleft()
                self._finish(seq, seq.cancel_reason)
            if not self.waiting:
                return None
            seq = self.waiting[0]
            # Admission by free KV memory: the whole current length, beyond one new block per running row.
            need = -(-(seq.length + 1) // self.block_size)
            if self._running and self._blocks.available - self._pledged < need + self.running:
                return None
            self._pledged += need  # blocks the sequences admitted in this step will take
            self.waiting.popleft()
            seq.admitted = time.perf_counter()
            self._running.append(seq)
            self._admissions += 1
        if seq.params.repetition_penalty != 1.0:
            seq.seen = torch.zeros(self.model.config.vocab_size, dtype=torch.bool, device=self.device)
            seq.seen[torch.tensor(seq.prompt + seq.tokens, device=self.device)] = True
        self._match_prefix(seq)
        self.stats.prompt_tokens += len(seq.prompt) if not seq.tokens else 0
        return seq

    def _match_prefix(self, seq: Sequence) -> None:
        """Prefix caching: share the longest run of cached full blocks the sequence starts with."""
        if not self.prefix_caching:
            return
        for j in range((seq.length - 1) // self.block_size):  # the last token always runs: its logits are needed
            key = self._block_key(seq, j)
            b = None if key is None else self._blocks.lookup(key)
            if b is None:
                break
            seq.blocks.append(b)
        seq.computed, seq.registered = len(seq.blocks) * self.block_size, len(seq.blocks)
        if not seq.tokens:
            self.stats.cached_prompt_tokens += seq.computed

    def _block_key(self, seq: Sequence, j: int) -> bytes | None:
        """Prefix-cache key of the sequence's j-th full block: a hash of every token up to its end
        and of the RoPE scaling all of them were rotated with; None when its tokens were rotated
        with different scalings (past training_seqlen) or the block is not full."""
        bs, scaling = self.block_size, self.model.config.rope_scaling
        while len(seq.hashes) <= j:
            i = len(seq.hashes)
            if (i + 1) * bs > seq.length:
                return None
            root = scaling(self._rope_total(seq, 0))
            if seq.hashes and seq.hashes[-1] is None or ((i + 1) * bs > len(seq.prompt) and any(
                    scaling(self._rope_total(seq, p)) != root for p in range(i * bs, (i + 1) * bs))):
                seq.hashes.append(None)
                continue
            prev = seq.hashes[-1] if seq.hashes else repr(root).encode()
            tokens = [seq.token_at(p) for p in range(i * bs, (i + 1) * bs)]
            seq.hashes.append(hashlib.blake2b(prev + repr(tokens).encode(), digest_size=16).digest())
        return seq.hashes[j]

    def _reserve(self, seq: Sequence, upto: int) -> bool:
        """Blocks for positions < upto; preempts the newest other sequences when memory is short."""
        while len(seq.blocks) < -(-upto // self.block_size):
            b = self._blocks.alloc()
            if b is None:
                victims = [s for s in self._running if s is not seq]
                if not victims:
                    self._finish(seq, "error", f"out of KV memory: {upto} positions do not fit in "
                                                f"{self.kv_cache_tokens}")
                    return False
                self._preempt(victims[-1])
                continue
            seq.blocks.append(b)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Back to the front of the queue; its keys are recomputed when it is admitted again."""
        self._running.remove(seq)
        self._free(seq)
        self.stats.preempted += 1
        with self._cond:
            self.waiting.appendleft(seq)

    # ---- one forward -------------------------------------------------------------------------
    def _rope_total(self, seq: Sequence, i: int) -> int:
        # Prompt tokens are scaled for the whole prompt (as one prefill); a generated token at
        # position i for the i + 1 positions that exist then.
        return len(seq.prompt) if i < len(seq.prompt) else i + 1

    def _forward(self, plan: list[tuple[Sequence, int]]) -> None:
        t0 = time.perf_counter()
        bs, dev = self.block_size, self.device
        plan = [p for p in plan if p[1] == 1] + [p for p in plan if p[1] > 1]
        nd = sum(1 for _, n in plan if n == 1)
        ids, pos, tot, slots, select, sampled = [], [], [], [], [], []
        for s, n in plan:
            c = s.computed
            for i in range(c, c + n):
                ids.append(s.token_at(i))
                pos.append(i)
                tot.append(self._rope_total(s, i))
                slots.append(s.blocks[i // bs] * bs + i % bs)
            if c + n == s.length:
                select.append(len(ids) - 1)
                sampled.append(s)
        decode_only = nd == len(plan)
        N = len(ids)
        native = self.decoder == "native" and (nd > 0 or N <= NATIVE_MAX_ROWS) and self._native_decoder() is not None
        whole = native and N <= NATIVE_MAX_ROWS  # prompt chunks in the native step too (else beside it)
        compiled = self.compile and decode_only and not native
        if compiled:  # padded to a bucketed batch size: few shapes to compile
            pad = _bucket(N) - N
            ids, pos, tot, slots = ids + [0] * pad, pos + [0] * pad, tot + [1] * pad, slots + [0] * pad
        pos_t = torch.tensor(pos, device=dev)
        tot_t = torch.tensor(tot, device=dev)
        dslots = dmask = None
        if nd:
            rows = [s for s, _ in plan[:nd]] + [None] * (len(ids) - N if compiled else 0)
            nb = max(len(s.blocks) for s, _ in plan[:nd])
            table = torch.tensor([(s.blocks + [0] * (nb - len(s.blocks))) if s else [0] * nb for s in rows],
                                 device=dev)
            dslots = (table[:, :, None] * bs + torch.arange(bs, device=dev)).flatten(1)
            lens = torch.tensor([s.computed + 1 if s else 1 for s in rows], device=dev)
            dmask = None if native else (torch.arange(nb * bs, device=dev) < lens[:, None])[:, None, None]
        chunks, start = [], 0 if native else nd  # beside a native step the chunks run as a batch of their own
        for s, n in plan[nd:]:
            c = s.computed
            table = torch.tensor(s.blocks[:-(-(c + n) // bs)], device=dev)
            ctx = (table[:, None] * bs + torch.arange(bs, device=dev)).flatten()[:c + n]
            chunks.append((start, n, ctx, c))
            start += n
        write = torch.tensor(slots, device=dev)
        cos, sin = rope_cos_sin(self.model.config, pos_t, tot_t)
        ids_t = torch.tensor([ids], device=dev)
        if whole:  # each chunk row attends over its own prefix, as a decode row would
            S = max(([dslots.shape[1]] if nd else []) + [c + n for _, n, _, c in chunks])
            ctx = [F.pad(dslots, (0, S - dslots.shape[1]))] if nd else []
            ctx_lens = [lens] if nd else []
            for _, n, slots_c, c in chunks:
                ctx.append(F.pad(slots_c, (0, S - len(slots_c))).expand(n, S))
                ctx_lens.append(torch.arange(c + 1, c + n + 1, device=dev))
            sel = torch.tensor(select, dtype=torch.long, device=dev)
            logits = self._native(ids_t[0], cos, sin, self._kv, write, torch.cat(ctx), torch.cat(ctx_lens), select=sel)
        elif native:  # the one-token rows in the native step; prompt chunks beside them through the model
            logits = self._native(ids_t[0, :nd], cos[:nd], sin[:nd], self._kv, write[:nd], dslots, lens)
            logits = logits[torch.tensor([i for i in select if i < nd], dtype=torch.long, device=dev)]
            if chunks:
                step = PagedStep(self._kv, pos_t[nd:], tot_t[nd:], write[nd:], None, None, chunks)
                sel = torch.tensor([i - nd for i in select if i >= nd] or [N - nd - 1], device=dev)
                rest = self.model(ids_t[:, nd:], cache=step, rope=(cos[nd:], sin[nd:]), select=sel)[0].float()
                logits = torch.cat([logits, rest[:sum(1 for i in select if i >= nd)]])
        else:
            step = PagedStep(self._kv, pos_t, tot_t, write, dslots, dmask, chunks)
            sel = torch.tensor(select or [N - 1], device=dev)  # no row samples: one row of logits, unused
            if compiled:
                logits = self._run_compiled(ids_t, cos, sin, step)[sel]
            else:
                logits = self.model(ids_t, cache=step, rope=(cos, sin), select=sel)[0].float()
        for s, n in plan:
            s.computed += n
            self._register(s)
        self.stats.steps += 1
        if sampled:
            self._sample(sampled, logits)
        self._time_step(time.perf_counter() - t0, nd, N - nd)

    def _native_decoder(self):
        """The native decode step, (re)built when the model's tensors changed (looked at when a sequence
        was admitted since the last step: a whole-model walk costs a fraction of a step); None where it
        no longer runs."""
        if self._native is not None and (self._native_seen == self._admissions or self._native.current()):
            self._native_seen = self._admissions
            return self._native
        from .native import NativeDecoder

        self._native = NativeDecoder.build(self.model)
        self._native_seen = self._admissions
        if self._native is None:
            self.decoder = "compiled" if default_compile(self.model, self.device) else "eager"
            self.compile = self.decoder == "compiled"
        return self._native

    def _run_compiled(self, ids: Tensor, cos: Tensor, sin: Tensor, step: PagedStep) -> Tensor:
        if self._compiled is None:
            from .compile_cache import enable_compile_cache

            enable_compile_cache()
            self._compiled = torch.compile(_decode_forward, dynamic=True)
        try:
            # Floats (norm eps, dropout p) as constants: otherwise dynamo traces them symbolically,
            # fails to turn them into tensors and traces the whole model a second time.
            with torch._dynamo.config.patch(specialize_float=True):
                return self._compiled(self.model, ids, cos, sin, step)
        except Exception as e:  # a machine without a compiler toolchain: decode eagerly instead
            import warnings

            warnings.warn(f"telechat: compiling the decode step failed ({type(e).__name__}: {e}); running eagerly",
                          stacklevel=2)
            self.compile = False
            return _decode_forward(self.model, ids, cos, sin, step)

    def _time_step(self, seconds: float, n_decode: int, n_prefill: int) -> None:
        if n_prefill == 0:
            self._decode_time = seconds if self._decode_time is None else 0.8 * self._decode_time + 0.2 * seconds
        else:
            part = seconds - ((self._decode_time or 0.0) if n_decode else 0.0)
            self._prefill_costs.append((n_prefill, max(part, 1e-6)))

    def _prefill_cost(self) -> tuple[float, float] | None:
        """(seconds per step that prefills, seconds per prompt token) fitted to the recent such steps: a
        prefill pass has a fixed cost (hundreds of operator calls) that a per-token average misses, and
        chunks of a long prompt grow dearer as their context does."""
        pts = self._prefill_costs
        if not pts:
            return None
        n_mean = sum(n for n, _ in pts) / len(pts)
        t_mean = sum(t for _, t in pts) / len(pts)
        spread = sum((n - n_mean) ** 2 for n, _ in pts)
        if len(pts) >= 4 and spread > 0:  # least squares: t = fixed + per * n
            per = sum((n - n_mean) * (t - t_mean) for n, t in pts) / spread
            fixed = t_mean - per * n_mean
            if per > 0 and fixed >= 0:
                return fixed, per
        return 0.0, t_mean / n_mean

    def _register(self, seq: Sequence) -> None:
        """Enter the sequence's newly completed full blocks (prompt or answer) into the prefix cache."""
        if not self.prefix_caching:
            return
        while (seq.registered + 1) * self.block_size <= seq.computed:
            key = self._block_key(seq, seq.registered)
            if key is None:
                return
            self._blocks.register(key, seq.blocks[seq.registered])
            seq.registered += 1

    def _sample(self, rows: list[Sequence], logits: Tensor) -> None:
        params = [s.params for s in rows]
        settings = RowSettings.of(params, [s.seed for s in rows], [len(s.tokens) for s in rows], self.device)
        seen = None
        if any(p.repetition_penalty != 1.0 for p in params):
            blank = torch.zeros(logits.shape[-1], dtype=torch.bool, device=self.device)
            seen = torch.stack([s.seen if s.seen is not None else blank for s in rows])
        try:
            picked = sample_rows(process_rows(logits, seen, settings), settings).tolist()  # the one host sync
        except Exception:  # noqa: BLE001 (find the rows at fault: only they end)
            picked = self._sample_one_by_one(rows, logits, seen, settings)
        now = time.perf_counter()
        self.stats.add_generated(len(rows))
        for s, tok in zip(rows, picked):
            if isinstance(tok, str):
                self._finish(s, "error", tok)
                continue
            s.tokens.append(tok)
            if s.seen is not None:
                s.seen[tok] = True
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
                if len(s.tokens) >= s.params.max_new_tokens or s.length >= self._limit(s):
                    self._finish(s, "length")


    @staticmethod
    def _sample_one_by_one(rows, logits, seen, settings) -> list:
        """Each row alone: its token, or the message of its own sampling failure."""
        out = []
        for i in range(len(rows)):
            one = RowSettings(*(getattr(settings, f.name)[i:i + 1] for f in dataclasses.fields(settings)))
            try:
                out.append(int(sample_rows(process_rows(logits[i:i + 1], None if seen is None else seen[i:i + 1], one),
                                           one)[0]))
            except Exception as e:  # noqa: BLE001
                out.append(f"sampling failed: {type(e).__name__}: {e}")
        return out


class Stream:
    """Async iterator over one sequence's events: ("token", id) ... then ("done", reason) or
    ("error", message). `cancel()` frees its memory at the next step."""

    def __init__(self, engine: Engine, prompt: list[int], params: SamplingParams, max_len: int | None):
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
            self._engine.wake()

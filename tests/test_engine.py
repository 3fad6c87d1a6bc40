"""The continuous-batching engine, driven directly (no HTTP): exactness against single-sequence
`generate`, joining and leaving at every step, stop ids, cancellation, the bounded queue, bad
input, failures inside a step, the asyncio face and the counters.

Waits are event-driven: each sequence's `on_event` callback (run on the engine thread) records its
events together with `engine.stats.steps`, and some callbacks hold the engine thread at a chosen
token until the test has acted, so that interleavings are deterministic rather than timed.
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import threading
import time

import pytest
import torch

import telechat
from telechat.engine import Engine, QueueFull, Sequence, Stream
from telechat.generate import RowSettings, SamplingParams, process_logits, sample_rows
from telechat.kv import DenseKV

TIMEOUT = 30  # seconds; every wait below normally ends in well under one


def sharp_model(seed: int = 0) -> telechat.TeleChat:
    """The tiny preset with room for 512 positions (NTK past training_seqlen 32), non-zero biases and
    norms, weights 2.5x the init scale and query/key weights 6x more, so attention is peaked: greedy
    output then varies from token to token (at init scale it repeats one token) and depends on
    positions and RoPE scaling, so a position or scaling error in batching changes it."""
    llm = telechat.from_preset("tiny", seed=seed, seq_length=512)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for n, p in llm.model.named_parameters():
            if p.dim() == 2:
                p.mul_(2.5)
            if n.endswith("bias") or "layernorm" in n or "ln_f" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            if n.endswith(("query.weight", "key_value.weight")):
                p.mul_(6.0)
    assert llm.config.training_seqlen == 32 and llm.config.seq_length == 512
    return llm.model


@pytest.fixture(scope="module")
def model() -> telechat.TeleChat:
    return sharp_model()


@pytest.fixture(scope="module")
def ref_model(model) -> telechat.TeleChat:
    """An identical copy for the single-sequence references (generate resets the cache it uses)."""
    return copy.deepcopy(model)


@pytest.fixture()
def engines(model):
    """engines(start=True, **Engine kwargs) -> Engine over the shared model; all stopped afterwards."""
    made: list[Engine] = []

    def make(start: bool = True, **kw) -> Engine:
        kw.setdefault("prefill_budget", 512)  # a fixed budget: the step of each event is known
        eng = Engine(model, autostart=start, **kw)
        made.append(eng)
        return eng.start() if start else eng

    yield make
    for eng in made:
        eng.stop()
        assert not eng.alive


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def generate_alone(model, prompt: list[int], params: SamplingParams, n: int) -> list[int]:
    """One sequence on a contiguous cache (telechat.kv.DenseKV, no engine): prefill, then a token per
    step; greedy or seeded sampling (the draw for token i uses (seed, i)); ends after a stop id."""
    cache = DenseKV(model.config, 1, len(prompt) + n, model.dtype)
    logits = model(torch.tensor([prompt]), cache=cache.at(torch.arange(len(prompt))), last_only=True)[:, -1].float()
    out = []
    for i in range(n):
        s = RowSettings.of([params], [params.seed or 0], [i], "cpu")
        tok = int(sample_rows(process_logits(logits, torch.tensor([prompt + out]), params), s)[0])
        out.append(tok)
        if tok in params.stop_ids:
            break
        pos = torch.tensor([len(prompt) + i])
        logits = model(torch.tensor([[tok]]), cache=cache.at(pos), last_only=True)[:, -1].float()
    return out


def reference(ref_model, prompt: list[int], params: SamplingParams, context: int = 512) -> tuple[list[int], str]:
    """What the engine should emit for one sequence, from `generate_alone`: tokens up to (not
    including) the first stop id, at most max_new_tokens, and no more than the context allows."""
    n = min(params.max_new_tokens, context - len(prompt))
    out = generate_alone(ref_model, prompt, params, n)
    assert len(out) == n or out[-1] in params.stop_ids
    for i, t in enumerate(out):
        if t in params.stop_ids:
            return out[:i], "stop"
    return out, "length"


class Rec:
    """An on_event callback that records (kind, value), the engine's decode-step count at each event
    and a global order (shared `log`); `hook(rec, kind, value)` runs before `done` is set."""

    def __init__(self, engine: Engine, name: str = "", log: list | None = None, hook=None):
        self.engine, self.name, self.log, self.hook = engine, name, log, hook
        self.events: list[tuple[str, object]] = []
        self.steps: list[int] = []
        self.done = threading.Event()

    def __call__(self, kind, value):
        self.events.append((kind, value))
        self.steps.append(self.engine.stats.steps)
        if self.log is not None:
            self.log.append((self.name, kind))
        if self.hook is not None:
            self.hook(self, kind, value)
        if kind != "token":
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [v for k, v in self.events if k == "token"]

    @property
    def final(self) -> tuple[str, object]:
        return self.events[-1]

    def wait(self) -> "Rec":
        assert self.done.wait(TIMEOUT), f"{self.name}: no final event; events so far {self.events}"
        assert [k for k, _ in self.events[:-1]] == ["token"] * (len(self.events) - 1)  # exactly one final
        return self


def hold_at(n_tokens: int, reached: threading.Event, release: threading.Event):
    """A hook that, at the sequence's n-th token, signals `reached` and holds the engine thread until `release`."""
    def hook(rec, kind, value):
        if kind == "token" and len(rec.tokens) == n_tokens:
            reached.set()
            assert release.wait(TIMEOUT)
    return hook


def submit(eng: Engine, prompt, params, rec: Rec, max_len: int = 512) -> Sequence:
    return eng.submit(Sequence(prompt, params, rec, max_len))


# ---------------------------------------------------------------------------------------------
# exactness: a continuously batched sequence emits what it would emit alone
# ---------------------------------------------------------------------------------------------
def test_continuous_batching_equals_single_sequence_generation(engines, ref_model, model):
    sp = SamplingParams
    specs = [  # (prompt length, params, max_len): lengths past 32 give each row its own NTK scaling
        (5, sp(max_new_tokens=16), 512),
        (40, sp(max_new_tokens=20, repetition_penalty=1.3), 512),
        (12, sp(max_new_tokens=18, do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=1), 512),
        (70, sp(max_new_tokens=24, do_sample=True, seed=2), 512),
        (33, sp(max_new_tokens=20, do_sample=True, temperature=1.5, top_p=0.8, seed=3), 512),  # + a stop id
        (9, sp(max_new_tokens=20, do_sample=True, top_k=20, repetition_penalty=1.2, seed=4), 16),  # context: 7
        (245, sp(max_new_tokens=20), 512),  # runs past the cache's first 256 positions: resized mid-batch
    ]
    prompts = [ids(n, seed=100 + i) for i, (n, _, _) in enumerate(specs)]
    params = [p for _, p, _ in specs]
    # request 4 stops at a token it samples part-way (the first new token from its 4th on)
    free_run, _ = reference(ref_model, prompts[4], params[4])
    k = next(i for i in range(3, len(free_run)) if free_run[i] not in free_run[:i])
    params[4] = dataclasses.replace(params[4], stop_ids=[free_run[k]])
    expected = [reference(ref_model, p, sp_, max_len) for p, sp_, (_, _, max_len) in zip(prompts, params, specs)]
    assert expected[4] == (free_run[:k], "stop")
    assert len(expected[5][0]) == 16 - 9 and expected[5][1] == "length"

    # Staggered arrivals: group g+1 is submitted when the first request of group g has its 2nd token,
    # the engine thread held meanwhile (so the batch state at each submission is known).
    groups = [[0], [1], [2, 3], [4, 5, 6]]
    want = [threading.Event() for _ in groups]
    submitted = [threading.Event() for _ in groups]
    eng = engines(max_concurrency=3, max_queue=16)
    log: list = []
    recs = []
    for i in range(len(specs)):
        g = next((j for j, grp in enumerate(groups) if grp[0] == i), None)
        hook = hold_at(2, want[g + 1], submitted[g + 1]) if g is not None and g + 1 < len(groups) else None
        recs.append(Rec(eng, f"r{i}", log, hook))
    state = []
    for g, group in enumerate(groups):
        if g:
            assert want[g].wait(TIMEOUT)
        for i in group:
            submit(eng, prompts[i], params[i], recs[i], specs[i][2])
        state.append((eng.running, len(eng.waiting)))
        submitted[g].set()
    for r in recs:
        r.wait()
    kv = eng.kv_usage()

    for i, (r, (tokens, reason)) in enumerate(zip(recs, expected)):
        assert r.tokens == tokens, f"request {i} ({specs[i][1]})"
        assert r.final == ("done", reason), i
    # fewer slots than requests: at the last submission all 3 slots were busy and 4 requests queued
    assert state[-1] == (3, 4)
    # every later request joined while another one was mid-generation (no draining between batches)
    first = {n: log.index((n, "token")) for n in (r.name for r in recs)}
    last = {n: max(j for j, (m, _) in enumerate(log) if m == n) for n in first}
    for r in recs[1:]:
        assert any(first[o] < first[r.name] < last[o] for o in first if o != r.name), r.name
    assert kv["used_blocks"] == 0 and kv["cached_blocks"] > 0  # all memory back; prompt blocks stay cached
    assert eng.stats.requests_finished == {"stop": 1, "length": 6, "cancelled": 0, "error": 0}


def test_sequences_join_and_leave_at_every_step(engines, ref_model):
    # Two slots: a long request and a short one start together, a third waits. It must take the short
    # one's slot in the very next step while the long one keeps decoding (never waiting for a drain).
    eng = engines(start=False, max_concurrency=2)
    long_p, short_p, queued_p = ids(20, 1), ids(6, 2), ids(45, 3)
    long_sp, short_sp, queued_sp = (SamplingParams(max_new_tokens=n) for n in (24, 3, 4))
    long, short, queued = Rec(eng, "long"), Rec(eng, "short"), Rec(eng, "queued")
    submit(eng, long_p, long_sp, long)
    submit(eng, short_p, short_sp, short)
    submit(eng, queued_p, queued_sp, queued)
    assert len(eng.waiting) == 3 and eng.running == 0
    eng.start()
    for r in (long, short, queued):
        r.wait()

    assert long.tokens == reference(ref_model, long_p, long_sp)[0]
    assert short.tokens == reference(ref_model, short_p, short_sp)[0]
    assert queued.tokens == reference(ref_model, queued_p, queued_sp)[0]
    # step counts at each event (the first token comes from the prefill step, one more per step)
    assert long.steps[:-1] == list(range(1, 25)) and short.steps == [1, 2, 3, 3]
    assert queued.steps[0] == short.steps[-1] + 1 == 4  # prefilled in the step right after the short one left
    assert queued.steps[:-1] == [4, 5, 6, 7]
    assert long.steps[-1] == 24 and eng.stats.steps == 24  # the long one never waited
    assert eng.stats.generated_tokens == 24 + 3 + 4


# ---------------------------------------------------------------------------------------------
# stop ids
# ---------------------------------------------------------------------------------------------
def test_stop_id_finishes_without_emitting_it(engines, ref_model):
    eng = engines(max_concurrency=2)
    prompt = ids(10, 5)
    free_run, _ = reference(ref_model, prompt, SamplingParams(max_new_tokens=16))
    k = next(i for i in range(2, len(free_run)) if free_run[i] not in free_run[:i])
    stop = free_run[k]

    rec = Rec(eng, "stop")
    unused = next(t for t in range(512) if t not in free_run)  # a stop id that never comes up
    seq = submit(eng, prompt, SamplingParams(max_new_tokens=16, stop_ids=[unused, stop]), rec)
    rec.wait()
    assert rec.tokens == free_run[:k] and stop not in rec.tokens
    assert rec.final == ("done", "stop")
    assert seq.tokens == free_run[:k + 1]  # it was generated, just not emitted
    # a stop on the very first token (sampled right after the prefill): no token events at all
    first = Rec(eng, "first")
    submit(eng, prompt, SamplingParams(max_new_tokens=16, stop_ids=[free_run[0]]), first)
    assert first.wait().events == [("done", "stop")]
    assert eng.stats.requests_finished["stop"] == 2 and eng.running == 0


# ---------------------------------------------------------------------------------------------
# cancellation
# ---------------------------------------------------------------------------------------------
def test_cancel_frees_the_slot_for_a_queued_request(engines, ref_model):
    eng = engines(start=False, max_concurrency=1)
    reached, release = threading.Event(), threading.Event()
    running_at_done = []
    a = Rec(eng, "a", hook=hold_at(3, reached, release))
    a_hook = a.hook

    def hook(rec, kind, value):
        a_hook(rec, kind, value)
        if kind == "done":
            running_at_done.append(eng.running)
    a.hook = hook
    b, c = Rec(eng, "b"), Rec(eng, "c")
    b_p, b_sp = ids(8, 7), SamplingParams(max_new_tokens=5)
    seq_a = submit(eng, ids(12, 6), SamplingParams(max_new_tokens=24), a)
    submit(eng, b_p, b_sp, b)
    seq_c = submit(eng, ids(9, 8), SamplingParams(max_new_tokens=5), c)
    eng.start()

    assert reached.wait(TIMEOUT)  # a is running with 3 tokens; b and c are queued
    assert (eng.running, len(eng.waiting)) == (1, 2)
    canceller = threading.Thread(target=lambda: (seq_a.cancel(), seq_c.cancel()))
    canceller.start()
    canceller.join()
    release.set()
    for r in (a, b, c):
        r.wait()

    assert len(a.tokens) == 3 and a.final == ("done", "cancelled")
    assert running_at_done == [0]  # the slot was free when the cancellation was reported
    assert c.events == [("done", "cancelled")]  # cancelled while queued: never admitted
    assert b.steps[0] == a.steps[-1] + 1  # b was prefilled in the step that dropped a
    assert b.tokens == reference(ref_model, b_p, b_sp)[0] and b.final == ("done", "length")
    assert eng.stats.requests_finished == {"stop": 0, "length": 1, "cancelled": 2, "error": 0}
    seq_a.cancel()  # cancelling a finished sequence changes nothing
    assert a.events[-1] == ("done", "cancelled") and len(a.events) == 4


# ---------------------------------------------------------------------------------------------
# the bounded queue
# ---------------------------------------------------------------------------------------------
def test_queue_full_raises_with_retry_after_and_leaves_others_alone(engines, ref_model):
    eng = engines(max_concurrency=1, max_queue=1)
    reached, release = threading.Event(), threading.Event()
    a_p, b_p = ids(10, 9), ids(7, 10)
    a_sp, b_sp = SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=6)
    a, b, c = Rec(eng, "a", hook=hold_at(1, reached, release)), Rec(eng, "b"), Rec(eng, "c")
    try:
        submit(eng, a_p, a_sp, a)
        assert reached.wait(TIMEOUT)  # a holds the only slot
        submit(eng, b_p, b_sp, b)  # b takes the only queue place
        with pytest.raises(QueueFull) as exc:
            submit(eng, ids(5, 11), SamplingParams(max_new_tokens=4), c)
    finally:
        release.set()
    assert isinstance(exc.value.retry_after, int) and 1 <= exc.value.retry_after <= 60
    assert f"{exc.value.retry_after}s" in str(exc.value)
    assert (eng.running, len(eng.waiting)) == (1, 1)
    a.wait()
    b.wait()
    assert (a.tokens, a.final) == (reference(ref_model, a_p, a_sp)[0], ("done", "length"))
    assert (b.tokens, b.final) == (reference(ref_model, b_p, b_sp)[0], ("done", "length"))
    assert c.events == []
    # room again once they are done
    d = Rec(eng, "d")
    submit(eng, b_p, b_sp, d)
    assert d.wait().tokens == b.tokens


# ---------------------------------------------------------------------------------------------
# bad input and limits
# ---------------------------------------------------------------------------------------------
def test_bad_input_is_rejected_at_submit(engines, model):
    with pytest.raises(ValueError, match="max_concurrency"):
        Engine(model, max_concurrency=0)
    with pytest.raises(ValueError, match="max_queue"):
        Engine(model, max_queue=-1)
    eng = engines(max_concurrency=2, max_model_len=64)
    rec = Rec(eng, "bad")
    sp = SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match="empty prompt"):
        submit(eng, [], sp, rec)
    with pytest.raises(ValueError, match="max_new_tokens"):
        submit(eng, [1, 2, 3], SamplingParams(max_new_tokens=0), rec)
    with pytest.raises(ValueError, match="no room"):
        submit(eng, ids(10, 12), sp, rec, max_len=10)  # the prompt fills its own context
    with pytest.raises(ValueError, match="no room"):
        submit(eng, ids(64, 13), sp, rec, max_len=512)  # ... or the engine's max_model_len
    with pytest.raises(ValueError, match="no room"):
        submit(eng, ids(80, 14), sp, rec, max_len=512)
    assert rec.events == [] and not eng.waiting and eng.running == 0 and eng.alive


def test_context_limit_and_cache_cap(engines, ref_model, model):
    # max_model_len caps both the context (prompt + generated) and the cache the engine allocates.
    eng = engines(max_concurrency=2, max_model_len=40)
    prompt, sp = ids(30, 15), SamplingParams(max_new_tokens=24)
    edge = ids(39, 16)  # one position left: exactly one token
    r1, r2 = Rec(eng, "r1"), Rec(eng, "r2")
    submit(eng, prompt, sp, r1)
    submit(eng, edge, sp, r2)
    r1.wait()
    r2.wait()
    # the final events are sent from inside the step that frees the blocks
    assert eng.kv_usage()["used_blocks"] == 0 and eng.kv_usage()["allocated_blocks"] >= 3
    assert (r1.tokens, r1.final) == (reference(ref_model, prompt, sp, 40)[0], ("done", "length"))
    assert len(r1.tokens) == 10
    assert (r2.tokens, r2.final) == (reference(ref_model, edge, sp, 40)[0], ("done", "length"))
    assert len(r2.tokens) == 1


# ---------------------------------------------------------------------------------------------
# never a dead engine
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("exc", [RuntimeError("boom"), torch.OutOfMemoryError("out of memory (simulated)")],
                         ids=["RuntimeError", "OutOfMemoryError"])
def test_a_failing_step_fails_the_running_sequences_and_the_engine_serves_on(engines, ref_model, model,
                                                                            monkeypatch, exc):
    eng = engines(start=False, max_concurrency=2)
    block = model.transformer.h[1]
    armed, fired = threading.Event(), []
    original = block.forward

    def flaky(*args, **kwargs):
        if armed.is_set() and not fired:
            fired.append(True)
            raise exc
        return original(*args, **kwargs)
    monkeypatch.setattr(block, "forward", flaky)

    caches = []

    def arm(rec, kind, value):  # after a's 3rd token, the next forward (the next decode step) raises
        if kind == "token" and len(rec.tokens) == 3:
            caches.append(eng.kv)
            armed.set()
    a, b = Rec(eng, "a", hook=arm), Rec(eng, "b")
    waiting = Rec(eng, "waiting")
    w_p, w_sp = ids(35, 18), SamplingParams(max_new_tokens=10, do_sample=True, top_k=40, seed=7)
    submit(eng, ids(12, 17), SamplingParams(max_new_tokens=24), a)
    submit(eng, ids(6, 19), SamplingParams(max_new_tokens=24, do_sample=True, seed=1), b)
    submit(eng, w_p, w_sp, waiting)  # queued behind them when the step fails
    eng.start()
    a.wait()
    b.wait()
    waiting.wait()

    name = type(exc).__name__
    for r in (a, b):
        kind, message = r.final
        assert kind == "error" and name in message and str(exc) in message
    assert len(a.tokens) == 3 and fired == [True]
    assert eng.alive
    # the queued request is served afterwards, exactly (for OOM the cache was dropped and rebuilt)
    assert (waiting.tokens, waiting.final) == (reference(ref_model, w_p, w_sp)[0], ("done", "length"))
    rebuilt = eng.kv is not caches[0]
    assert rebuilt == isinstance(exc, torch.OutOfMemoryError)
    after = Rec(eng, "after")
    a_p, a_sp = ids(50, 20), SamplingParams(max_new_tokens=12, repetition_penalty=1.5)
    submit(eng, a_p, a_sp, after)
    assert after.wait().tokens == reference(ref_model, a_p, a_sp)[0]
    assert eng.stats.requests_finished == {"stop": 0, "length": 2, "cancelled": 0, "error": 2}


def test_a_raising_event_callback_does_not_kill_the_engine(engines, ref_model):
    eng = engines(max_concurrency=2)

    def bad(kind, value):
        raise RuntimeError("client callback failed")
    eng.submit(Sequence(ids(5, 21), SamplingParams(max_new_tokens=8), bad, 512))
    rec = Rec(eng, "next")
    p, sp = ids(7, 22), SamplingParams(max_new_tokens=4)
    submit(eng, p, sp, rec)
    deadline = time.monotonic() + TIMEOUT
    while not rec.done.wait(0.05) and time.monotonic() < deadline:
        assert eng.alive, "the engine thread died"
    assert eng.alive and rec.done.is_set()
    assert rec.tokens == reference(ref_model, p, sp)[0]


# ---------------------------------------------------------------------------------------------
# the asyncio face
# ---------------------------------------------------------------------------------------------
def test_stream_yields_tokens_then_done(engines, ref_model):
    eng = engines(max_concurrency=2)
    prompt, sp = ids(36, 23), SamplingParams(max_new_tokens=10, do_sample=True, temperature=0.7, seed=5)
    expected, _ = reference(ref_model, prompt, sp)

    async def main():
        stream = eng.open(prompt, sp)
        assert isinstance(stream, Stream)
        events = [ev async for ev in stream]
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        return events

    events = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert events == [("token", t) for t in expected] + [("done", "length")]


def test_cancelling_a_stream_frees_its_slot(engines, ref_model):
    eng = engines(start=False, max_concurrency=1, max_queue=1)
    reached, release = threading.Event(), threading.Event()
    b_p, b_sp = ids(9, 25), SamplingParams(max_new_tokens=6)

    async def main():
        a = eng.open(ids(14, 24), SamplingParams(max_new_tokens=24))
        b = eng.open(b_p, b_sp)  # queued behind a in the only slot
        with pytest.raises(QueueFull):
            eng.open(ids(4, 26), b_sp)
        with pytest.raises(ValueError, match="empty prompt"):
            eng.open([], b_sp)
        deliver = a.seq.on_event  # hold the engine thread after a's 2nd token until we have cancelled

        def held(kind, value):
            deliver(kind, value)
            if kind == "token" and len(a.seq.tokens) == 2:
                reached.set()
                assert release.wait(TIMEOUT)
        a.seq.on_event = held
        eng.start()
        got = [await a.__anext__(), await a.__anext__()]
        assert [k for k, _ in got] == ["token", "token"]
        a.cancel()
        release.set()
        rest = [ev async for ev in a]
        b_events = [ev async for ev in b]
        b.cancel()  # after the end: nothing happens
        return got, rest, b_events

    try:
        got, rest, b_events = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    finally:
        release.set()
    assert rest == [("done", "cancelled")]
    assert b_events == [("token", t) for t in reference(ref_model, b_p, b_sp)[0]] + [("done", "length")]
    assert eng.stats.requests_finished == {"stop": 0, "length": 1, "cancelled": 1, "error": 0}
    assert eng.running == 0 and not eng.waiting


# ---------------------------------------------------------------------------------------------
# counters
# ---------------------------------------------------------------------------------------------
def test_stats_add_up(engines, ref_model):
    eng = engines(start=False, max_concurrency=2)
    ttfts, finishes = [], []
    eng.stats.on_ttft = ttfts.append
    eng.stats.on_finish = lambda reason, seconds: finishes.append((reason, seconds))
    prompts = [ids(7, 27), ids(12, 28), ids(40, 29)]
    free_run, _ = reference(ref_model, prompts[1], SamplingParams(max_new_tokens=12))
    k = next(i for i in range(2, len(free_run)) if free_run[i] not in free_run[:i])
    params = [SamplingParams(max_new_tokens=9), SamplingParams(max_new_tokens=12, stop_ids=[free_run[k]]),
              SamplingParams(max_new_tokens=5, do_sample=True, seed=3)]
    recs = [Rec(eng, f"r{i}") for i in range(3)]
    seqs = [submit(eng, p, sp, r) for p, sp, r in zip(prompts, params, recs)]
    eng.start()
    for r in recs:
        r.wait()

    s = eng.stats
    assert s.prompt_tokens == 7 + 12 + 40
    emitted = sum(len(r.tokens) for r in recs)
    assert emitted == 9 + k + 5
    assert s.generated_tokens == sum(len(q.tokens) for q in seqs) == emitted + 1  # + the stop id
    assert s.requests_finished == {"stop": 1, "length": 2, "cancelled": 0, "error": 0}
    assert sorted(r for r, _ in finishes) == ["length", "length", "stop"]
    # one time-to-first-token per sequence, from its arrival to its first token
    assert len(s.ttft) == len(ttfts) == 3 and list(s.ttft) == ttfts
    assert sorted(ttfts) == pytest.approx(sorted(q.first_token_at - q.arrival for q in seqs))
    assert all(0 < t < TIMEOUT for t in ttfts)
    assert min(sec for _, sec in finishes) >= min(ttfts)
    assert 0 < s.tokens_per_second() <= s.generated_tokens / 10.0  # over its 10 s window
    # r0 and r1 start together (first tokens from step 1), r2 is prefilled in the step after the
    # first of them ends; one step per token
    assert s.steps == max(9, k + 1, min(9, k + 1) + 5)


def test_stop_cancels_what_is_queued(model):
    eng = Engine(model, max_concurrency=1, autostart=False)
    recs = [Rec(eng, f"r{i}") for i in range(2)]
    for i, r in enumerate(recs):
        submit(eng, ids(5, 30 + i), SamplingParams(max_new_tokens=4), r)
    eng.stop()
    assert [r.events for r in recs] == [[("done", "cancelled")]] * 2
    assert not eng.alive and eng.stats.requests_finished["cancelled"] == 2


# ---------------------------------------------------------------------------------------------
# prefix caching
# ---------------------------------------------------------------------------------------------
def test_prefix_cache_reuses_keys_and_changes_nothing(engines, ref_model):
    eng = engines(max_concurrency=3, block_size=4)  # whole blocks are shared
    shared = ids(12, seed=500)  # every prompt below stays within training_seqlen 32
    a_p, b_p = shared + ids(5, seed=501), shared + ids(4, seed=502)
    greedy, sampled = SamplingParams(max_new_tokens=6), SamplingParams(max_new_tokens=6, do_sample=True, seed=7)

    a = Rec(eng, "a")
    submit(eng, a_p, greedy, a)
    a.wait()
    assert eng.stats.cached_prompt_tokens == 0
    b = Rec(eng, "b")
    submit(eng, b_p, sampled, b)  # shares 12 tokens (3 blocks) with a's cached prompt
    b.wait()
    assert eng.stats.cached_prompt_tokens == 12
    assert b.tokens == reference(ref_model, b_p, sampled)[0]

    # A follow-up turn holds the previous prompt and answer: every full block b computed is reused
    # (b computed all its tokens but the last one sampled).
    c_p = b_p + b.tokens + ids(3, seed=503)
    c = Rec(eng, "c")
    submit(eng, c_p, greedy, c)
    c.wait()
    reused = (len(b_p) + len(b.tokens) - 1) // 4 * 4
    assert len(c_p) <= 32 and eng.stats.cached_prompt_tokens == 12 + reused and reused > len(b_p)
    assert c.tokens == reference(ref_model, c_p, greedy)[0]


def test_prefix_cache_shares_blocks_with_a_running_sequence(engines, ref_model):
    eng = engines(max_concurrency=2, block_size=4)
    shared = ids(20, seed=510)
    a_p, b_p = shared + ids(4, seed=511), shared + ids(7, seed=512)
    params = SamplingParams(max_new_tokens=12)
    reached, release = threading.Event(), threading.Event()
    a, b = Rec(eng, "a", hook=hold_at(2, reached, release)), Rec(eng, "b")
    submit(eng, a_p, params, a)
    assert reached.wait(TIMEOUT)
    submit(eng, b_p, params, b)  # joins while a runs: a's first 5 prompt blocks are shared
    release.set()
    a.wait(), b.wait()
    assert eng.stats.cached_prompt_tokens == 20
    assert a.tokens == reference(ref_model, a_p, params)[0]
    assert b.tokens == reference(ref_model, b_p, params)[0]


def test_prefix_cache_off_past_training_length_and_when_disabled(engines, ref_model):
    params = SamplingParams(max_new_tokens=4)
    long_p = ids(40, seed=520)  # past training_seqlen 32: NTK scaling depends on the length, no reuse
    eng = engines(max_concurrency=1)
    for extra in (0, 1):
        r = Rec(eng)
        submit(eng, long_p + ids(extra, seed=521), params, r)
        r.wait()
        assert r.tokens == reference(ref_model, long_p + ids(extra, seed=521), params)[0]
    assert eng.stats.cached_prompt_tokens == 0
    off = engines(max_concurrency=1, prefix_caching=False)
    for _ in range(2):
        r = Rec(off)
        submit(off, ids(10, seed=522), params, r)
        r.wait()
    assert off.stats.cached_prompt_tokens == 0


# ---------------------------------------------------------------------------------------------
# chunked prefill and the paged cache give the logits of one whole forward
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_chunked_prefill_and_paged_decode_equal_whole_forwards(model, monkeypatch, chunk):
    """A 100-token prompt (past training_seqlen 32, so every chunk must use the whole prompt's NTK
    scaling) prefilled in chunks of 1, 7 or 64 tokens (None: adaptive) gives the last-position
    logits of one uncached forward; each decode step on the paged cache then gives the logits of a
    contiguous-cache (DenseKV) decode of the same tokens."""
    import telechat.engine as engine_mod

    seen = []
    real = engine_mod.process_rows
    monkeypatch.setattr(engine_mod, "process_rows", lambda logits, *a: (seen.append(logits.clone()),
                                                                         real(logits, *a))[1])
    prompt = ids(100, 600)
    other = ids(45, 601)  # decoding beside it, so chunks share steps with a decode row
    eng = Engine(model, prefill_budget=chunk, block_size=16, compile=False)
    rows = [[], []]
    seqs = []
    for step in eng.iter_tokens([other, prompt], [SamplingParams(max_new_tokens=6)] * 2, sequences=seqs):
        for i, t in enumerate(step):
            if t is not None:
                rows[i].append(t)
    with torch.inference_mode():
        whole = model(torch.tensor([prompt]))[0, -1].float()
        cache = DenseKV(model.config, 1, 120, model.dtype)
        want = [model(torch.tensor([prompt]), cache=cache.at(torch.arange(100)), last_only=True)[0, -1].float()]
        for i, tok in enumerate(rows[1][:-1]):
            want.append(model(torch.tensor([[tok]]), cache=cache.at(torch.tensor([100 + i])))[0, -1].float())
    torch.testing.assert_close(want[0], whole, rtol=1e-4, atol=1e-4)
    got = [lg[-1] if lg.shape[0] == 2 else lg[0] for lg in seen]  # the prompt's row comes last once both run
    mine = [g for g in got if any(torch.allclose(g, w, rtol=1e-4, atol=1e-4) for w in want)]
    assert len(mine) == len(want) == 6
    for g, w in zip(mine, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert rows[1] == reference(model, prompt, SamplingParams(max_new_tokens=6))[0]


# ---------------------------------------------------------------------------------------------
# KV memory grows with the tokens in use; admission by free memory; preemption is exact
# ---------------------------------------------------------------------------------------------
def test_64_short_chats_on_an_8k_model_hold_what_they_use():
    llm = telechat.from_preset("tiny", seed=3, seq_length=8192)
    # All submitted before the thread starts, and room to prefill every prompt in the first step.
    eng = Engine(llm.model, max_concurrency=64, max_queue=0, compile=False, prefill_budget=1024, autostart=False)
    reached, release = threading.Event(), threading.Event()
    peak = {}

    def hook(rec, kind, value):
        if kind == "token" and len(rec.tokens) == 2 and eng.running == 64 and not reached.is_set():
            peak.update(eng.kv_usage())
            reached.set()
    recs = [Rec(eng, f"c{i}", hook=hook) for i in range(64)]
    for i, r in enumerate(recs):
        submit(eng, ids(12, 700 + i), SamplingParams(max_new_tokens=4), r, max_len=8192)
    eng.start()
    for r in recs:
        r.wait()
    eng.stop()
    assert reached.is_set() and all(r.final == ("done", "length") for r in recs)
    positions = peak["allocated_blocks"] * peak["block_size"]
    assert peak["used_blocks"] == 64  # one 16-token block per chat
    assert positions <= 64 * 64 < 64 * 8192 // 100  # not 64 x 8K reserved


def test_admission_waits_for_kv_memory_and_preemption_recomputes_exactly(model, ref_model):
    """A pool of 96 positions (6 blocks) cannot hold three 50-token sequences at once: the third
    waits for memory at admission, and when the two running ones outgrow the pool one of them is
    preempted and recomputed later; every one still emits exactly what it emits alone."""
    eng = Engine(model, max_concurrency=3, kv_cache_tokens=96, prefill_budget=512, compile=False, autostart=False)
    specs = [(ids(20, 800 + i), SamplingParams(max_new_tokens=30)) for i in range(3)]
    running: list[int] = []
    recs = [Rec(eng, f"m{i}", hook=lambda rec, kind, value: running.append(eng.running)) for i in range(3)]
    for (p, sp), r in zip(specs, recs):
        submit(eng, p, sp, r)
    eng.start()
    for r in recs:
        r.wait()
    eng.stop()
    for (p, sp), r in zip(specs, recs):
        assert (r.tokens, r.final) == (reference(ref_model, p, sp)[0], ("done", "length"))
    assert eng.kv_usage()["allocated_blocks"] <= 7 and eng.stats.preempted >= 1
    assert max(running) == 2  # the third was not admitted beside the first two
    with pytest.raises(ValueError, match="KV memory"):  # can never fit: refused at submit
        Engine(model, kv_cache_tokens=32, compile=False).submit(
            Sequence(ids(30, 1), SamplingParams(max_new_tokens=10), lambda *a: None))

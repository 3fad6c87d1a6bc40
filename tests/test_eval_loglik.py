"""The log-likelihood engine: batched, unbatched and prefix-shared scores all equal a plain forward
of each request; the shared prefix is computed once; sliding windows score every token once."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import telechat
from telechat.eval.loglik import LoglikEngine, rolling_windows


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny matrices: one thread avoids OpenMP hand-offs that dominate on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    """Tiny random TeleChat (vocab 512, training_seqlen 32, so NTK scaling changes past 32 tokens),
    weights scaled up so that scores differ clearly between tokens."""
    llm = telechat.from_preset("tiny", seed=0)
    with torch.no_grad():
        for n, p in llm.model.named_parameters():
            if n.endswith("weight") and "norm" not in n and "ln_f" not in n:
                p.mul_(8)
            elif n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return llm.model


def reference(model, ctx, cont):
    """log p(cont | ctx) and greedy-ness from one plain forward over context + continuation."""
    logp = F.log_softmax(model(torch.tensor([ctx + cont]))[0].double(), -1)
    rows = logp[len(ctx) - 1: len(ctx) - 1 + len(cont)]
    target = torch.tensor(cont)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def make_requests(seed=0, shared_len=20, items=6):
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(6, 512) for _ in range(n)]  # noqa: E731
    shared = tok(shared_len)
    reqs = []
    for _ in range(items):
        ctx = shared + tok(rng.randrange(1, 8))
        for _ in range(4):  # multi-token options
            reqs.append((ctx, tok(rng.randrange(1, 5))))
        reqs += [(ctx, [7]), (ctx, [8])]  # one-token options: one row for both
    reqs.append((reqs[0][0], reqs[0][1] + [9, 10]))  # extends another request's tokens
    reqs += [(tok(rng.randrange(1, 30)), tok(rng.randrange(1, 5))) for _ in range(5)]  # unrelated
    return reqs


@pytest.fixture(scope="module")
def reqs_and_refs(model):
    reqs = make_requests()
    with torch.no_grad():
        return reqs, [reference(model, c, k) for c, k in reqs]


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_scores_equal_plain_forward(model, reqs_and_refs, share, batch_size):
    reqs, want = reqs_and_refs
    engine = LoglikEngine(model, batch_size=batch_size, share_prefix=share, min_shared=4, max_length=512)
    got = engine.loglikelihood(reqs)
    for (s, g), (ws, wg) in zip(got, want):
        assert s == pytest.approx(ws, abs=1e-4)
        assert g == wg
    # the same engine again (cached prefix from the first call), in another order
    again = engine.loglikelihood(reqs[::-1])[::-1]
    assert max(abs(a[0] - b[0]) for a, b in zip(again, got)) < 1e-4


def test_prefix_is_computed_once_and_saves_work(model):
    reqs = make_requests(shared_len=12, items=8)  # totals <= 32: one RoPE scaling for all
    shared = LoglikEngine(model, batch_size=4, share_prefix=True, min_shared=4, max_length=512)
    plain = LoglikEngine(model, batch_size=4, share_prefix=False, max_length=512)
    a, b = shared.loglikelihood(reqs), plain.loglikelihood(reqs)
    assert max(abs(x[0] - y[0]) for x, y in zip(a, b)) < 1e-4
    assert max(len(c) + len(k) for c, k in reqs) <= 32
    # the 12 shared tokens (plus what the 8 items' contexts share by chance) are prefilled once
    assert 12 <= shared.stats["prefix_tokens"] < 12 + 8
    assert shared.stats["tokens_computed"] < plain.stats["tokens_computed"] / 2
    # one-token options after one context share one row
    assert plain.stats["rows"] < len(reqs)


def test_across_the_rope_scaling_boundary(model):
    """Totals on both sides of training_seqlen (32): rows are only grouped with the same RoPE
    scaling, and each uses the tables of its own plain forward."""
    rng = random.Random(1)
    shared = [rng.randrange(6, 512) for _ in range(26)]
    reqs = []
    for _ in range(5):
        ctx = shared + [rng.randrange(6, 512) for _ in range(rng.randrange(1, 5))]
        reqs += [(ctx, [rng.randrange(6, 512) for _ in range(rng.randrange(1, 9))]) for _ in range(3)]
    totals = {len(c) + len(k) for c, k in reqs}
    assert min(totals) <= 32 < max(totals)
    want = [reference(model, c, k)[0] for c, k in reqs]
    for share in (True, False):
        got = LoglikEngine(model, batch_size=4, share_prefix=share, min_shared=4, max_length=512).loglikelihood(reqs)
        assert max(abs(g[0] - w) for g, w in zip(got, want)) < 1e-4


def test_survives_generation_in_between(model):
    reqs = make_requests(seed=3)
    engine = LoglikEngine(model, batch_size=4, min_shared=4, max_length=512)
    first = engine.loglikelihood(reqs)
    llm = telechat.LLM(model)
    llm.generate(torch.tensor([[10, 11, 12]]), max_new_tokens=5, eos_token_id=-1)  # replaces the KV cache
    second = engine.loglikelihood(reqs)
    assert max(abs(a[0] - b[0]) for a, b in zip(first, second)) < 1e-4


def test_truncation_and_errors(model):
    engine = LoglikEngine(model, batch_size=2, max_length=16)
    ctx, cont = list(range(10, 40)), [50, 51]
    (s, _), = engine.loglikelihood([(ctx, cont)])
    # keeps the newest 16 tokens of context + continuation[:-1]
    kept = (ctx + cont[:-1])[-16:]
    assert s == pytest.approx(reference(model, kept[:-1], cont)[0], abs=1e-4)
    with pytest.raises(ValueError, match="request 0: the continuation is empty"):
        engine.loglikelihood([([1, 2], [])])
    with pytest.raises(ValueError, match="request 0: the context is empty"):
        engine.loglikelihood([([], [5])])
    with pytest.raises(ValueError, match="does not fit in max_length 16"):
        engine.loglikelihood([([1, 2], list(range(20, 40)))])


def test_rolling_windows_cover_every_token_once():
    toks = list(range(100, 137))  # 37 tokens
    for max_len, stride in ((8, 8), (8, 3), (8, 1), (64, 32), (5, 4)):
        wins = rolling_windows(toks, 1, max_len, stride)
        scored = [t for _, cont in wins for t in cont]
        assert scored == toks
        for ctx, cont in wins:
            assert 1 <= len(ctx) and len(ctx) + len(cont) <= max_len
        if stride < max_len and len(wins) > 1:  # later windows keep max_len - stride tokens of context
            assert all(len(ctx) >= max_len - stride for ctx, _ in wins[1:])
    assert rolling_windows(toks, 1, 64, 64)[0] == ([1], toks)
    with pytest.raises(ValueError, match="stride must be in 1..max_length"):
        rolling_windows(toks, 1, 8, 9)


def test_rolling_perplexity_matches_plain_forward(model):
    toks = [random.Random(5).randrange(6, 512) for _ in range(40)]
    full = F.log_softmax(model(torch.tensor([[1] + toks]))[0].double(), -1)
    want = float(full[:-1].gather(1, torch.tensor(toks)[:, None]).sum())
    engine = LoglikEngine(model, batch_size=4, max_length=64)
    got = sum(s for s, _ in engine.loglikelihood(rolling_windows(toks, 1, 64, 64)))
    assert got == pytest.approx(want, abs=1e-4)
    # with windows shorter than the text, the windows see less context: the total changes but stays finite
    short = sum(s for s, _ in engine.loglikelihood(rolling_windows(toks, 1, 16, 8)))
    assert short != pytest.approx(want, abs=1e-3) and short < 0

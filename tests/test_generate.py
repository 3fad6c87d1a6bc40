"""Generation: greedy/sampled decoding over the KV cache against hand-written loops, stop ids,
sampling parameters, logits processing against transformers, torch.compile, and HF parity."""
from __future__ import annotations

import math

import pytest
import torch

import telechat
from telechat.generate import SamplingParams, process_logits, resolve_params


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def lively(llm: telechat.LLM, factor: float = 8.0) -> telechat.LLM:
    """Scale every projection/embedding weight: at init std 0.02 a random model emits one token
    forever, which would hide decoding bugs; scaled up it produces varied, input-dependent text."""
    with torch.no_grad():
        for n, p in llm.model.named_parameters():
            if n.endswith("weight") and "norm" not in n and "ln_f" not in n:
                p.mul_(factor)
    return llm


@pytest.fixture()
def llm(tiny) -> telechat.LLM:
    """The tiny checkpoint (vocab 512, T = B = 32; pad 3, eos 2, user 4), made lively."""
    return lively(tiny)


def prompts(B: int, T: int, seed: int = 0, vocab: int = 512) -> torch.Tensor:
    # avoid the special ids 0..5 in prompts so that nothing depends on them
    return torch.randint(6, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def spec_cos_sin(config, positions, total_len: int):
    """cos/sin per spec section 3 (independent of telechat.model.rope_cos_sin)."""
    d, T, B = config.head_dim, config.training_seqlen, config.rope_base_seqlen
    L = max(total_len, T)
    alpha = max(1, 2 ** math.ceil(math.log2(L / B) + 1) - 1)
    base = config.rope_theta * alpha ** (d / (d - 2))
    mscale = 1.0 if L <= T else 0.1 * math.log(L / T) + 1.0
    inv_freq = torch.tensor([base ** (-2.0 * j / d) for j in range(d // 2)], dtype=torch.float64)
    theta = torch.as_tensor(list(positions), dtype=torch.float64)[:, None] * inv_freq
    emb = torch.cat([theta, theta], -1)
    return emb.cos() * mscale, emb.sin() * mscale


def greedy_reference(model, ids: torch.Tensor, n: int, penalty: float = 1.0, cached_rope: bool = False):
    """Greedy decoding by re-running the uncached forward on the whole sequence every step.

    cached_rope: give each position the RoPE scaling the KV-cache path uses (prompt rows:
    scaling(prompt length); a later token at position p: scaling(p + 1)), needed past training_seqlen.
    """
    seq = ids.clone()
    T = ids.shape[1]
    for _ in range(n):
        L = seq.shape[1]
        rope = None
        if cached_rope:
            cs = [spec_cos_sin(model.config, range(T), T)]
            cs += [spec_cos_sin(model.config, [p], p + 1) for p in range(T, L)]
            rope = (torch.cat([c for c, _ in cs]).float(), torch.cat([s for _, s in cs]).float())
        logits = model(seq, rope=rope)[:, -1].double()
        if penalty != 1.0:
            for b in range(seq.shape[0]):
                for t in set(seq[b].tolist()):
                    s = logits[b, t]
                    logits[b, t] = s * penalty if s < 0 else s / penalty
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq


# ---------------------------------------------------------------------------------------------
# greedy
# ---------------------------------------------------------------------------------------------
def test_greedy_matches_uncached_loop_within_training_seqlen(llm):
    ids = prompts(2, 8)
    out = llm.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=-1)
    assert out.shape == (2, 32) and out.dtype == torch.long
    assert torch.equal(out[:, :8], ids)
    assert len(set(out[0, 8:].tolist())) > 5  # the lively model really varies its output
    assert torch.equal(out, greedy_reference(llm.model, ids, 24))
    assert torch.equal(llm.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=-1), out)


def test_greedy_past_training_seqlen_uses_total_length_rope(llm):
    ids = prompts(2, 20, seed=1)
    out = llm.generate(ids, max_new_tokens=40, eos_token_id=-1)
    assert out.shape == (2, 60)
    assert torch.equal(out, greedy_reference(llm.model, ids, 40, cached_rope=True))


def test_stream_yields_the_generated_tokens(llm):
    ids = prompts(2, 8, seed=2)
    out = llm.generate(ids, max_new_tokens=10, eos_token_id=-1)
    steps = list(llm.stream(ids, max_new_tokens=10, eos_token_id=-1))
    assert len(steps) == 10
    assert torch.equal(torch.stack(steps, 1), out[:, 8:])


def test_batched_equals_rows_alone(llm):
    ids = prompts(3, 10, seed=3)
    out = llm.generate(ids, max_new_tokens=15, eos_token_id=-1)
    for b in range(3):
        assert torch.equal(out[b:b + 1], llm.generate(ids[b:b + 1], max_new_tokens=15, eos_token_id=-1))
    assert not torch.equal(out[0, 10:], out[1, 10:])


def test_left_padded_batch_equals_rows_alone(llm):
    lens = [10, 7, 4]
    rows = [prompts(1, n, seed=10 + n) for n in lens]
    ids = torch.full((3, 10), 3, dtype=torch.long)
    mask = torch.zeros(3, 10, dtype=torch.long)
    for b, (r, n) in enumerate(zip(rows, lens)):
        ids[b, 10 - n:] = r[0]
        mask[b, 10 - n:] = 1
    out = llm.generate(ids, max_new_tokens=12, eos_token_id=-1, attention_mask=mask)
    assert out.shape == (3, 22)
    for b, r in enumerate(rows):
        alone = llm.generate(r, max_new_tokens=12, eos_token_id=-1)
        assert torch.equal(out[b, 10:], alone[0, r.shape[1]:])


# ---------------------------------------------------------------------------------------------
# stop ids
# ---------------------------------------------------------------------------------------------
def _stop_case(free: torch.Tensor, T: int):
    """(k, tok): row 0 emits tok first at step k >= 2 and the other rows never emit it."""
    gen = free[:, T:]
    for k in range(2, gen.shape[1] - 2):
        tok = int(gen[0, k])
        if tok not in gen[0, :k].tolist() and tok not in gen[1:].flatten().tolist():
            return k, tok
    pytest.fail("no usable stop token in the free-running output")


def test_stop_id_stops_row_and_pads(llm):
    T, n, pad = 8, 14, llm.generation_config["pad_token_id"]
    ids = prompts(3, T, seed=4)
    free = llm.generate(ids, max_new_tokens=n, eos_token_id=-1)
    k, tok = _stop_case(free, T)
    out = llm.generate(ids, max_new_tokens=n, eos_token_id=tok)
    assert out.shape == (3, T + n)  # the other rows keep going
    assert torch.equal(out[0, :T + k + 1], free[0, :T + k + 1])  # the stop token itself is kept
    assert out[0, T + k] == tok
    assert (out[0, T + k + 1:] == pad).all()
    assert torch.equal(out[1:], free[1:])
    # alone, the row ends right after its stop token
    alone = llm.generate(ids[:1], max_new_tokens=n, eos_token_id=tok)
    assert torch.equal(alone, free[:1, :T + k + 1])
    # a list of stop ids: the earliest one wins
    later = int(free[0, T + k + 1])
    alone = llm.generate(ids[:1], max_new_tokens=n, eos_token_id=[later, tok])
    assert alone.shape[1] <= T + k + 1


def test_eos_minus_one_forces_max_new_tokens_and_none_uses_checkpoint_stops(llm):
    T, n = 8, 14
    ids = prompts(1, T, seed=5)
    free = llm.generate(ids, max_new_tokens=n, eos_token_id=-1)
    assert free.shape == (1, T + n)
    gen = free[0, T:].tolist()
    k = next(i for i in range(2, n) if gen[i] not in gen[:i])
    tok = gen[k]
    unused = next(t for t in range(6, 512) if t not in gen)

    llm.generation_config["eos_token_id"] = tok
    assert torch.equal(llm.generate(ids, max_new_tokens=n), free[:, :T + k + 1])
    assert torch.equal(llm.generate(ids, max_new_tokens=n, eos_token_id=None), free[:, :T + k + 1])
    assert torch.equal(llm.generate(ids, max_new_tokens=n, eos_token_id=-1), free)

    llm.generation_config["eos_token_id"] = unused
    assert torch.equal(llm.generate(ids, max_new_tokens=n), free)
    llm.generation_config["user_token_id"] = tok  # <_user> also ends the answer
    assert torch.equal(llm.generate(ids, max_new_tokens=n), free[:, :T + k + 1])
    assert torch.equal(llm.generate(ids, max_new_tokens=n, eos_token_id=-1), free)
    assert torch.equal(llm.generate(ids, max_new_tokens=n, eos_token_id=unused), free)


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
def _sample(llm, ids, **kw):
    kw = {"max_new_tokens": 16, "do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
          "eos_token_id": -1, **kw}
    return llm.generate(ids, **kw)


def test_sampling_seeded(llm):
    ids = prompts(2, 8, seed=6)
    a = _sample(llm, ids, seed=123)
    assert torch.equal(a, _sample(llm, ids, seed=123))
    b = _sample(llm, ids, seed=124)
    assert not torch.equal(a[:, 8:], b[:, 8:])
    greedy = llm.generate(ids, max_new_tokens=16, eos_token_id=-1)
    assert not torch.equal(a, greedy)


def test_degenerate_sampling_is_greedy(llm):
    ids = prompts(2, 8, seed=7)
    greedy = llm.generate(ids, max_new_tokens=16, eos_token_id=-1)
    assert torch.equal(_sample(llm, ids, top_k=1, seed=1), greedy)
    assert torch.equal(_sample(llm, ids, top_p=1e-6, seed=2), greedy)
    assert torch.equal(_sample(llm, ids, temperature=1e-4, seed=3), greedy)


def test_top_k_sampling_stays_in_top_k(llm):
    ids = prompts(2, 8, seed=8)
    out = _sample(llm, ids, top_k=3, seed=9, max_new_tokens=20)
    for j in range(8, 28):
        top3 = llm.model(out[:, :j])[:, -1].topk(3).indices
        assert (top3 == out[:, j:j + 1]).any(-1).all()
    assert len(set(out[0, 8:].tolist())) > 3


def test_repetition_penalty_in_greedy_generate(llm):
    ids = prompts(2, 8, seed=9)
    plain = llm.generate(ids, max_new_tokens=20, eos_token_id=-1)
    pen = llm.generate(ids, max_new_tokens=20, eos_token_id=-1, repetition_penalty=2.0)
    assert torch.equal(pen, greedy_reference(llm.model, ids, 20, penalty=2.0))
    assert not torch.equal(pen, plain)


def test_repetition_penalty_constructed_logits():
    logits = torch.zeros(1, 10)
    logits[0, 4], logits[0, 7], logits[0, 1] = 2.0, 1.9, -1.0
    tokens = torch.tensor([[4, 4, 1]])  # 4 seen twice: penalised once, like transformers
    p = SamplingParams(repetition_penalty=1.1, temperature=0.5, top_k=1)  # greedy: no temperature/top-k
    out = process_logits(logits, tokens, p)
    assert out[0, 4].item() == pytest.approx(2.0 / 1.1)
    assert out[0, 1].item() == pytest.approx(-1.1)
    assert out[0, 7].item() == pytest.approx(1.9) and out[0, 0].item() == 0.0
    assert out.argmax(-1).item() == 7
    assert process_logits(logits, tokens, SamplingParams()).argmax(-1).item() == 4
    assert torch.equal(logits[0, :2], torch.tensor([0.0, -1.0]))  # input not modified in place


@pytest.mark.parametrize("penalty,temperature,top_k,top_p", [
    (1.3, 0.7, 10, 0.9), (0.8, 1.5, 0, 0.5), (1.0, 1.0, 5, 1.0), (1.2, 1.0, 0, 0.3), (1.05, 0.3, 50, 0.85),
])
def test_process_logits_matches_transformers(penalty, temperature, top_k, top_p):
    lp = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(int(penalty * 100 + top_k))
    logits = torch.randn(4, 200, generator=g) * 3
    tokens = torch.randint(0, 60, (4, 12), generator=g)
    p = SamplingParams(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                       repetition_penalty=penalty)
    out = process_logits(logits.clone(), tokens, p)
    ref = logits.clone()
    if penalty != 1.0:
        ref = lp.RepetitionPenaltyLogitsProcessor(penalty)(tokens, ref)
    if temperature != 1.0:
        ref = lp.TemperatureLogitsWarper(temperature)(tokens, ref)
    if top_k:
        ref = lp.TopKLogitsWarper(top_k)(tokens, ref)
    if top_p < 1.0:
        ref = lp.TopPLogitsWarper(top_p)(tokens, ref)
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    assert (torch.isinf(out) <= (out < 0)).all()  # only -inf
    fin = torch.isfinite(ref)
    assert fin.sum() < ref.numel() or (top_k == 0 and top_p == 1.0)
    assert torch.allclose(out[fin], ref[fin], atol=1e-6)
    # greedy: only the repetition penalty applies
    greedy = process_logits(logits.clone(), tokens, SamplingParams(temperature=temperature, top_k=top_k,
                                                                   top_p=top_p, repetition_penalty=penalty))
    ref = lp.RepetitionPenaltyLogitsProcessor(penalty)(tokens, logits.clone())
    assert torch.allclose(greedy, ref, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# parameters
# ---------------------------------------------------------------------------------------------
def test_resolve_params_defaults_from_generation_config(tiny):
    gc = tiny.generation_config
    p = tiny.sampling_params()
    # max_length bounds prompt + answer, so only callers that know the prompt (generate, chat) apply it.
    assert p.max_new_tokens == 256 and gc["max_length"] == 32
    assert tiny.generate([5, 6, 7], eos_token_id=-1).shape == (1, 32)
    assert p.do_sample is False and p.repetition_penalty == 1.0
    assert p.stop_ids == sorted({gc["eos_token_id"], gc["user_token_id"]}) == [2, 4]
    assert p.pad_id == gc["pad_token_id"] == 3
    gc.update({"do_sample": True, "temperature": 0.3, "top_k": 5, "top_p": 0.85, "repetition_penalty": 1.01})
    p = tiny.sampling_params()
    assert (p.do_sample, p.temperature, p.top_k, p.top_p, p.repetition_penalty) == (True, 0.3, 5, 0.85, 1.01)


def test_resolve_params_overrides_win(tiny):
    tiny.generation_config.update({"do_sample": True, "temperature": 0.3, "top_k": 5, "top_p": 0.85})
    p = tiny.sampling_params(do_sample=False, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=7,
                             repetition_penalty=1.2, eos_token_id=[9, 7, -1, 100000], seed=5)
    assert (p.do_sample, p.temperature, p.top_k, p.top_p) == (False, 0.7, 0, 1.0)
    assert (p.max_new_tokens, p.repetition_penalty, p.seed) == (7, 1.2, 5)
    assert p.stop_ids == [7, 9]  # out-of-vocabulary ids dropped
    assert tiny.sampling_params(eos_token_id=-1).stop_ids == []
    assert tiny.sampling_params(eos_token_id=11).stop_ids == [11]
    # None means "default", not "unset"
    assert tiny.sampling_params(temperature=None).temperature == 0.3
    p = resolve_params({"max_length": 100, "eos_token_id": 2, "pad_token_id": 0}, 512, max_new_tokens=5)
    assert (p.max_new_tokens, p.stop_ids, p.pad_id) == (5, [2], 0)


@pytest.mark.parametrize("kw", [
    {"do_sample": True, "temperature": 0.0}, {"do_sample": True, "temperature": -1.0},
    {"top_p": 0.0}, {"top_p": 1.5}, {"top_p": -0.1}, {"top_k": -1},
    {"repetition_penalty": 0.0}, {"repetition_penalty": -1.0}, {"max_new_tokens": -1},
])
def test_invalid_params_raise(tiny, kw):
    with pytest.raises(ValueError):
        tiny.sampling_params(**kw)
    with pytest.raises(ValueError):
        tiny.generate([10, 11, 12], **kw)


def test_temperature_zero_is_fine_for_greedy(tiny):
    assert tiny.sampling_params(do_sample=False, temperature=0.0).temperature == 0.0


def test_input_forms_and_zero_new_tokens(llm):
    ids = prompts(1, 6, seed=10)
    ref = llm.generate(ids, max_new_tokens=5, eos_token_id=-1)
    assert torch.equal(llm.generate(ids[0].tolist(), max_new_tokens=5, eos_token_id=-1), ref)
    assert torch.equal(llm.generate(ids[0], max_new_tokens=5, eos_token_id=-1), ref)
    out = llm.generate(ids[0].tolist(), max_new_tokens=0)
    assert torch.equal(out, ids)
    assert list(llm.stream(ids, max_new_tokens=0)) == []


def test_default_max_new_tokens_fills_max_length(llm):
    ids = prompts(1, 10, seed=11)
    assert llm.generate(ids, eos_token_id=-1).shape == (1, llm.generation_config["max_length"])


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_decode_matches_eager():
    llm = _small()  # non-zero biases: the compiled one-row Linear path must add them too
    for B in (1, 2):
        ids = prompts(B, 9, seed=B, vocab=4096)
        eager = llm.generate(ids, max_new_tokens=12, eos_token_id=-1)
        compiled = llm.generate(ids, max_new_tokens=12, eos_token_id=-1, compile=True)
        assert len(set(eager[0, 9:].tolist())) > 2
        assert torch.equal(compiled, eager)


# ---------------------------------------------------------------------------------------------
# transformers parity (LlamaForCausalLM with the same weights)
# ---------------------------------------------------------------------------------------------
def _small(**overrides) -> telechat.LLM:
    llm = telechat.from_preset("small", seed=21, **overrides)
    g = torch.Generator().manual_seed(22)
    with torch.no_grad():
        for n, p in llm.model.named_parameters():
            if n.endswith("bias") or "layernorm" in n or "ln_f" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return lively(llm, 4.0)


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": False}, {"num_key_value_heads": 2}],
                         ids=["tied", "untied", "gqa2"])
def test_hf_llama_parity(overrides):
    pytest.importorskip("transformers")
    from telechat.hf import to_hf_llama

    llm = _small(**overrides)
    assert llm.model.transformer.h[0].self_attention.dense.bias.abs().sum() > 0
    hf = to_hf_llama(llm.model)
    hf.generation_config.eos_token_id = None
    ids = prompts(2, 10, seed=23, vocab=4096)

    ours = llm.model(ids)
    theirs = hf(input_ids=ids).logits
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-5

    # with left padding (HF numbers positions by index too when position_ids are not given)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ours = llm.model(ids, attention_mask=mask)
    theirs = hf(input_ids=ids, attention_mask=mask).logits
    assert ((ours[1, 4:] - theirs[1, 4:]).abs().max() / theirs[1, 4:].abs().max()).item() < 1e-5

    out = llm.generate(ids, max_new_tokens=20, eos_token_id=-1)
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                      min_new_tokens=20, eos_token_id=None, pad_token_id=3)
    assert len(set(out[0, 10:].tolist())) > 3
    assert torch.equal(out, ref)


# ---------------------------------------------------------------------------------------------
# regressions: bugs found by these tests and fixed
# ---------------------------------------------------------------------------------------------
def test_stream_honours_attention_mask(llm):
    ids = prompts(1, 6, seed=30)
    padded = torch.cat([prompts(1, 4, seed=31), ids], 1)
    mask = torch.tensor([[0] * 4 + [1] * 6])
    ref = llm.generate(ids, max_new_tokens=8, eos_token_id=-1)[:, 6:]
    assert torch.equal(llm.generate(padded, max_new_tokens=8, eos_token_id=-1, attention_mask=mask)[:, 10:], ref)
    out = torch.stack(list(llm.stream(padded, max_new_tokens=8, eos_token_id=-1, attention_mask=mask)), 1)
    assert torch.equal(out, ref)


def test_generation_config_eos_list():
    p = resolve_params({"eos_token_id": [2, 7], "user_token_id": 4}, 512)
    assert p.stop_ids == [2, 4, 7]


def test_unknown_generation_arguments_are_rejected(llm):
    with pytest.raises(TypeError, match="max_new_tokenz"):
        llm.stream([1, 2, 3], max_new_tokenz=5)


def test_generation_config_max_new_tokens(tiny):
    tiny.generation_config.update({"max_new_tokens": 3, "max_length": 20})
    assert tiny.sampling_params().max_new_tokens == 3
    assert tiny.generate([7, 8, 9, 10], eos_token_id=-1).shape == (1, 7)


@pytest.mark.slow
def test_compiled_engine_steps_equal_eager_with_padding_rows_and_stops(llm):
    """The compiled decode step pads the batch to a bucketed size (3 rows run as 4, then 2 as 2,
    1 as 1) and takes rotary tables from outside: the tokens equal the eager engine's, each row
    stopping at its own step, also past training_seqlen (32) where each step's NTK scaling differs."""
    from telechat.engine import Engine

    ids = prompts(3, 24, seed=5).tolist()
    p = SamplingParams(max_new_tokens=20, stop_ids=[], pad_id=3)
    free = list(Engine(llm.model, compile=False).iter_tokens(ids, [p] * 3, max_len=44))
    assert len(free) == 20
    stops = SamplingParams(max_new_tokens=20, stop_ids=sorted({free[4][0], free[9][1], free[13][2]}))
    runs = {c: list(Engine(llm.model, compile=c).iter_tokens(ids, [stops] * 3, max_len=44)) for c in (False, True)}
    assert runs[True] == runs[False]
    assert len(runs[False]) < 20 and runs[False][-1].count(None) < 3  # rows ended at different steps
    assert list(Engine(llm.model, compile=True).iter_tokens(ids, [p] * 3, max_len=44)) == free

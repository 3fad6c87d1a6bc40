"""The decoder itself: an independent reference forward, the KV cache, RoPE/NTK scaling, GQA, dtypes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import telechat
from telechat.hf import merge_key_value, split_key_value
from telechat.kv import DenseKV, PagedKV, causal_mask
from telechat.model import RMSNorm, causal_lm_loss, rope_cos_sin


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# ---------------------------------------------------------------------------------------------
# helpers: an implementation of the spec written independently of telechat.model
# ---------------------------------------------------------------------------------------------
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference relative to the reference's max magnitude."""
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def make(name: str = "tiny", seed: int = 0, dtype=torch.float32, sharp: float = 6.0, **overrides) -> telechat.LLM:
    """A random model whose biases and norm weights are non-zero (so they are really exercised) and
    whose query/key_value weights are scaled by `sharp`, so attention is peaked and depends strongly
    on RoPE (with init std 0.02 it is nearly uniform and position errors would hide under 1e-3)."""
    llm = telechat.from_preset(name, seed=seed, dtype=torch.float32, **overrides)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for n, p in llm.model.named_parameters():
            if n.endswith("bias") or "layernorm" in n or "ln_f" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            if n.endswith(("query.weight", "key_value.weight")):
                p.mul_(sharp)
    llm.model.to(dtype)
    return llm


def random_ids(vocab: int, *shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def spec_scaling(total_len: int, training_seqlen: int, base_seqlen: int, d: int, theta: float = 10000.0):
    """(alpha, base', mscale) from spec section 3, written out from scratch."""
    L = max(total_len, training_seqlen)
    alpha = max(1, 2 ** math.ceil(math.log2(L / base_seqlen) + 1) - 1)
    base = theta * alpha ** (d / (d - 2))
    mscale = 1.0 if L <= training_seqlen else 0.1 * math.log(L / training_seqlen) + 1.0
    return alpha, base, mscale


def spec_cos_sin(config, positions, total_len: int):
    """fp64 cos/sin [len(positions), d] per the spec (rotate-half layout, both scaled by mscale)."""
    d = config.head_dim
    _, base, mscale = spec_scaling(total_len, config.training_seqlen, config.rope_base_seqlen, d, config.rope_theta)
    inv_freq = torch.tensor([base ** (-2.0 * j / d) for j in range(d // 2)], dtype=torch.float64)
    theta = torch.as_tensor(positions, dtype=torch.float64)[:, None] * inv_freq
    emb = torch.cat([theta, theta], dim=-1)
    return emb.cos() * mscale, emb.sin() * mscale


def per_chunk_rope(config, chunks: list[int]):
    """The cos/sin each position gets in cached decoding: a chunk ending at kv_len uses scaling(kv_len)."""
    cos, sin, start = [], [], 0
    for n in chunks:
        c, s = spec_cos_sin(config, range(start, start + n), start + n)
        cos.append(c)
        sin.append(s)
        start += n
    return torch.cat(cos).float(), torch.cat(sin).float()


def manual_forward(model: telechat.TeleChat, ids: torch.Tensor) -> torch.Tensor:
    """fp64 reference forward from the spec, slicing K_h/V_h out of key_value row by row."""
    c = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    B, L = ids.shape
    N, G, d, eps = c.n_head, c.n_kv_head, c.head_dim, c.layer_norm_epsilon
    cos, sin = spec_cos_sin(c, range(L), L)

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    def rope(x):  # [B, L, d]
        half = d // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    causal = torch.ones(L, L, dtype=torch.bool).tril()
    h = sd["transformer.word_embeddings.weight"][ids]
    for i in range(c.n_layer):
        p = f"transformer.h.{i}."
        x = rms(h, sd[p + "input_layernorm.weight"])
        Wq, Wkv = sd[p + "self_attention.query.weight"], sd[p + "self_attention.key_value.weight"]
        heads = []
        for hd in range(N):
            g = hd // (N // G)  # the KV head this query head shares
            q = rope(x @ Wq[hd * d:(hd + 1) * d].T)
            k = rope(x @ Wkv[2 * g * d:2 * g * d + d].T)
            v = x @ Wkv[2 * g * d + d:2 * g * d + 2 * d].T
            s = (q @ k.transpose(-1, -2)) / math.sqrt(d)
            s = s.masked_fill(~causal, float("-inf"))
            heads.append(s.softmax(-1) @ v)
        y = torch.cat(heads, dim=-1)  # head-major merge
        h = h + y @ sd[p + "self_attention.dense.weight"].T
        if c.bias:
            h = h + sd[p + "self_attention.dense.bias"]
        x = rms(h, sd[p + "post_attention_layernorm.weight"])
        m = F.silu(x @ sd[p + "mlp.gate_proj.weight"].T) * (x @ sd[p + "mlp.up_proj.weight"].T)
        h = h + m @ sd[p + "mlp.down_proj.weight"].T
        if c.bias:
            h = h + sd[p + "mlp.down_proj.bias"]
    head = sd["transformer.word_embeddings.weight"] if c.tie_word_embeddings else sd["lm_head.weight"]
    return rms(h, sd["transformer.ln_f.weight"]) @ head.T


def cached_logits(model, ids, chunks, max_len=None, attention_mask=None, kv=None):
    """Run `ids` through a DenseKV (of the model's dtype unless `kv` is given) in chunks of the
    given sizes; logits of every position."""
    B, N = ids.shape
    assert sum(chunks) == N
    kv = kv or DenseKV(model.config, B, max_len or N, model.dtype)
    out, start = [], 0
    for n in chunks:
        pos = torch.arange(start, start + n)
        out.append(model(ids[:, start:start + n], cache=kv.at(pos, attention_mask=attention_mask)))
        start += n
    return torch.cat(out, dim=1)


@pytest.fixture(scope="module")
def sharp() -> telechat.LLM:
    """The tiny preset (vocab 512, T = B = 32, NTK past 32 tokens) with peaked attention."""
    return make("tiny", seed=0)


# ---------------------------------------------------------------------------------------------
# the forward against the independent reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["sharp", "tiny"])
@pytest.mark.parametrize("L", [20, 32, 48, 80])
def test_forward_matches_manual_reference(request, which, L):
    # 20/32: alpha 1, mscale 1; 48: alpha 3; 80: alpha 7, mscale 0.1*ln(2.5)+1 (tiny: T = B = 32).
    llm = request.getfixturevalue(which)
    ids = random_ids(512, 2, L, seed=L)
    out = llm.model(ids)
    assert out.shape == (2, L, 512) and out.dtype == torch.float32
    assert rel_err(out, manual_forward(llm.model, ids)) < 1e-5


def test_one_layer_gqa_forward_matches_manual_reference():
    llm = make("tiny", seed=3, n_layer=1, num_key_value_heads=2)
    assert llm.model.transformer.h[0].self_attention.key_value.weight.shape == (2 * 2 * 16, 64)
    ids = random_ids(512, 2, 24, seed=3)
    assert rel_err(llm.model(ids), manual_forward(llm.model, ids)) < 1e-5


def test_key_value_rows_are_interleaved_per_head():
    # With V rows zeroed out per the interleaved layout, attention outputs vanish; zeroing the
    # second half of the matrix instead (the "split in halves" misreading) must not do that.
    llm = make("tiny", seed=4, n_layer=1)
    m, c = llm.model, llm.config
    d, N = c.head_dim, c.n_head
    ids = random_ids(512, 1, 12, seed=4)
    attn = m.transformer.h[0].self_attention
    x = m.transformer.h[0].input_layernorm(m.transformer.word_embeddings(ids))
    cos, sin = rope_cos_sin(c, torch.arange(12), 12)
    W = attn.key_value.weight.clone()
    v_rows = torch.cat([torch.arange(2 * h * d + d, 2 * h * d + 2 * d) for h in range(N)])
    attn.key_value.weight[v_rows] = 0
    y = attn(x, cos, sin)
    assert torch.allclose(y, attn.dense.bias.expand_as(y), atol=1e-6)
    attn.key_value.weight.copy_(W)
    attn.key_value.weight[c.hidden_size:] = 0
    y = attn(x, cos, sin)
    assert not torch.allclose(y, attn.dense.bias.expand_as(y), atol=1e-3)


@pytest.mark.parametrize("kv_heads", [None, 2, 1])
def test_split_key_value_is_row_slicing(kv_heads):
    c = telechat.preset("small", num_key_value_heads=kv_heads)
    d, G = c.head_dim, c.n_kv_head
    W = torch.randn(2 * G * d, c.hidden_size)
    k, v = split_key_value(W, c)
    k_ref = torch.cat([W[2 * h * d:2 * h * d + d] for h in range(G)])
    v_ref = torch.cat([W[2 * h * d + d:2 * h * d + 2 * d] for h in range(G)])
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    assert torch.equal(merge_key_value(k, v, c), W)


# ---------------------------------------------------------------------------------------------
# RoPE and NTK scaling
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,overrides,total,alpha,mscale", [
    ("tiny", {}, 20, 1, 1.0),
    ("tiny", {}, 32, 1, 1.0),
    ("tiny", {}, 33, 3, 0.1 * math.log(33 / 32) + 1),
    ("tiny", {}, 64, 3, 0.1 * math.log(2) + 1),
    ("tiny", {}, 65, 7, 0.1 * math.log(65 / 32) + 1),
    ("tiny", {}, 80, 7, 0.1 * math.log(80 / 32) + 1),
    ("tiny", {"rope_theta": 500000.0}, 80, 7, 0.1 * math.log(80 / 32) + 1),
    ("12B", {}, 100, 1, 1.0),  # B = 8192 = T
    ("7B", {}, 100, 3, 1.0),  # 7B vocab: B = 4096, T = 8192 -> alpha 3 at every length <= 8192
    ("12B", {}, 16384, 3, 0.1 * math.log(2) + 1),
])
def test_rope_cos_sin_applies_ntk_base_and_mscale(preset, overrides, total, alpha, mscale):
    c = telechat.preset(preset, **overrides)
    d = c.head_dim
    base = c.rope_theta * alpha ** (d / (d - 2))
    assert c.rope_scaling(total) == pytest.approx((base, mscale, 1.0), rel=1e-12)
    positions = torch.tensor([0, 1, 5, total // 2, total - 1])
    cos, sin = rope_cos_sin(c, positions, total)
    assert cos.shape == sin.shape == (5, d) and cos.dtype == torch.float32
    j = torch.arange(d // 2, dtype=torch.float64)
    theta = positions.double()[:, None] * base ** (-2 * j / d)
    theta = torch.cat([theta, theta], dim=-1)  # rotate-half layout: frequencies repeated, not interleaved
    atol = 2e-6 * max(1, total)
    assert torch.allclose(cos.double(), theta.cos() * mscale, atol=atol)
    assert torch.allclose(sin.double(), theta.sin() * mscale, atol=atol)


def test_rope_depends_on_total_length_not_chunk_length():
    c = telechat.preset("tiny")
    pos = torch.tensor([70, 71, 72])
    cos80, _ = rope_cos_sin(c, pos, 80)
    cos3, _ = rope_cos_sin(c, pos, 3)
    ref80, _ = spec_cos_sin(c, pos, 80)
    assert torch.allclose(cos80.double(), ref80, atol=1e-4)
    assert not torch.allclose(cos80, cos3, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunks,max_len", [
    ([8] + [1] * 8 + [3, 4, 7], 30),  # prefill, single tokens, chunks with past (explicit mask)
    ([1] * 30, 30),
    ([5, 5, 5, 5, 5, 5], 64),  # cache larger than needed
    ([30], 30),
])
def test_cached_decoding_matches_uncached_within_training_seqlen(sharp, chunks, max_len):
    ids = random_ids(512, 2, 30, seed=1)
    ref = sharp.model(ids)
    out = cached_logits(sharp.model, ids, chunks, max_len)
    assert rel_err(out, ref) < 1e-5


def test_cached_decoding_across_training_seqlen_uses_total_length_per_chunk(sharp):
    # Past training_seqlen each chunk's q/k get rope_scaling(kv_len at that step); keys already in the
    # cache keep the scaling they were written with. An uncached forward with that per-position
    # cos/sin table (built here from the spec formula) is the exact reference.
    chunks = [20] + [1] * 15 + [5, 5, 5, 5] + [1] * 5 + [7, 8, 5]
    N = sum(chunks)
    assert N == 80
    ids = random_ids(512, 2, N, seed=2)
    out = cached_logits(sharp.model, ids, chunks)
    ref = sharp.model(ids, rope=per_chunk_rope(sharp.config, chunks))
    assert rel_err(out, ref) < 1e-5
    # The first chunk (20 tokens, alpha 1) has nothing to do with a later total length...
    short = sharp.model(ids[:, :20])
    assert rel_err(out[:, :20], short) < 1e-5
    # ...and the plain uncached forward of all 80 tokens (alpha 7 everywhere) is a different function.
    assert rel_err(out, sharp.model(ids)) > 1e-3


def test_one_chunk_cached_prefill_beyond_training_seqlen_equals_uncached(sharp):
    ids = random_ids(512, 2, 80, seed=5)
    ref = sharp.model(ids)
    out = cached_logits(sharp.model, ids, [80], max_len=96)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(ref, manual_forward(sharp.model, ids)) < 1e-5


def test_single_token_step_beyond_training_seqlen(sharp):
    # After a 40-token prefill, the token at position 40 is decoded with scaling(41): its logits equal
    # the last position of an uncached forward whose first 40 rows use scaling(40).
    ids = random_ids(512, 1, 41, seed=6)
    out = cached_logits(sharp.model, ids, [40, 1])
    ref = sharp.model(ids, rope=per_chunk_rope(sharp.config, [40, 1]))
    assert rel_err(out[:, -1], ref[:, -1]) < 1e-5


def test_last_only(tiny):
    ids = random_ids(512, 3, 17, seed=7)
    full = tiny.model(ids)
    last = tiny.model(ids, last_only=True)
    assert last.shape == (3, 1, 512)
    assert torch.allclose(last, full[:, -1:], atol=1e-6)
    kv = DenseKV(tiny.config, 3, 20, tiny.model.dtype)
    tiny.model(ids[:, :10], cache=kv.at(torch.arange(10)))
    last = tiny.model(ids[:, 10:], cache=kv.at(torch.arange(10, 17)), last_only=True)
    assert last.shape == (3, 1, 512)
    assert rel_err(last, full[:, -1:]) < 1e-5


def _state_outside_parameters(model):
    """(module name, attribute) of every tensor or KV cache a module holds that is not one of its
    registered parameters/buffers, and the attribute names of every module."""
    found, names = [], {}
    for name, mod in model.named_modules():
        names[name] = sorted(vars(mod))
        for attr, val in vars(mod).items():
            vals = val if isinstance(val, (list, tuple)) else val.values() if isinstance(val, dict) else [val]
            if attr in ("_parameters", "_buffers"):
                continue
            if any(isinstance(x, (torch.Tensor, DenseKV, PagedKV)) or hasattr(x, "attend") for x in vals):
                found.append((name, attr))
    return found, names


def test_model_holds_no_cache_state_after_generate(tiny):
    # The model keeps no KV cache: after generating (through the engine's paged cache) no module
    # holds a tensor or cache outside its parameters/buffers, and no attribute was added. The greedy
    # tokens equal those of repeated uncached forwards, so the cache did its job outside the model.
    model = tiny.model
    found, names = _state_outside_parameters(model)
    assert found == []
    params = {n: p.data_ptr() for n, p in model.named_parameters()}
    ids = random_ids(512, 2, 6, seed=8)
    steps = list(tiny.stream(ids, max_new_tokens=12, eos_token_id=-1, do_sample=False, repetition_penalty=1.0))
    assert len(steps) == 12 and all(t.shape == (2,) for t in steps)
    after, names_after = _state_outside_parameters(model)
    assert after == [] and names_after == names
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == params
    seq = ids
    for _ in range(12):  # uncached greedy reference
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(torch.stack(steps, 1), seq[:, 6:])


def test_kv_cache_holds_rotated_keys(tiny):
    m = tiny.model
    ids = random_ids(512, 1, 9, seed=9)
    kv = DenseKV(m.config, 1, 16, m.dtype)
    m(ids, cache=kv.at(torch.arange(9)))
    attn = m.transformer.h[0].self_attention
    x = m.transformer.h[0].input_layernorm(m.transformer.word_embeddings(ids))[0].double()
    c = m.config
    d = c.head_dim
    W = attn.key_value.weight.double()
    cos, sin = spec_cos_sin(c, range(9), 9)
    for h in range(c.n_kv_head):
        k = x @ W[2 * h * d:2 * h * d + d].T
        k = k * cos + torch.cat([-k[:, d // 2:], k[:, :d // 2]], -1) * sin
        v = x @ W[2 * h * d + d:2 * h * d + 2 * d].T
        assert torch.allclose(kv.k[0][0, h, :9].double(), k, atol=1e-5)
        assert torch.allclose(kv.v[0][0, h, :9].double(), v, atol=1e-5)
    assert kv.k[0][:, :, 9:].abs().sum() == 0


# ---------------------------------------------------------------------------------------------
# GQA
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gqa():
    return make("small", seed=11, num_key_value_heads=2)


def test_gqa_shapes_and_cache(gqa):
    c = gqa.config
    assert c.n_kv_head == 2 and c.n_head == 8
    attn = gqa.model.transformer.h[0].self_attention
    assert attn.key_value.weight.shape == (2 * 2 * c.head_dim, c.hidden_size)
    assert attn.query.weight.shape == (c.hidden_size, c.hidden_size)
    ids = random_ids(c.vocab_size, 2, 24, seed=11)
    ref = gqa.model(ids)
    kv = DenseKV(c, 2, 24, gqa.model.dtype)
    assert len(kv.k) == len(kv.v) == c.n_layer and kv.shape == (2, 24)
    assert all(t.shape == (2, 2, 24, c.head_dim) for t in (*kv.k, *kv.v))
    out = cached_logits(gqa.model, ids, [10, 1, 1, 1, 4, 7], kv=kv)
    assert rel_err(out, ref) < 1e-5


def test_gqa_equals_full_head_model_with_repeated_kv_heads(gqa):
    c = gqa.config
    full = telechat.from_preset("small", seed=12)
    assert full.config.n_kv_head == c.n_head
    rep = c.n_head // c.n_kv_head
    sd = dict(gqa.model.state_dict())
    for i in range(c.n_layer):
        key = f"transformer.h.{i}.self_attention.key_value.weight"
        k, v = split_key_value(sd[key], c)
        k = k.view(c.n_kv_head, c.head_dim, -1).repeat_interleave(rep, dim=0).reshape(-1, c.hidden_size)
        v = v.view(c.n_kv_head, c.head_dim, -1).repeat_interleave(rep, dim=0).reshape(-1, c.hidden_size)
        sd[key] = merge_key_value(k, v, full.config)
    full.model.load_state_dict(sd)
    ids = random_ids(c.vocab_size, 2, 33, seed=12)
    ref = full.model(ids)
    assert rel_err(gqa.model(ids), ref) < 1e-5
    # repeat (not tile) is the sharing pattern: tiling the heads gives a different model
    for i in range(c.n_layer):
        key = f"transformer.h.{i}.self_attention.key_value.weight"
        k, v = split_key_value(gqa.model.state_dict()[key], c)
        k = k.view(c.n_kv_head, c.head_dim, -1).repeat(rep, 1, 1).reshape(-1, c.hidden_size)
        v = v.view(c.n_kv_head, c.head_dim, -1).repeat(rep, 1, 1).reshape(-1, c.hidden_size)
        sd[key] = merge_key_value(k, v, full.config)
    full.model.load_state_dict(sd)
    assert rel_err(full.model(ids), ref) > 1e-3


# ---------------------------------------------------------------------------------------------
# RMSNorm and dtypes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rmsnorm_upcasts_to_fp32(dtype):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(512, eps=1e-5).to(dtype)
    norm.weight.copy_(torch.randn(512, generator=g))
    x = (torch.randn(4, 7, 512, generator=g) * 3).to(dtype)
    x32 = x.float()
    ref = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype) * norm.weight
    out = norm(x)
    assert out.dtype == dtype
    assert torch.equal(out, ref)
    # Values whose squares overflow fp16: only an fp32 computation stays finite and correct.
    big = (torch.randn(2, 512, generator=g) * 1000).to(dtype)
    b32 = big.float()
    ref = (b32 * torch.rsqrt(b32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype) * norm.weight
    out = norm(big)
    assert torch.isfinite(out).all() and torch.equal(out, ref)


def test_rmsnorm_fp32_formula_with_eps():
    norm = RMSNorm(16, eps=1e-2)
    x = torch.full((1, 16), 0.1)
    # mean(x^2) = 0.01, so eps doubles the denominator: 0.1 / sqrt(0.02)
    assert torch.allclose(norm(x), torch.full((1, 16), 0.1 / math.sqrt(0.02)), atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_dtypes_forward_and_cached_decode(dtype, tol):
    ref_llm = make("tiny", seed=13)
    llm = make("tiny", seed=13, dtype=dtype)
    ids = random_ids(512, 2, 40, seed=13)
    ref = ref_llm.model(ids)
    out = llm.model(ids)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < tol
    chunks = [12] + [1] * 20 + [4, 4]  # crosses training_seqlen
    ref_c = cached_logits(ref_llm.model, ids, chunks)
    kv = DenseKV(llm.config, 2, 40, llm.model.dtype)
    assert llm.model.dtype == dtype and kv.k[0].dtype == dtype
    out_c = cached_logits(llm.model, ids, chunks, kv=kv)
    assert out_c.dtype == dtype and torch.isfinite(out_c).all()
    assert rel_err(out_c, ref_c) < tol
    gen = llm.generate(ids[:, :10], max_new_tokens=5, eos_token_id=-1)
    assert gen.shape == (2, 15)


# ---------------------------------------------------------------------------------------------
# structure: tied heads, biases, dropout
# ---------------------------------------------------------------------------------------------
def test_tied_head_is_the_embedding():
    llm = make("tiny", seed=14, tie_word_embeddings=True)
    m = llm.model
    assert m.lm_head.weight is m.transformer.word_embeddings.weight
    assert "lm_head.weight" not in dict(m.named_parameters())
    assert llm.config.num_parameters() == sum(p.numel() for p in m.parameters())
    ids = random_ids(512, 1, 10, seed=14)
    before = m(ids)
    m.transformer.word_embeddings.weight[100] += 1.0  # a token not necessarily in ids: changes its logit
    after = m(ids)
    assert not torch.allclose(before[..., 100], after[..., 100])


def test_untied_head_is_separate():
    llm = make("tiny", seed=15, tie_word_embeddings=False)
    m = llm.model
    assert m.lm_head.weight is not m.transformer.word_embeddings.weight
    assert m.lm_head.weight.data_ptr() != m.transformer.word_embeddings.weight.data_ptr()
    assert "lm_head.weight" in dict(m.named_parameters())
    assert llm.config.num_parameters() == sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("bias", [True, False])
def test_biases(bias):
    llm = make("tiny", seed=16, bias=bias, num_key_value_heads=2)
    m = llm.model
    names = sorted(n for n, _ in m.named_parameters() if n.endswith("bias"))
    if bias:
        assert names == sorted(f"transformer.h.{i}.{s}" for i in range(2)
                               for s in ("self_attention.dense.bias", "mlp.down_proj.bias"))
    else:
        assert names == []
        assert m.transformer.h[0].self_attention.dense.bias is None
        assert m.transformer.h[0].mlp.down_proj.bias is None
    for blk in m.transformer.h:
        for lin in (blk.self_attention.query, blk.self_attention.key_value, blk.mlp.gate_proj, blk.mlp.up_proj):
            assert lin.bias is None
    assert m.lm_head.bias is None
    assert llm.config.num_parameters() == sum(p.numel() for p in m.parameters())
    ids = random_ids(512, 1, 12, seed=16)
    assert rel_err(m(ids), manual_forward(m, ids)) < 1e-5


@pytest.mark.parametrize("hidden,attn", [(0.3, 0.0), (0.0, 0.3), (0.1, 0.1)])
def test_dropout_only_in_training(hidden, attn):
    llm = make("tiny", seed=17, hidden_dropout=hidden, attention_dropout=attn)
    plain = make("tiny", seed=17)
    ids = random_ids(512, 2, 16, seed=17)
    m = llm.model
    assert not m.training
    a, b = m(ids), m(ids)
    assert torch.equal(a, b)
    assert torch.allclose(a, plain.model(ids), atol=1e-6)
    m.train()
    try:
        torch.manual_seed(0)
        t1 = m(ids)
        t2 = m(ids)
    finally:
        m.eval()
    assert not torch.allclose(t1, t2, atol=1e-4)
    assert not torch.allclose(t1, a, atol=1e-4)
    assert torch.equal(m(ids), a)


# ---------------------------------------------------------------------------------------------
# left padding
# ---------------------------------------------------------------------------------------------
def test_left_padding_uncached_and_cached(sharp):
    m = sharp.model
    pad, L, extra = 5, 12, 6
    seq = random_ids(512, 1, L + extra, seed=18)  # prompt + teacher-forced continuation
    other = random_ids(512, 1, pad + L + extra, seed=19)
    junk = random_ids(512, 1, pad, seed=20)  # whatever sits under the pads must not matter
    ids = torch.cat([torch.cat([junk, seq], 1), other])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    total = pad + L + extra
    assert total <= sharp.config.training_seqlen

    ref_seq = m(seq)
    ref_other = m(other)
    out = m(ids, attention_mask=mask)
    assert torch.isfinite(out).all()
    assert rel_err(out[0, pad:], ref_seq[0]) < 1e-5
    assert rel_err(out[1], ref_other[0]) < 1e-5

    # the padded prompt through the cache, then the continuation one token at a time and as a chunk
    kv = DenseKV(m.config, 2, total, m.dtype)
    outs = [m(ids[:, :pad + L], cache=kv.at(torch.arange(pad + L), attention_mask=mask))]
    for p in range(pad + L, total - 3):
        outs.append(m(ids[:, p:p + 1], cache=kv.at(torch.tensor([p]), attention_mask=mask)))
    outs.append(m(ids[:, total - 3:], cache=kv.at(torch.arange(total - 3, total), attention_mask=mask)))
    cached = torch.cat(outs, 1)
    assert torch.isfinite(cached).all()
    assert rel_err(cached[0, pad:], ref_seq[0]) < 1e-5
    assert rel_err(cached[1], ref_other[0]) < 1e-5


def test_all_ones_mask_equals_no_mask(tiny):
    ids = random_ids(512, 2, 20, seed=21)
    a = tiny.model(ids)
    b = tiny.model(ids, attention_mask=torch.ones_like(ids))
    assert rel_err(b, a) < 1e-6


# ---------------------------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------------------------
def test_causal_lm_loss_is_shifted_cross_entropy(tiny):
    ids = random_ids(512, 2, 16, seed=22)
    labels = ids.clone()
    labels[0, 3:6] = -100
    logits = tiny.model(ids)
    loss = causal_lm_loss(logits, labels)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 512), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert loss.shape == () and torch.allclose(loss, ref, atol=1e-6)
    # by hand: mean negative log-likelihood of the next token over kept positions
    logp = logits.double().log_softmax(-1)
    nll = [-logp[b, t, labels[b, t + 1]] for b in range(2) for t in range(15) if labels[b, t + 1] != -100]
    assert len(nll) == 2 * 15 - 3
    assert abs(loss.item() - torch.stack(nll).mean().item()) < 1e-5
    # bf16 logits: the loss is computed in fp32
    assert causal_lm_loss(logits.bfloat16(), labels).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# per-row positions (continuous batching): one unrelated sequence per batch row
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharp512() -> telechat.LLM:
    """The sharp tiny model with room for 512 positions (NTK scaling past training_seqlen 32)."""
    llm = make("tiny", seed=0, seq_length=512)
    assert llm.config.training_seqlen == 32 and llm.config.seq_length == 512
    return llm


@pytest.mark.parametrize("T", [1, 3])
def test_per_row_positions_equal_single_sequence_decoding(sharp512, T):
    # Rows at different positions, most past training_seqlen, so base and mscale differ per row.
    m, c = sharp512.model, sharp512.config
    lens, steps = [20, 40, 70, 33, 5], 3
    assert len({c.rope_scaling(L + 1) for L in lens}) >= 3  # 20/5 plain, 33/40 alpha 3, 70 alpha 7
    seqs = [random_ids(512, 1, L + steps * T, seed=30 + i) for i, L in enumerate(lens)]

    single = []
    for s, L in zip(seqs, lens):
        kv1 = DenseKV(c, 1, 96, m.dtype)
        m(s[:, :L], cache=kv1.at(torch.arange(L)))
        single.append(torch.cat([m(s[:, p:p + T], cache=kv1.at(torch.arange(p, p + T)))
                                 for p in range(L, L + steps * T, T)], 1)[0])

    B = len(lens)
    kv = DenseKV(c, B + 1, 96, m.dtype)  # one row more than the batch: decoding touches rows 0..B-1 only
    for i, (s, L) in enumerate(zip(seqs, lens)):
        m(s[:, :L], cache=kv.at(torch.arange(L), rows=slice(i, i + 1)))
    spare = [(k[B].clone(), v[B].clone()) for k, v in zip(kv.k, kv.v)]
    outs = []
    for k in range(steps):
        pos = torch.stack([torch.arange(L + k * T, L + (k + 1) * T) for L in lens])  # [B, T]
        ids = torch.cat([s[:, L + k * T:L + (k + 1) * T] for s, L in zip(seqs, lens)])
        outs.append(m(ids, cache=kv.at(pos)))
    batch = torch.cat(outs, 1)
    assert all(torch.equal(k[B], k0) and torch.equal(v[B], v0) for k, v, (k0, v0) in zip(kv.k, kv.v, spare))
    for i in range(B):
        assert torch.allclose(batch[i], single[i], atol=1e-5, rtol=1e-5), (i, (batch[i] - single[i]).abs().max())


def test_per_row_positions_with_one_shared_rope_would_differ(sharp512):
    # Guard that the test above can fail: forcing the longest row's scaling onto every row changes logits.
    m, c = sharp512.model, sharp512.config
    lens = [20, 70]
    seqs = [random_ids(512, 1, L + 1, seed=40 + i) for i, L in enumerate(lens)]
    kv = DenseKV(c, 2, 96, m.dtype)
    for i, (s, L) in enumerate(zip(seqs, lens)):
        m(s[:, :L], cache=kv.at(torch.arange(L), rows=slice(i, i + 1)))
    pos = torch.tensor([[L] for L in lens])
    ids = torch.cat([s[:, L:] for s, L in zip(seqs, lens)])
    right = m(ids, cache=kv.at(pos))
    wrong = m(ids, cache=kv.at(pos), rope=rope_cos_sin(c, pos, max(lens) + 1))
    assert torch.allclose(right[1], wrong[1], atol=1e-6)  # the longest row is unaffected
    assert (right[0] - wrong[0]).abs().max() > 1e-3


def test_rope_cos_sin_per_row_lengths_equal_stacked_single_calls():
    c = telechat.config.preset("tiny", seq_length=512)
    totals = [5, 32, 33, 40, 70, 70, 200, 513]
    pos = torch.stack([torch.arange(n - 3, n) for n in totals])  # [B, 3]: the last 3 positions of each
    cos, sin = rope_cos_sin(c, pos, totals)
    assert cos.shape == sin.shape == (len(totals), 3, c.head_dim) and cos.dtype == torch.float32
    for i, n in enumerate(totals):
        c1, s1 = rope_cos_sin(c, pos[i], n)
        assert torch.equal(cos[i], c1) and torch.equal(sin[i], s1), n
    # one shared total length still works with [B, T] positions (and differs where the scaling differs)
    cos_shared, _ = rope_cos_sin(c, pos, 513)
    assert torch.equal(cos_shared[-1], cos[-1]) and not torch.allclose(cos_shared[0], cos[0])


def test_causal_mask_with_per_row_positions_is_causal_per_row():
    pos = torch.tensor([[3, 4], [7, 8], [0, 1]])
    mask = causal_mask(pos, 9, None)
    assert mask.shape == (3, 1, 2, 9) and mask.dtype == torch.bool
    for b in range(3):
        for t in range(2):
            assert mask[b, 0, t].tolist() == [k <= int(pos[b, t]) for k in range(9)]
    # one token per row (a decode step): each row sees exactly its own prefix
    step = causal_mask(torch.tensor([[2], [6], [0]]), 7, None)
    assert step.shape == (3, 1, 1, 7)
    assert step[:, 0, 0].sum(-1).tolist() == [3, 7, 1]
    # with a key mask: padding hidden, a key always sees itself
    am = torch.ones(3, 9, dtype=torch.long)
    am[0, :2] = 0
    am[1, 8] = 0
    masked = causal_mask(pos, 9, am)
    assert masked.shape == (3, 1, 2, 9)
    assert masked[0, 0, 0].tolist() == [False, False, True, True] + [False] * 5
    assert masked[1, 0, 1].tolist() == [True] * 9  # key 8 is padding but is the query itself
    assert masked[1, 0, 0].tolist() == [True] * 8 + [False]
    assert torch.equal(masked[2], mask[2])
    # 1-D positions: plain causal attention needs no mask
    assert causal_mask(torch.tensor([5]), 6, None) is None
    assert causal_mask(torch.arange(6), 6, None) is None


def test_dense_rows_prefill_writes_only_its_rows(sharp512):
    # A step over rows=slice(2, 3) writes the prompt's keys/values into row 2 only, in place, and its
    # logits are those of the uncached forward; copy_rows then gives other rows that prefix.
    m = sharp512.model
    kv = DenseKV(m.config, 4, 16, m.dtype)
    g = torch.Generator().manual_seed(5)
    for t in (*kv.k, *kv.v):  # sentinel contents, so any stray write shows
        t.copy_(torch.randn(t.shape, generator=g))
    tensors = [*kv.k, *kv.v]
    before = [t.clone() for t in tensors]
    ids = random_ids(512, 1, 10, seed=50)
    out = m(ids[:, :9], cache=kv.at(torch.arange(9), rows=slice(2, 3)))
    assert kv.shape == (4, 16) and all(a is b for a, b in zip([*kv.k, *kv.v], tensors))
    assert rel_err(out, m(ids[:, :9])) < 1e-5

    alone = DenseKV(m.config, 1, 16, m.dtype)  # the same prefill alone, for the expected row contents
    m(ids[:, :9], cache=alone.at(torch.arange(9)))
    for new, old, ref in zip(tensors, before, [*alone.k, *alone.v]):
        assert torch.equal(new[[0, 1, 3]], old[[0, 1, 3]])  # other rows untouched
        assert torch.equal(new[2, :, 9:], old[2, :, 9:])  # row 2 past the prompt untouched
        assert torch.allclose(new[2, :, :9], ref[0, :, :9], atol=1e-6)
        assert not torch.allclose(new[2, :, :9], old[2, :, :9])

    # rows 0..1 get row 2's prefix; the next token decoded on them (rows 2..3 untouched) is exact
    row3 = [t[3].clone() for t in tensors]
    kv.copy_rows(2, slice(0, 2), 9)
    for t in tensors:
        assert torch.equal(t[0, :, :9], t[2, :, :9]) and torch.equal(t[1, :, :9], t[2, :, :9])
    nxt = m(ids[:, 9:].expand(2, 1), cache=kv.at(torch.tensor([9]), rows=slice(0, 2)))
    ref = m(ids)[:, -1]
    assert rel_err(nxt[0], ref) < 1e-5 and rel_err(nxt[1], ref) < 1e-5
    assert all(torch.equal(t[3], r) for t, r in zip(tensors, row3))


def test_resize_cache_grows_and_keeps_contents(sharp512):
    # DenseKV.resized: a copy with room for more positions that keeps the cached prefix; decoding
    # into it goes on past the old size (through NTK-scaled positions) exactly.
    m = sharp512.model
    ids = random_ids(512, 2, 30, seed=51)
    full = m(ids)
    kv = DenseKV(m.config, 2, 12, m.dtype)
    prefill = m(ids[:, :10], cache=kv.at(torch.arange(10)))
    old = [(k.clone(), v.clone()) for k, v in zip(kv.k, kv.v)]
    big = kv.resized(32)
    assert big.shape == (2, 32) and kv.shape == (2, 12)
    for k, v, (k0, v0) in zip(big.k, big.v, old):
        assert torch.equal(k[:, :, :12], k0) and torch.equal(v[:, :, :12], v0)
        assert k[:, :, 12:].abs().sum() == 0 and v[:, :, 12:].abs().sum() == 0
    steps = [m(ids[:, p:p + 1], cache=big.at(torch.tensor([p]))) for p in range(10, 30)]
    cached = torch.cat([prefill, *steps], 1)
    assert rel_err(cached[:, :10], full[:, :10]) < 1e-5
    assert rel_err(cached[:, -1], m(ids[:, :30], rope=per_chunk_rope(sharp512.config, [10] + [1] * 20))[:, -1]) < 1e-5
    # the old cache did not see those writes (no shared storage)
    assert all(torch.equal(k, k0) for k, (k0, _) in zip(kv.k, old))
    # shrinking keeps the first positions; the copy does not share storage with the one it came from
    k_before = big.k[0].clone()
    small = big.resized(8)
    assert small.shape == (2, 8)
    assert torch.equal(small.k[0], k_before[:, :, :8])
    small.k[0].zero_()
    assert torch.equal(big.k[0], k_before) and k_before.abs().sum() > 0


def test_kv_cache_update_with_per_row_positions():
    # A DenseKV step with positions [B, 1] writes each row's key/value at its own position, scales
    # each row's rotary tables for its own length and attends each row over its own prefix only.
    from types import SimpleNamespace

    config = SimpleNamespace(n_layer=1, n_kv_head=2, head_dim=4)
    g = torch.Generator().manual_seed(0)
    kv = DenseKV(config, 3, 8, torch.float32)
    for t in (kv.k[0], kv.v[0]):  # earlier contents, so attention over the prefix is non-trivial
        t.copy_(torch.randn(t.shape, generator=g))
    prev_k, prev_v = kv.k[0].clone(), kv.v[0].clone()
    q = torch.randn(2, 4, 1, 4, generator=g)  # 4 query heads share 2 KV heads
    k, v = torch.randn(2, 2, 1, 4, generator=g), torch.randn(2, 2, 1, 4, generator=g)
    step = kv.at(torch.tensor([[5], [1]]))
    assert step.rope_total == [6, 2] and step.kv_len == 6
    y = step.attend(0, q, k, v)
    assert y.shape == (2, 4, 1, 4)
    assert torch.equal(kv.k[0][0, :, 5], k[0, :, 0]) and torch.equal(kv.v[0][1, :, 1], v[1, :, 0])
    written = torch.zeros(3, 8, dtype=torch.bool)
    written[0, 5] = written[1, 1] = True
    assert ((kv.k[0] != prev_k).any(-1).any(1) == written).all()  # the rows of the batch, their positions only
    assert ((kv.v[0] != prev_v).any(-1).any(1) == written).all()
    for b, n in ((0, 6), (1, 2)):  # fp64 softmax attention over the row's first n positions
        for h in range(4):
            keys, vals = kv.k[0][b, h // 2, :n].double(), kv.v[0][b, h // 2, :n].double()
            p = (q[b, h, 0].double() @ keys.T / 2.0).softmax(-1)
            assert torch.allclose(y[b, h, 0].double(), p @ vals, atol=1e-6), (b, h)
    # a step over rows 1:3 writes into the same tensors, rows 1..2 only
    kv.at(torch.tensor([7]), rows=slice(1, 3)).attend(0, torch.ones(2, 4, 1, 4), torch.ones(2, 2, 1, 4),
                                                      torch.ones(2, 2, 1, 4))
    assert kv.k[0][1:, :, 7].eq(1).all() and torch.equal(kv.k[0][0, :, 7], prev_k[0, :, 7])


def test_packed_segments_equal_each_dialogue_alone():
    """segment_ids give block-diagonal attention with per-segment positions: a packed sample's
    logits and summed loss equal those of each dialogue run alone."""
    from telechat.model import packed_labels

    m = telechat.from_preset("tiny", seed=0, seq_length=128).model.eval()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(4, 500, (10,), generator=g), torch.randint(4, 500, (7,), generator=g)
    ids = torch.cat([torch.full((3,), 3), a, b])[None]
    seg = torch.tensor([[0] * 3 + [1] * 10 + [2] * 7])
    with torch.no_grad():
        packed, la, lb = m(ids, segment_ids=seg), m(a[None]), m(b[None])
        unpacked = m(ids)
    torch.testing.assert_close(packed[0, 3:13], la[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[0, 13:], lb[0], atol=1e-5, rtol=1e-5)
    assert (unpacked[0, 13:] - lb[0]).abs().max() > 1e-3  # without segments b would see a
    labels = packed_labels(ids, torch.ones_like(ids), seg)
    assert (labels[0, [0, 1, 2, 3, 13]] == -100).all() and (labels[0, 4:13] == a[1:]).all()
    ce = torch.nn.functional.cross_entropy
    total = ce(packed[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
    alone = ce(la[0, :-1], a[1:], reduction="sum") + ce(lb[0, :-1], b[1:], reduction="sum")
    torch.testing.assert_close(total, alone, atol=1e-4, rtol=1e-5)


def test_packed_segments_beyond_training_seqlen_equal_each_dialogue_alone():
    """tiny: training_seqlen 32. Segments of 40 and 50 tokens are scaled (NTK base, mscale) for their
    own length, a 12-token segment not at all; the packed length (110) must not leak into any of them.
    Two rows, padding at the start, the middle and the end; the span-by-span attention builds no T x T mask."""
    from telechat.model import PackedSegments

    m = telechat.from_preset("tiny", seed=0).model.eval()
    cfg = m.config
    assert cfg.rope_scaling(40) != cfg.rope_scaling(110) != cfg.rope_scaling(12)
    g = torch.Generator().manual_seed(1)
    a, b, c, d = (torch.randint(4, 500, (n,), generator=g) for n in (40, 12, 50, 45))
    row0 = torch.cat([torch.full((2,), 3), a, b, c, torch.full((6,), 3)])  # 110 tokens
    row1 = torch.cat([d, torch.full((3,), 3), torch.randint(4, 500, (62,), generator=g)])
    seg0 = torch.tensor([0] * 2 + [1] * 40 + [2] * 12 + [3] * 50 + [0] * 6)
    seg1 = torch.tensor([1] * 45 + [0] * 3 + [2] * 62)
    ids, seg = torch.stack([row0, row1]), torch.stack([seg0, seg1])
    with torch.no_grad():
        packed = m(ids, segment_ids=seg)
        alone = {n: m(x[None])[0] for n, x in (("a", a), ("b", b), ("c", c), ("d", d), ("e", row1[48:]))}
    torch.testing.assert_close(packed[0, 2:42], alone["a"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[0, 42:54], alone["b"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[0, 54:104], alone["c"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[1, :45], alone["d"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[1, 48:], alone["e"], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(packed).all()
    p = PackedSegments(seg)
    assert p.lengths[0, 2:42].eq(40).all() and p.lengths[0, 42:54].eq(12).all() and p.lengths[1, 48:].eq(62).all()
    assert p.spans()[:3] == [(0, 0, 2, True), (0, 2, 42, False), (0, 42, 54, False)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention document mask runs on CUDA only")
def test_packed_flex_attention_on_cuda_equals_span_attention():
    from telechat.model import PackedSegments

    g = torch.Generator().manual_seed(0)
    seg = torch.tensor([[0] * 5 + [1] * 100 + [2] * 150 + [3] * 1 + [0] * 0, [1] * 200 + [0] * 56]).cuda()
    q = torch.randn(2, 8, 256, 64, generator=g).cuda()
    k, v = torch.randn(2, 2, 256, 64, generator=g).cuda(), torch.randn(2, 2, 256, 64, generator=g).cuda()
    p = PackedSegments(seg)
    flex = p.attend(q, k, v)
    spans = PackedSegments(seg.cpu()).attend(q.cpu(), k.cpu(), v.cpu())
    torch.testing.assert_close(flex.cpu(), spans, atol=2e-3, rtol=2e-3)

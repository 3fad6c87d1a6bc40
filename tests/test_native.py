"""The native CPU decode step (telechat.native: the blocks as one C++ operator) against a float64 forward
of the whole sequence, and through the engine against the eager torch path."""
import copy

import pytest
import torch
from torch import nn

import telechat
from telechat.kv import PagedKV
from telechat.quant import kernels
from telechat.quant.format import QUANTIZED_MODULES, QuantConfig
from telechat.quant.gptq import rtn
from telechat.quant.linear import QuantLinear, use_kernel
from telechat.rope import rope_cos_sin

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs a C++ compiler for telechat's CPU operators")


def random_model(dtype=torch.float32, kv_heads=2, qkv_bias=True, seed=0):
    llm = telechat.from_preset("tiny", seed=seed, num_key_value_heads=kv_heads, qkv_bias=qkv_bias,
                                 ffn_hidden_size=192)  # whole blocks of 32 for the quantized cases
    with torch.no_grad():  # non-zero biases and norms, so that they count
        for name, p in llm.model.named_parameters():
            if name.endswith("bias") or "layernorm" in name or "ln_f" in name:
                p.add_(torch.randn_like(p) * 0.1)
        c = llm.model.config
        for block in llm.model.transformer.h:  # sharp attention: positions and rotary matter to the logits
            a = block.self_attention
            a.query.weight.mul_(6)
            a.key_value.weight.view(c.n_kv_head, 2, c.head_dim, -1)[:, 0].mul_(6)
    return llm.model.to(dtype)


def quantized(model, bits, group_size, float_zero=False):
    """Every block projection RTN-quantized, on the native path (query+key_value and gate+up stacked)."""
    for block in model.transformer.h:
        for name in QUANTIZED_MODULES:
            lin = block.get_submodule(name)
            qw = rtn(lin.weight.detach().float(), QuantConfig(bits=bits, group_size=group_size, method="rtn"))
            parent, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent), attr, QuantLinear.from_weight(qw, lin.bias, torch.float32))
    use_kernel(model)
    if float_zero:  # w = s q + m (GGUF Q4_1) instead of s (q - z)
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m._buffers["mrows"] = (-m.srows.float() * m.zrows.float()).half()
                m._buffers["zrows"] = None
                m.zero_point = "float"
                m.rows_version += 1
        use_kernel(model)
    return model


def float64_reference(model):
    """The same weights (quantized ones dequantized) in float64, without the stacked calls."""
    ref = copy.deepcopy(model)
    for block in ref.transformer.h:
        block.self_attention.qkv = block.mlp.gate_up = None
        for parent in (block.self_attention, block.mlp):
            for name, m in list(parent.named_children()):
                if isinstance(m, QuantLinear):
                    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
                    lin.weight = nn.Parameter(m.dequantize(torch.float64))
                    if m.bias is not None:
                        lin.bias = nn.Parameter(m.bias.double())
                    setattr(parent, name, lin)
    return ref.double()


def native_logits(model, seqs, block_size=4):
    """Feed each row's tokens one decode step at a time, row b starting at step b (so a step's rows sit
    at different positions), its blocks interleaved with the other rows' in one pool."""
    from telechat.native import NativeDecoder

    dec, c = NativeDecoder(model), model.config
    pool = PagedKV(c, model.dtype, "cpu", block_size=block_size, initial_blocks=4)
    R, nblk = len(seqs), -(-max(map(len, seqs)) // block_size)
    blocks = [[1 + j * R + b for j in range(nblk)] for b in range(R)]
    pool.ensure(1 + nblk * R)
    out = [[] for _ in seqs]
    for s in range(max(len(q) + b for b, q in enumerate(seqs))):
        rows = [b for b in range(R) if 0 <= s - b < len(seqs[b])]
        pos = [s - b for b in rows]
        cos, sin = rope_cos_sin(c, torch.tensor(pos), torch.tensor([p + 1 for p in pos]))
        write = torch.tensor([blocks[b][p // block_size] * block_size + p % block_size for b, p in zip(rows, pos)])
        nb = max(pos) // block_size + 1
        ctx = torch.tensor([[blocks[b][min(j, nblk - 1)] * block_size + o for j in range(nb) for o in range(block_size)]
                            for b in rows])
        logits = dec(torch.tensor([seqs[b][p] for b, p in zip(rows, pos)]), cos, sin, pool, write, ctx,
                     torch.tensor([p + 1 for p in pos]))
        for i, b in enumerate(rows):
            out[b].append(logits[i])
    return [torch.stack(o) for o in out]


def relative_errors(model, seqs):
    with torch.no_grad():
        ref = float64_reference(model)
        expect = [ref(torch.tensor([q]))[0] for q in seqs]
    got = native_logits(model, seqs)
    return [float((g.double() - e).abs().max() / e.abs().max()) for g, e in zip(got, expect)]


SEQS = [[5, 17, 300, 2, 2, 99, 411, 7, 63, 128, 250, 3, 1, 0, 511, 42, 42, 42, 8, 9],
        [70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82], [500, 1, 499, 2, 498, 3, 497]]


@pytest.mark.parametrize("kv_heads,qkv_bias", [(2, True), (4, False), (1, True)])
def test_float32_weights_match_a_float64_forward_at_every_position(kv_heads, qkv_bias):
    errs = relative_errors(random_model(kv_heads=kv_heads, qkv_bias=qkv_bias), SEQS)
    assert max(errs) < 2e-6, errs


def test_bf16_weights_and_cache():
    # bf16 weights and KV pool; fp32 arithmetic inside, the head in bf16: bf16 rounding, no more
    errs = relative_errors(random_model(torch.bfloat16), SEQS)
    assert max(errs) < 1e-2, errs


@pytest.mark.parametrize("bits,group_size,float_zero", [(4, 32, False), (4, 64, True), (8, 64, False), (8, 32, True)])
def test_quantized_weights(bits, group_size, float_zero):
    # Activations are rounded to int8 per block of 32 (as llama.cpp does): ~0.5% of the logit scale.
    model = quantized(random_model(), bits, group_size, float_zero)
    assert isinstance(model.transformer.h[0].self_attention.query, QuantLinear)
    errs = relative_errors(model, SEQS)
    assert max(errs) < 5e-3, errs


def test_quantized_equals_the_model_path_with_the_same_kernels():
    """Against the eager model through the same qlinear operator (same int8 rounding of activations)."""
    from telechat.kv import DenseKV

    model = quantized(random_model(), 4, 32)
    seq = SEQS[0]
    got = native_logits(model, [seq])[0]
    cache = DenseKV(model.config, 1, len(seq), torch.float32)
    with torch.no_grad():
        want = torch.cat([model(torch.tensor([[t]]), cache=cache.at(torch.tensor([i])))[0] for i, t in enumerate(seq)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


# ---- through the engine ------------------------------------------------------------------------------
@pytest.fixture()
def sharp():
    """An LLM over random_model with a 20x head: peaked next-token distributions, so that seeded samples
    move with the logits (a tiny random model's are nearly uniform)."""
    model = random_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return telechat.LLM(model, None)


def test_engine_decodes_natively_by_default_with_the_eager_tokens(sharp):
    tiny = sharp
    assert tiny.engine.decoder == "native"
    prompts = torch.tensor([[0, 0, 0, 0, 0, 9, 8, 7], [1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 300, 301, 5, 17, 42, 3]])
    mask = (prompts != 0) | (torch.arange(8) >= 5)
    mask[1] = True
    # Sampled (seeded), since tiny random models repeat one token greedily: each of the 36 draws moves
    # when the distribution does.
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, seed=3, eos_token_id=-1,
              attention_mask=mask.long())
    native = tiny.generate(prompts, **kw)
    steps_native = tiny.engine.stats.steps
    eager = tiny.generate(prompts, compile=False, **kw)
    assert tiny.engine.decoder == "eager"
    assert tiny.engine.stats.steps > steps_native  # the second run really ran
    assert torch.equal(native, eager)


def test_engine_follows_changed_weights_and_falls_back(sharp):
    tiny = sharp
    ids = [5, 6, 7, 8]
    kw = dict(max_new_tokens=16, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, seed=5, eos_token_id=-1)
    before = tiny.generate(ids, **kw)
    block = tiny.model.transformer.h[0]
    with torch.no_grad():
        block.mlp.down_proj.weight = nn.Parameter(torch.randn_like(block.mlp.down_proj.weight))
        block.self_attention.dense.weight.mul_(-1)  # in place: the registered tensor sees it
    after = tiny.generate(ids, **kw)
    assert tiny.engine.decoder == "native"
    tiny.engine.configure(compile=False)
    assert torch.equal(after, tiny.generate(ids, **kw)) and not torch.equal(before, after)
    tiny.engine.configure(compile="auto")
    assert tiny.engine.decoder == "native"
    block.register_forward_hook(lambda *a: None)  # something only the torch path runs
    assert torch.equal(after, tiny.generate(ids, **kw))
    assert tiny.engine.decoder == "eager"


def test_decoder_choice(tiny, monkeypatch):
    from telechat.engine import choose_decoder
    from telechat.native import unsupported

    cpu = torch.device("cpu")
    assert choose_decoder(tiny.model, cpu) == "native"
    assert choose_decoder(tiny.model, cpu, compile=True) == "compiled"
    assert choose_decoder(tiny.model, cpu, compile=False) == "eager"
    for wrong in ("native", "yes", 1):
        with pytest.raises(ValueError, match="compile must be True"):
            tiny.generate([1, 2, 3], max_new_tokens=2, compile=wrong)
    monkeypatch.setenv("TELECHAT_DECODER", "eager")
    assert choose_decoder(tiny.model, cpu) == "eager"
    monkeypatch.setenv("TELECHAT_DECODER", "fastest")
    with pytest.warns(UserWarning, match="TELECHAT_DECODER='fastest' is not one of"):
        assert choose_decoder(tiny.model, cpu) == "native"
    tiny.model.train()
    assert unsupported(tiny.model) == "in training mode"
    tiny.model.eval()
    from telechat.lora import add_lora

    add_lora(tiny.model, r=2)
    assert "peft" in unsupported(tiny.model)


def test_bad_step_arguments_are_errors_not_crashes():
    from telechat.native import NativeDecoder

    model = random_model()
    dec, c = NativeDecoder(model), model.config
    pool = PagedKV(c, torch.float32, "cpu", block_size=4, initial_blocks=2)
    cos, sin = rope_cos_sin(c, torch.tensor([0]), 1)
    ok = dict(write_slots=torch.tensor([4]), ctx_slots=torch.tensor([[4, 5, 6, 7]]), ctx_lens=torch.tensor([1]))
    dec(torch.tensor([1]), cos, sin, pool, **ok)
    for change, message in [(dict(write_slots=torch.tensor([8])), "write slot"),
                            (dict(ctx_slots=torch.tensor([[99, 5, 6, 7]])), "context slot out of range"),
                            (dict(ctx_lens=torch.tensor([5])), "context length"),
                            (dict(ctx_slots=torch.tensor([[4, 5]]).int()), "ctx_slots must be Long")]:
        with pytest.raises(RuntimeError, match=message):
            dec(torch.tensor([1]), cos, sin, pool, **{**ok, **change})


def test_every_instruction_set():
    """The native step on each instruction set the CPU has (AVX-512, AVX2, portable C)."""
    from test_quant import usable_isas

    models = {"bf16": random_model(torch.bfloat16), "float32": random_model(),
              "int4": quantized(random_model(), 4, 32, float_zero=True)}
    limits = {"bf16": 1e-2, "float32": 2e-6, "int4": 5e-3}
    try:
        for isa in usable_isas():
            assert kernels.cpu_isa(isa) == isa
            for name, model in models.items():
                errs = relative_errors(model, SEQS[:2])
                assert max(errs) < limits[name], (isa, name, errs)
    finally:
        kernels.cpu_isa("auto")



def test_prompt_chunks_in_one_call_attend_causally_within_the_chunk():
    """Rows of one step may be consecutive tokens of one sequence (a prompt chunk): each attends over its
    own prefix, the keys of the rows before it in the same call included; chunks of 5 tokens of three
    sequences side by side, against the float64 forward at every position."""
    from telechat.native import NativeDecoder

    model = random_model()
    dec, c, bs = NativeDecoder(model), model.config, 4
    pool = PagedKV(c, torch.float32, "cpu", block_size=bs, initial_blocks=4)
    R, nblk = len(SEQS), -(-max(map(len, SEQS)) // bs)
    blocks = [[1 + j * R + b for j in range(nblk)] for b in range(R)]
    pool.ensure(1 + nblk * R)
    got = [[] for _ in SEQS]
    for start in range(0, max(map(len, SEQS)), 5):
        rows = [(b, p) for b, q in enumerate(SEQS) for p in range(start, min(start + 5, len(q)))]
        pos = torch.tensor([p for _, p in rows])
        cos, sin = rope_cos_sin(c, pos, pos + 1)
        write = torch.tensor([blocks[b][p // bs] * bs + p % bs for b, p in rows])
        ctx = torch.tensor([[blocks[b][j // bs] * bs + j % bs for j in range(nblk * bs)] for b, _ in rows])
        logits = dec(torch.tensor([SEQS[b][p] for b, p in rows]), cos, sin, pool, write, ctx, pos + 1)
        for (b, _), row in zip(rows, logits):
            got[b].append(row)
    with torch.no_grad():
        ref = float64_reference(model)
        for b, q in enumerate(SEQS):
            want = ref(torch.tensor([q]))[0]
            err = float((torch.stack(got[b]).double() - want).abs().max() / want.abs().max())
            assert err < 2e-6, (b, err)

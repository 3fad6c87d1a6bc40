"""GPTQ int8/int4: the AutoGPTQ v1 format, GPTQ itself, the quantize pipeline, quantized layers and
their kernels, loading published-style checkpoints, and the errors on bad input."""
from __future__ import annotations

import json
import os
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import telechat
from telechat.cli import main
from telechat.quant import (MODULE_ORDER, QUANTIZED_MODULES, QuantConfig, QuantError, QuantLinear, dequantize, pack,
                            quantize, quantized_layers, read_quant_config, unpack, use_kernel)
from telechat.quant import kernels, pipeline
from telechat.quant.gptq import HessianCollector, gptq, rtn

from conftest import SHARED, TEXT, shared_path


# ---- an independent reading of the format (spec section 7), in numpy with unsigned words -------------
def reference_dequantize(qweight, qzeros, scales, g_idx, bits: int) -> np.ndarray:
    """w [N, K]: q[k, n] is bits*(k % f).. of word qweight[k // f, n]; zero[g, n] is bits*(n % f).. of
    qzeros[g, n // f], plus one; w = scale[g, n] * (q - zero), g = g_idx[k]."""
    f, mask = 32 // bits, (1 << bits) - 1
    qw = qweight.numpy().view(np.uint32).astype(np.int64)
    qz = qzeros.numpy().view(np.uint32).astype(np.int64)
    K, N = qw.shape[0] * f, qw.shape[1]
    k = np.arange(K)
    q = (qw[k // f, :] >> (bits * (k % f))[:, None]) & mask  # [K, N]
    n = np.arange(N)
    z = ((qz[:, n // f] >> (bits * (n % f))[None, :]) & mask) + 1  # [G, N]
    g = g_idx.numpy().astype(np.int64)
    return ((q - z[g]) * scales.float().numpy()[g]).T


def random_codes(N: int, K: int, bits: int, gs: int, act_order: bool = False, seed: int = 0):
    """A QuantizedWeight-like set of codes with all code values, asymmetric zeros, and (act-order) shuffled groups."""
    from telechat.quant import QuantizedWeight

    g = torch.Generator().manual_seed(seed)
    maxq = 2 ** bits - 1
    q = torch.randint(0, maxq + 1, (N, K), generator=g, dtype=torch.int32)
    q.view(-1)[:maxq + 1] = torch.arange(maxq + 1)  # every code value; the top one sets its word's sign bit
    zeros = torch.randint(1, maxq + 1, (K // gs, N), generator=g, dtype=torch.int32)
    scales = (torch.rand(K // gs, N, generator=g) * 0.02 + 0.001).half().float()
    g_idx = torch.arange(K) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=g)]
    return QuantizedWeight(q, scales, zeros, g_idx.to(torch.int32), bits)


# ---- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("calib") / "calib.txt"
    f.write_text(TEXT * 30, encoding="utf-8")
    return f


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory, sp_model) -> Path:
    """A tiny float checkpoint whose widths (64, 128) divide group size 32; non-zero biases and norms."""
    llm = telechat.from_preset("tiny", seed=0, tokenizer=telechat.load_tokenizer(sp_model), ffn_hidden_size=128,
                               seq_length=128, training_seqlen=128, base_seqlen=128)
    with torch.no_grad():
        for name, p in llm.model.named_parameters():
            if name.endswith("bias") or "layernorm" in name or "ln_f" in name:
                p.add_(torch.randn_like(p) * 0.1)
    d = tmp_path_factory.mktemp("float")
    llm.save(d)
    return d


@pytest.fixture(scope="module")
def gptq4_dir(tmp_path_factory, float_dir, calib_file) -> Path:
    out = tmp_path_factory.mktemp("q") / "gptq4"
    quantize(float_dir, out, QuantConfig(bits=4, group_size=32), calib=calib_file, calib_samples=8,
             calib_seq_len=32, dtype="float32", progress=False)
    return out


def float_with_dequantized_weights(float_dir: Path, quant_dir: Path) -> telechat.LLM:
    """The float model with every quantized projection replaced by the weight the checkpoint describes."""
    llm = telechat.load(float_dir, dtype=None)  # the checkpoint's own dtype, as the quantized model keeps
    sd = load_file(quant_dir / "model.safetensors")
    with torch.no_grad():
        for i, block in enumerate(llm.model.transformer.h):
            for name in QUANTIZED_MODULES:
                p = f"transformer.h.{i}.{name}."
                w = reference_dequantize(sd[p + "qweight"], sd[p + "qzeros"], sd[p + "scales"], sd[p + "g_idx"],
                                         read_quant_config(quant_dir).bits)
                block.get_submodule(name).weight.copy_(torch.from_numpy(w))
    return llm


# ---- format -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_roundtrip(bits):
    v = torch.randint(0, 2 ** bits, (64, 24), dtype=torch.int32)
    v[0] = 2 ** bits - 1  # all ones: the word's sign bit
    for dim in (0, 1):
        packed = pack(v, bits, dim)
        assert packed.dtype == torch.int32
        assert packed.shape[dim] == v.shape[dim] * bits // 32
        assert torch.equal(unpack(packed, bits, dim), v)
    # column k of the first word lands at bits*k (low bits first)
    words = pack(torch.arange(32 // bits, dtype=torch.int32)[:, None] % 2 ** bits, bits, 0)
    expect = sum((k % 2 ** bits) << (bits * k) for k in range(32 // bits))
    assert int(words[0, 0]) & 0xFFFFFFFF == expect


@pytest.mark.parametrize("bits,act_order", [(4, False), (8, False), (4, True), (8, True)])
def test_checkpoint_tensors_match_independent_dequantizer(bits, act_order):
    qw = random_codes(32, 128, bits, 32, act_order)
    t = qw.packed()
    assert t["qweight"].shape == (128 * bits // 32, 32) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (4, 32 * bits // 32) and t["qzeros"].dtype == torch.int32
    assert t["scales"].shape == (4, 32) and t["scales"].dtype == torch.float16
    assert t["g_idx"].shape == (128,) and t["g_idx"].dtype == torch.int32
    ref = reference_dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
    expected = ((qw.q - qw.zeros[qw.g_idx.long()].t()) * qw.scales[qw.g_idx.long()].t()).numpy()
    np.testing.assert_allclose(ref, expected, rtol=0, atol=1e-7)
    np.testing.assert_allclose(dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits).numpy(), ref,
                               rtol=0, atol=1e-7)
    np.testing.assert_allclose(qw.dequantize().numpy(), ref, rtol=0, atol=1e-7)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_error_is_half_a_step(bits, sym):
    w = torch.randn(48, 256)
    w[0, :64] = w[0, :64].abs() + 0.1  # a group with only positive weights (asymmetric zero would be 0)
    cfg = QuantConfig(bits=bits, group_size=64, sym=sym, method="rtn")
    qw = rtn(w, cfg)
    assert int(qw.zeros.min()) >= 1  # v1 stores zero - 1: never negative
    if sym:
        assert torch.all(qw.zeros == 2 ** (bits - 1))
    step = qw.scales[qw.g_idx.long()].t()
    err = (qw.dequantize() - w).abs()
    assert torch.all(err <= step / 2 * (1 + 1e-5))  # fp16 scales are rounded up: the grid covers each group


# ---- GPTQ -------------------------------------------------------------------------------------------
def correlated_inputs(n=4096, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k) * 0.3
    return (z @ mix) * torch.linspace(0.2, 3, k)  # correlated, uneven scales (what real activations look like)


@pytest.mark.parametrize("cfg", [QuantConfig(bits=4, group_size=32), QuantConfig(bits=4, group_size=32, sym=False),
                                 QuantConfig(bits=4, group_size=32, desc_act=True), QuantConfig(bits=8, group_size=64),
                                 QuantConfig(bits=4, group_size=-1)], ids=lambda c: c.describe())
def test_gptq_beats_round_to_nearest(cfg):
    x = correlated_inputs()
    w = torch.randn(64, 128) * 0.05
    H = x.t() @ x / x.shape[0]

    def output_error(qw):
        return float(((x @ (w - qw.dequantize()).t()) ** 2).mean())

    e_gptq, e_rtn = output_error(gptq(w, H, cfg)), output_error(rtn(w, cfg))
    assert e_gptq < 0.85 * e_rtn, (e_gptq, e_rtn)


def test_gptq_act_order_groups():
    x = correlated_inputs()
    H = x.t() @ x / x.shape[0]
    qw = gptq(torch.randn(16, 128), H, QuantConfig(bits=4, group_size=32, desc_act=True))
    g = qw.g_idx.long()
    assert not torch.equal(g, torch.arange(128) // 32)  # not in column order ...
    assert torch.equal(torch.bincount(g), torch.full((4,), 32))  # ... but every group has 32 columns
    first = torch.argsort(H.diagonal(), descending=True)[:32]  # the largest inputs are quantized first
    assert torch.all(g[first] == 0)


def test_gptq_ignores_dead_inputs():
    x = correlated_inputs()
    x[:, 5] = 0
    qw = gptq(torch.randn(16, 128), x.t() @ x, QuantConfig(bits=4, group_size=32))
    assert torch.all(qw.dequantize()[:, 5].abs() <= qw.scales[0] / 2 + 1e-6)


def test_hessian_collector_shares_inputs_and_stops_early():
    from telechat.model import Block, rope_cos_sin

    config = telechat.preset("tiny", ffn_hidden_size=128)
    block = Block(config).eval()
    h = torch.randn(2, 8, config.hidden_size)
    cos, sin = rope_cos_sin(config, torch.arange(8), 8)
    calls = []
    block.self_attention.dense.register_forward_pre_hook(lambda m, a: calls.append(1))
    layers = {n: block.get_submodule(n) for n in MODULE_ORDER[0]}
    col = HessianCollector(layers)
    with torch.no_grad():
        col.run(lambda b: block(b, cos, sin), h.split(1))
    assert not calls  # stopped once key_value and query had their inputs
    x = block.input_layernorm(h).reshape(-1, config.hidden_size)
    expect = x.t() @ x / x.shape[0]
    torch.testing.assert_close(col.hessian("self_attention.key_value"), expect, rtol=1e-4, atol=1e-5)
    assert col.alias == {"self_attention.query": "self_attention.key_value"}  # one sum for the shared input
    torch.testing.assert_close(col.hessian("self_attention.query"), expect, rtol=1e-4, atol=1e-5)
    # sink_weight adds the first tokens' (positions 0 of both samples) mean x^T x, times the weight
    x0 = block.input_layernorm(h)[:, 0].double()
    sink = (x0.t() @ x0 / 2).float()
    torch.testing.assert_close(col.hessian("self_attention.key_value", 0.5), expect + 0.5 * sink, rtol=1e-4, atol=1e-5)


# ---- quantized layers and kernels -------------------------------------------------------------------
def make_layer(bits, sym, act_order, N=64, K=128, gs=32, bias=True):
    qw = random_codes(N, K, bits, gs, act_order)
    if sym:
        qw.zeros.fill_(2 ** (bits - 1))
    b = torch.randn(N) * 0.1 if bias else None
    return QuantLinear.from_weight(qw, b, torch.float32), torch.from_numpy(
        reference_dequantize(**{k: v for k, v in qw.packed().items()}, bits=bits)).float(), b


CASES = [(4, True, False), (4, False, False), (4, False, True), (8, True, False), (8, False, True)]


@pytest.mark.parametrize("bits,sym,act_order", CASES)
@pytest.mark.parametrize("kernel", ["dequant", "native", "packed"])
def test_kernel_matches_dequantized_reference(bits, sym, act_order, kernel):
    layer, w, b = make_layer(bits, sym, act_order)
    path = layer.prepare(kernel)
    if kernel == "native" and not kernels.available():
        pytest.skip("no C++ compiler for the native operators")
    assert path == {"dequant": "dequant", "native": "native", "packed": f"int{bits}pack"}[kernel]
    g = torch.Generator().manual_seed(1)
    for rows in (1, 3, 40):
        x = torch.randn(rows, 128, generator=g)
        ref = (x.double() @ w.double().t() + b.double()).float()
        y = layer(x)
        scale = ref.abs().max()
        # fp32 paths agree to rounding; int8 activations (native) to ~1e-2; bf16 activations to ~1e-2
        tol = {"dequant": 1e-5, "native": 2e-2, "packed": 2e-2}[kernel]
        assert (y - ref).abs().max() <= tol * scale, (rows, float((y - ref).abs().max() / scale))
        if kernel == "native":  # exact to rounding once x is rounded the way the operator rounds it
            xq = kernels.fake_quantize_activations(x[:, layer.perm] if layer.perm.numel() else x)
            wq = w[:, layer.perm] if layer.perm.numel() else w
            ref = xq.double() @ wq.double().t() + b.double()
            assert (y - ref).abs().max() <= 1e-5 * scale, rows
    assert layer(torch.randn(2, 5, 128)).shape == (2, 5, 64)


def usable_isas() -> list[str]:
    """The operator's instruction sets this CPU has, from /proc/cpuinfo (independent of the library's
    own feature test), best first."""
    flags = set()
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    out = []
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
        out.append("avx512_vnni")
    if {"avx2", "fma", "f16c"} <= flags:
        out.append("avx2")
    return out + ["portable"]


def _rows_layout(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [N, K] -> the operator's bytes: 4-bit per block of 32, low nibbles columns 0..15 (GGML's order)."""
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    b = codes.view(codes.shape[0], -1, 2, 16)
    return (b[:, :, 0] | b[:, :, 1] << 4).reshape(codes.shape[0], -1).to(torch.uint8).contiguous()


@pytest.fixture
def each_isa():
    if not kernels.available():
        pytest.skip("no C++ compiler for the native operators")
    yield usable_isas()
    kernels.cpu_isa("auto")


def test_operator_picks_the_best_instruction_set_the_cpu_has(each_isa):
    assert kernels.cpu_isa("auto") == each_isa[0]
    with pytest.raises(RuntimeError, match="not available on this CPU"):
        kernels.cpu_isa("sse9")


@pytest.mark.parametrize("bits,group_size,offsets", [(4, 32, "mins"), (4, 64, "zeros"), (4, 32, "zeros"),
                                                     (8, 32, "zeros"), (8, 64, "mins"), (8, 96, "zeros")])
def test_every_instruction_set_matches_the_float64_reference(each_isa, bits, group_size, offsets):
    """Each path the CPU has (AVX-512 VNNI, AVX2, portable C) against float64 sums of the dequantized
    weight and the int8-rounded activations: an odd number of 32-column blocks (the AVX-512 tail),
    groups of 3 blocks, 1..9 rows (the 4-row tiles and their remainder), offsets and zero points at
    their extremes."""
    g = torch.Generator().manual_seed(bits * 1000 + group_size)
    N, K = 21, 288 if 288 % group_size == 0 else 320  # 9 blocks where the groups allow an odd count
    codes = torch.randint(0, 2 ** bits, (N, K), generator=g)
    codes[0] = 2 ** bits - 1  # the largest code against the largest activations: no int16 saturation
    G = K // group_size
    s = (torch.rand(N, G, generator=g) * 0.02 + 1e-3).half()
    mins = zeros = None
    if offsets == "mins":
        mins = (torch.randn(N, G, generator=g) * 0.05).half()
        w = s.double().repeat_interleave(group_size, 1) * codes + mins.double().repeat_interleave(group_size, 1)
    else:
        zeros = torch.randint(0, 2 ** bits, (N, G), generator=g).to(torch.uint8)
        zeros[1] = 0
        w = s.double().repeat_interleave(group_size, 1) * (codes - zeros.double().repeat_interleave(group_size, 1))
    bias = torch.randn(N, generator=g)
    for isa in each_isa:
        assert kernels.cpu_isa(isa) == isa
        for rows in (1, 4, 9):
            x = torch.randn(rows, K, generator=g) * 4
            x[0, :64] = torch.where(torch.arange(64) % 2 == 0, 127.0, -127.0)  # blocks at +-max
            y = kernels.qlinear(x, _rows_layout(codes, bits), s, mins, zeros, bias, bits, group_size)
            ref = kernels.fake_quantize_activations(x).double() @ w.t() + bias.double()
            assert y.dtype == torch.float32 and y.shape == (rows, N)
            assert (y - ref).abs().max() <= 2e-6 * ref.abs().max(), (isa, rows)
            assert (kernels.fake_quantize_activations(x) - x).abs().max() <= x.abs().max() / 254 + 1e-6


def test_operator_checks_its_arguments(each_isa):
    codes, s = torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 1, dtype=torch.float16)
    z = torch.zeros(4, 1, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="x has 40 columns, the weight 64"):
        kernels.qlinear(torch.randn(1, 40), codes, s, None, z, None, 4, 64)
    with pytest.raises(RuntimeError, match="exactly one of mins and zeros"):
        kernels.qlinear(torch.randn(1, 64), codes, s, s, z, None, 4, 64)
    with pytest.raises(RuntimeError, match="scales must be Half"):
        kernels.qlinear(torch.randn(1, 64), codes, s.float(), None, z, None, 4, 64)
    with pytest.raises(RuntimeError, match="multiples of 32"):
        kernels.qlinear(torch.randn(1, 48), torch.zeros(4, 24, dtype=torch.uint8), s, None, z, None, 4, 48)


def test_operator_is_a_graph_node_for_torch_compile(each_isa):
    """The schema and fake implementation pass torch's own checks, and a compiled layer runs the operator
    inside one graph (fullgraph: no break) with the eager result."""
    layer, _, _ = make_layer(4, False, False)
    assert layer.prepare("native") == "native"
    x = torch.randn(3, 128)
    args = (x, layer.qrows, layer.srows, None, layer.zrows, layer.bias, 4, 32)
    torch.library.opcheck(torch.ops.telechat.qlinear.default, args)
    torch.library.opcheck(torch.ops.telechat.hlinear.default, (x, torch.randn(5, 128).half(), None))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


def test_layers_sharing_an_input_run_as_one_call(gptq4_dir):
    """query + key_value and gate_proj + up_proj run as one operator call each: the same logits bit for bit,
    the layers' rows views of the stack (nothing stored twice), and a layer taken off the native path
    is called on its own again."""
    from telechat.quant.linear import StackedQuantLinear

    if not kernels.available():
        pytest.skip("no C++ compiler for the native operators")
    q = telechat.load(gptq4_dir)
    blocks = q.model.transformer.h
    assert all(isinstance(b.self_attention.qkv, StackedQuantLinear) and isinstance(b.mlp.gate_up, StackedQuantLinear)
               for b in blocks)
    att = blocks[0].self_attention
    assert att.key_value.qrows.untyped_storage().data_ptr() == att.qkv.stack["qrows"].untyped_storage().data_ptr()
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stacked = q.model(ids)
        for b in blocks:
            b.self_attention.qkv = b.mlp.gate_up = None
        assert torch.equal(stacked, q.model(ids))
        use_kernel(q.model, "auto")  # stacked again
        mlp = blocks[0].mlp
        assert mlp.gate_up.serves(mlp.gate_proj, mlp.up_proj)
        mlp.gate_proj.prepare("dequant")
        assert not mlp.gate_up.serves(mlp.gate_proj, mlp.up_proj)
        w = mlp.gate_proj.dequantize()
        x = torch.randn(3, w.shape[1])
        torch.testing.assert_close(mlp.gate_proj(x), x @ w.t())  # its own path, from the stack's views


def test_an_instruction_set_the_cpu_lacks_is_a_warning(each_isa):
    """TELECHAT_CPU_ISA naming something unusable: a warning naming the choices, and the best path runs."""
    import subprocess
    import sys

    code = ("import warnings, torch; warnings.simplefilter('always'); from telechat.quant import kernels; "
            "print(kernels.cpu_isa()); "
            "print(kernels.qlinear(torch.ones(1, 32), torch.full((2, 16), 17, dtype=torch.uint8), "
            "torch.ones(2, 1, dtype=torch.float16), None, torch.zeros(2, 1, dtype=torch.uint8), None, 4, 32).tolist())")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TELECHAT_CPU_ISA": "sse9"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "TELECHAT_CPU_ISA='sse9' is not an instruction set this CPU has" in r.stderr
    isa, y = r.stdout.strip().splitlines()[-2:]
    assert isa == each_isa[0] and json.loads(y) == [[32.0, 32.0]]  # codes 1 everywhere, scale 1, zero 0


def test_without_a_compiler_quantized_layers_dequantize(gptq4_dir, tmp_path):
    """A machine with no C++ compiler (none on PATH, CXX unusable, an empty $TELECHAT_HOME): the model loads,
    its layers take the dequantize path, nothing is built, and it generates what that path gives here."""
    import subprocess
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    code = ("import torch, telechat; from telechat.quant import kernels, use_kernel; "
            f"q = telechat.load({str(gptq4_dir)!r}); "
            "print(kernels.available(), use_kernel(q.model, 'auto')); "
            "print(q.generate(torch.arange(6)[None], max_new_tokens=8, repetition_penalty=1.0, eos_token_id=-1)[0].tolist())")
    env = {**os.environ, "PATH": str(bin_dir), "CXX": "/nonexistent/c++", "TELECHAT_HOME": str(tmp_path / "home")}
    r = subprocess.run([str(bin_dir / "python"), "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    state, tokens = r.stdout.strip().splitlines()[-2:]
    assert state == "False {'dequant': 12}"
    assert not list((tmp_path / "home").glob("kernels/*.so"))
    q = telechat.load(gptq4_dir)
    use_kernel(q.model, "dequant")
    assert q.generate(torch.arange(6)[None], max_new_tokens=8, repetition_penalty=1.0,
                      eos_token_id=-1)[0].tolist() == json.loads(tokens)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("K", [100, 128])
def test_half_linear_matches_reference(each_isa, dtype, bias, K):
    """fp32 activations times a weight read as stored (16-bit kept 16-bit): the fp32 product of the exact
    weight values, on every instruction set for decode rows and through BLAS for prefill rows; widths
    that are not a multiple of the vectors (100), and that are (128: bf16's even/odd split)."""
    g = torch.Generator().manual_seed(0)
    N = 37
    w = torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g) if bias else None
    for isa in each_isa:
        kernels.cpu_isa(isa)
        for shape in ((1, K), (1, 1, K), (3, 5, K), (40, K)):
            x = torch.randn(*shape, generator=g)
            ref = x.double() @ w.double().t() + (0 if b is None else b.double())
            if dtype == torch.float32:  # the operator itself (half_linear routes only 16-bit weights)
                y = torch.ops.telechat.hlinear(x, w, b)
            else:
                y = kernels.half_linear(x, w, b)
            assert y.dtype == torch.float32 and y.shape == ref.shape
            assert (y - ref).abs().max() <= 1e-5 * ref.abs().max(), (isa, shape)


def test_quantized_model_keeps_its_16bit_embedding_under_fp32(float_dir, calib_file, tmp_path):
    """A GPTQ folder stores its embedding and lm_head in fp16; run in fp32 on CPU they stay fp16, and the
    logits are those of the model with them upcast."""
    out = tmp_path / "q16"
    quantize(float_dir, out, QuantConfig(bits=4, group_size=32), calib=calib_file, calib_samples=8,
             calib_seq_len=32, progress=False)  # the default: floating tensors in fp16, as AutoGPTQ writes them
    q = telechat.load(out, dtype="float32")
    assert q.model.transformer.word_embeddings.weight.dtype == q.model.lm_head.weight.dtype == torch.float16
    assert q.dtype == q.model.dtype == q.model.transformer.ln_f.weight.dtype == torch.float32
    up = telechat.load(out, dtype="float32")
    up.model.transformer.word_embeddings.float(), up.model.lm_head.float()
    ids = torch.randint(0, 400, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(q.model(ids), up.model(ids), rtol=1e-5, atol=1e-5)
    a = q.generate(ids[:1, :6], max_new_tokens=8, repetition_penalty=1.0, eos_token_id=-1)
    assert a.tolist() == up.generate(ids[:1, :6], max_new_tokens=8, repetition_penalty=1.0, eos_token_id=-1).tolist()
    assert q.engine.kv.k[0].dtype == torch.float32  # the engine's KV pool computes in the model's dtype
    assert telechat.load(out).model.transformer.ln_f.weight.dtype == torch.float16  # no dtype: the checkpoint's


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits,sym,act_order", [(4, True, False), (4, False, True)])
def test_cuda_int4_kernel_matches_reference(bits, sym, act_order):
    layer, w, b = make_layer(bits, sym, act_order, N=256, K=1024, gs=128)
    layer = layer.cuda()
    assert layer.prepare("auto") == "int4pack"
    x = torch.randn(3, 1024, device="cuda")
    ref = x.double() @ w.cuda().double().t() + b.cuda().double()
    assert (layer(x).double() - ref).abs().max() <= 2e-2 * ref.abs().max()


@pytest.mark.parametrize("bits,sym,act_order", CASES)
def test_state_dict_gives_back_the_checkpoint_tensors(bits, sym, act_order):
    layer, _, _ = make_layer(bits, sym, act_order)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.prepare("auto")
    assert layer.in_rows and "qweight" not in layer._buffers  # one copy of the codes in memory
    after = layer.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k


def test_dtype_casts_keep_the_fp16_scales():
    layer, w, b = make_layer(4, False, True)
    path = layer.prepare("auto")
    scales = layer.state_dict()["scales"].clone()
    layer.to(torch.bfloat16)  # bf16 would round the checkpoint's fp16 scales
    assert layer.bias.dtype == torch.bfloat16 and layer.srows.dtype == torch.float16
    assert torch.equal(layer.state_dict()["scales"], scales)
    assert layer.path == path  # kernel state rebuilt for the moved tensors
    x = torch.randn(2, 128)
    ref = x @ w.t() + b
    y = layer(x.bfloat16()).float()
    assert (y - ref).abs().max() <= 3e-2 * ref.abs().max()


def test_group_size_minus_one_is_one_group_per_row():
    qw = rtn(torch.randn(32, 96), QuantConfig(bits=8, group_size=-1, method="rtn"))
    assert qw.scales.shape == (1, 32) and torch.all(qw.g_idx == 0)
    layer = QuantLinear.from_weight(qw, None, torch.float32)
    assert layer.group_size == 96
    x = torch.randn(1, 96)
    torch.testing.assert_close(layer(x), x @ qw.dequantize().t())


# ---- the pipeline: quantize a checkpoint, load it -----------------------------------------------------
def test_quantized_folder_layout(gptq4_dir):
    files = {p.name for p in gptq4_dir.iterdir()}
    assert {"model.safetensors", "config.json", "quantize_config.json", "tokenizer.model",
            "generation_config.json"} <= files
    qc = json.loads((gptq4_dir / "quantize_config.json").read_text())
    for k, v in {"bits": 4, "group_size": 32, "damp_percent": 1.5, "desc_act": False, "sym": True,
                 "true_sequential": True}.items():
        assert qc[k] == v, k
    assert qc["meta"] == {"quantizer": ["telechat"], "method": "gptq", "sink_weight": 1.0}
    hf = json.loads((gptq4_dir / "config.json").read_text())["quantization_config"]
    assert hf["quant_method"] == "gptq" and hf["bits"] == 4 and hf["group_size"] == 32
    sd = load_file(gptq4_dir / "model.safetensors")
    for i in range(2):
        for name in QUANTIZED_MODULES:
            p = f"transformer.h.{i}.{name}."
            assert p + "weight" not in sd
            assert sd[p + "qweight"].dtype == torch.int32 and sd[p + "qzeros"].dtype == torch.int32
            assert sd[p + "scales"].dtype == torch.float16 and sd[p + "g_idx"].dtype == torch.int32
        assert f"transformer.h.{i}.self_attention.dense.bias" in sd  # biases kept as they were
        assert f"transformer.h.{i}.self_attention.query.bias" not in sd
    assert sd["transformer.h.0.mlp.up_proj.qweight"].shape == (64 * 4 // 32, 128)
    assert sd["transformer.h.0.mlp.up_proj.scales"].shape == (2, 128)
    assert sd["transformer.word_embeddings.weight"].dtype == torch.float32


def test_load_quantized_matches_dequantized_float_model(gptq4_dir, float_dir):
    q = telechat.load(gptq4_dir)
    assert len(quantized_layers(q.model)) == 12
    assert q.info()["quantization"] == "gptq int4 g32 sym"
    assert q.info()["parameters"] == telechat.load(float_dir).info()["parameters"]
    ref = float_with_dequantized_weights(float_dir, gptq4_dir)
    ids = torch.randint(0, 400, (2, 20))
    with torch.no_grad():
        native = q.model(ids)  # int8 activations: close, not equal
        assert (native - ref.model(ids)).abs().max() < 2e-2 * native.abs().max()
        use_kernel(q.model, "dequant")  # fp32 activations: equal to rounding
        torch.testing.assert_close(q.model(ids), ref.model(ids), rtol=1e-4, atol=1e-4)
        # and it is a quantization of the float model, not something else
        f = telechat.load(float_dir).model(ids)
        assert (q.model(ids) - f).abs().max() < 0.2 * f.abs().max()
    a = q.generate(ids[:1, :6], max_new_tokens=8, repetition_penalty=1.0, eos_token_id=-1)
    b = ref.generate(ids[:1, :6], max_new_tokens=8, repetition_penalty=1.0, eos_token_id=-1)
    assert a.tolist() == b.tolist()


def test_resave_roundtrip_is_exact(gptq4_dir, tmp_path):
    q = telechat.load(gptq4_dir)
    q.save(tmp_path / "again")
    a, b = load_file(gptq4_dir / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert read_quant_config(tmp_path / "again") == read_quant_config(gptq4_dir)


def test_gptq_sees_quantized_inputs_in_published_order(float_dir, calib_file, tmp_path, monkeypatch):
    """Each layer's Hessian comes from inputs computed with every layer before it already quantized
    (earlier groups of its block, and all earlier blocks), in the order [kv, query], [dense], [up, gate], [down]."""
    seen: list[tuple[str, torch.Tensor]] = []
    real = pipeline.gptq

    scales: dict[str, float] = {}

    def recording(weight, hessian, cfg, name, damp_scale=1.0):
        seen.append((name, hessian.clone()))
        scales[name] = damp_scale
        return real(weight, hessian, cfg, name, damp_scale)

    monkeypatch.setattr(pipeline, "gptq", recording)
    out = tmp_path / "q"
    quantize(float_dir, out, QuantConfig(bits=4, group_size=32), calib=calib_file, calib_samples=4,
             calib_seq_len=32, dtype="float32", progress=False)
    names = [n for n, _ in seen]
    assert names == [f"transformer.h.{i}.{m}" for i in range(2) for m in QUANTIZED_MODULES]
    assert QUANTIZED_MODULES == ("self_attention.key_value", "self_attention.query", "self_attention.dense",
                                 "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj")

    # Recompute the calibration inputs with the saved (quantized) model: the recorded Hessians match
    # those, and not those of the float model.
    from telechat.quant.calib import calibration_samples

    tok = telechat.load_tokenizer(float_dir)
    ids = calibration_samples(tok, calib_file, 4, 32)
    hessians = dict(seen)

    def inputs_of(model, module_name):
        got = []
        h = model.get_submodule(module_name).register_forward_pre_hook(lambda m, a: got.append(a[0].detach()))
        with torch.no_grad():
            model(ids)
        h.remove()
        x = torch.cat(got)
        x0, x = x[:, 0].double(), x.reshape(-1, x.shape[-1]).double()
        H = x.t() @ x / x.shape[0]
        if module_name.endswith("key_value"):  # the first token of each sample also weighs as much as all tokens
            H = H + x0.t() @ x0 / x0.shape[0]
        return H.float()

    quantized = float_with_dequantized_weights(float_dir, out).model
    floating = telechat.load(float_dir).model
    for name in ("transformer.h.0.self_attention.dense", "transformer.h.1.self_attention.key_value",
                 "transformer.h.1.mlp.down_proj"):
        expect = inputs_of(quantized, name)
        torch.testing.assert_close(hessians[name], expect, rtol=1e-3, atol=1e-5)
        assert not torch.allclose(hessians[name], inputs_of(floating, name), rtol=1e-3, atol=1e-5)
    # down_proj's wider input gets proportionally more dampening
    config = telechat.load(float_dir).config
    assert scales["transformer.h.1.mlp.down_proj"] == config.ffn_hidden_size / config.hidden_size > 1
    assert {v for k, v in scales.items() if "down_proj" not in k} == {1.0}


def test_pipeline_holds_one_float_block_at_a_time(float_dir, calib_file, tmp_path, monkeypatch):
    live: list[weakref.ref] = []
    real = pipeline._float_block

    def tracked(config, tensors, i, device):
        assert all(r() is None for r in live), "a previous float block is still alive"
        block = real(config, tensors, i, device)
        live.append(weakref.ref(block))
        return block

    monkeypatch.setattr(pipeline, "_float_block", tracked)
    monkeypatch.setattr(telechat.checkpoint, "load_model", lambda *a, **k: pytest.fail("loaded the whole model"))
    quantize(float_dir, tmp_path / "q", QuantConfig(bits=8, group_size=32), calib=calib_file, calib_samples=4,
             calib_seq_len=32, progress=False)
    assert len(live) == 2


@pytest.mark.parametrize("cfg", [QuantConfig(bits=8, group_size=64, sym=False, desc_act=True),
                                 QuantConfig(bits=4, group_size=-1, method="rtn")], ids=lambda c: c.describe())
def test_other_settings_quantize_and_load(cfg, float_dir, calib_file, tmp_path):
    out = tmp_path / "q"
    quantize(float_dir, out, cfg, calib=calib_file if cfg.method == "gptq" else None, calib_samples=4,
             calib_seq_len=32, progress=False)
    q = telechat.load(out, dtype="float32")
    assert read_quant_config(out) == cfg
    ref = float_with_dequantized_weights(float_dir, out)
    ids = torch.randint(0, 400, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(q.model(ids), ref.model(ids), rtol=1e-3, atol=1e-3)


def test_calibration_from_jsonl_and_arrow_folder(tmp_path, sp_tokenizer):
    from telechat.quant.calib import calibration_samples, read_calibration_text

    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl").write_text("\n".join(json.dumps({"text": line}) for line in TEXT.splitlines()), encoding="utf-8")
    (d / "sub" / "b.txt").write_text(TEXT, encoding="utf-8")
    (d / "ignored.csv").write_text("x,y\n")
    pa = pytest.importorskip("pyarrow")
    table = pa.table({"text": [line + "\n" for line in TEXT.splitlines()]})
    with pa.OSFile(str(d / "c.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    text = read_calibration_text(d)
    assert text.count("TeleChat is a bilingual") == 3 and "x,y" not in text
    ids = calibration_samples(sp_tokenizer, d, 3, 16, seed=1)
    assert ids.shape == (3, 16) and ids.dtype == torch.long
    assert torch.equal(ids, calibration_samples(sp_tokenizer, d, 3, 16, seed=1))  # seeded


def test_wikitext_arrow_reads():
    from telechat.quant.calib import read_calibration_text

    d = shared_path("data", "eval", "wikitext2")
    pytest.importorskip("pyarrow")
    text = read_calibration_text(next(d.rglob("wikitext-validation.arrow")), max_chars=20000)
    assert len(text) >= 20000 and " @-@ " in text


# ---- published checkpoints -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def published_dir(tmp_path_factory, sp_model) -> tuple[Path, telechat.LLM]:
    """A tiny model in the published int4 layout: gptq_model-4bit-128g.bin with 7B-style keys (no
    `transformer.` prefix), an all-zero bias on every quantized layer (older AutoGPTQ), and only
    quantize_config.json (config.json has no quantization_config)."""
    llm = telechat.from_preset("tiny", seed=1, tokenizer=telechat.load_tokenizer(sp_model), hidden_size=128,
                               ffn_hidden_size=256, seq_length=64, training_seqlen=64, tie_word_embeddings=True)
    cfg = QuantConfig(bits=4, group_size=128, method="rtn")
    sd = {}
    for name, t in llm.model.state_dict().items():
        if name == "lm_head.weight":
            continue
        module, _, attr = name.rpartition(".")
        if attr == "weight" and module.endswith(QUANTIZED_MODULES):
            sd.update({f"{module}.{k}": v for k, v in rtn(t, cfg).packed().items()})
            if llm.model.get_submodule(module).bias is None:
                sd[f"{module}.bias"] = torch.zeros(t.shape[0], dtype=torch.float16)
        else:
            sd[name] = t.half()
    d = tmp_path_factory.mktemp("published")
    torch.save({k.removeprefix("transformer."): v for k, v in sd.items()}, d / "gptq_model-4bit-128g.bin")
    config = llm.config.to_dict()
    config["torch_dtype"] = "float16"
    (d / "config.json").write_text(json.dumps(config))
    official = SHARED / "telechat-official" / "7B_4bit" / "quantize_config.json"
    if official.exists():
        shutil.copyfile(official, d / "quantize_config.json")
    else:  # the same six fields the published file has
        (d / "quantize_config.json").write_text(json.dumps(
            {"bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": False, "sym": True,
             "true_sequential": True, "model_name_or_path": None, "model_file_base_name": None}))
    shutil.copyfile(sp_model, d / "tokenizer.model")
    return d, llm


def test_published_gptq_bin_loads_and_resaves(published_dir, tmp_path):
    d, float_llm = published_dir
    q = telechat.load(d, dtype="float32")
    assert len(quantized_layers(q.model)) == 12
    assert q.model.transformer.h[0].self_attention.query.bias is None  # the zero bias was dropped
    assert q.model.transformer.h[0].self_attention.dense.bias is not None
    ids = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        y = q.model(ids)
        f = float_llm.model(ids)
    assert (y - f).abs().max() < 0.25 * f.abs().max()
    q.save(tmp_path / "st")
    assert "quantization_config" in json.loads((tmp_path / "st" / "config.json").read_text())
    again = telechat.load(tmp_path / "st", dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids), y, rtol=0, atol=0)


@pytest.mark.parametrize("name,bits", [("7B_4bit", 4), ("7B_8bit", 8), ("12B_4bit", 4), ("12B_8bit", 8),
                                       ("12B-V2_8bit", 8)])
def test_published_quant_configs(name, bits):
    d = shared_path("telechat-official", name)
    cfg = read_quant_config(d)
    assert (cfg.bits, cfg.group_size, cfg.sym, cfg.desc_act, cfg.damp_percent) == (bits, 128, True, False, 0.01)
    assert cfg.sink_weight == 0.0  # made with the plain Hessian
    from telechat.checkpoint import _skip_init

    config = telechat.TeleChatConfig.from_json(d / "config.json")
    with torch.device("meta"), _skip_init():
        model = telechat.TeleChat(config)
    from telechat.quant import quantize_modules

    quantize_modules(model, cfg)  # every published width divides 128
    layer = model.transformer.h[0].mlp.down_proj
    assert layer.qweight.shape == (config.ffn_hidden_size * bits // 32, config.hidden_size)
    assert layer.scales.shape == (config.ffn_hidden_size // 128, config.hidden_size)


@pytest.mark.slow
def test_gptqmodel_reads_our_checkpoint(gptq4_dir, float_dir, calib_file, tmp_path):
    """Another library's dequantizer (GPTQModel's, which transformers uses) reads our tensors the same way."""
    pytest.importorskip("gptqmodel")
    from gptqmodel.nn_modules.qlinear import PackableQuantLinear
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    asym = tmp_path / "asym8"
    quantize(float_dir, asym, QuantConfig(bits=8, group_size=32, sym=False, desc_act=True), calib=calib_file,
             calib_samples=4, calib_seq_len=32, progress=False)
    for folder in (gptq4_dir, asym):
        cfg = read_quant_config(folder)
        sd = load_file(folder / "model.safetensors")
        for name in ("transformer.h.0.self_attention.key_value", "transformer.h.1.mlp.down_proj"):
            K, N = sd[name + ".g_idx"].shape[0], sd[name + ".scales"].shape[1]
            m = TorchLinear(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, desc_act=cfg.desc_act,
                            in_features=K, out_features=N, bias=False)
            for k in ("qweight", "qzeros", "scales", "g_idx"):
                getattr(m, k).data = sd[f"{name}.{k}"].clone()
            convert_gptq_v1_to_v2_format_module(m, bits=cfg.bits, pack_dtype=torch.int32)  # how it reads v1
            theirs = PackableQuantLinear.dequantize_weight(m).float().t()
            ours = dequantize(*(sd[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")), cfg.bits)
            torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-3 * float(ours.abs().max()))


@pytest.mark.slow
def test_native_kernel_under_torch_compile(gptq4_dir):
    q = telechat.load(gptq4_dir)
    assert use_kernel(q.model, "auto") == ({"native": 12} if kernels.available() else {"dequant": 12})
    ids = torch.randint(0, 400, (1, 6))
    a = q.generate(ids, max_new_tokens=10, repetition_penalty=1.0, eos_token_id=-1)
    b = q.generate(ids, max_new_tokens=10, repetition_penalty=1.0, eos_token_id=-1, compile=True)
    assert a.tolist() == b.tolist()


# ---- bad input: clear errors before any work ---------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 3}, "bits must be one of 4, 8, got 3"),
    ({"bits": 2}, "bits must be one of 4, 8"),
    ({"group_size": 100}, "group_size must be -1 .* or a power of two >= 16, got 100"),
    ({"group_size": 0}, "group_size"),
    ({"group_size": 8}, "group_size"),
    ({"damp_percent": 0}, "damp_percent"),
    ({"method": "awq"}, "method must be one of gptq, rtn"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(QuantError, match=match):
        QuantConfig(**kwargs)


def test_width_not_divisible_by_group_size(tiny_dir, tmp_path, calib_file):
    # the tiny preset has ffn 176 = 11 x 16: down_proj's 176 inputs do not split into groups of 64
    with pytest.raises(QuantError, match=r"transformer\.h\.0\.mlp\.down_proj: in_features 176 is not divisible "
                                         r"by group_size 64.*\(e\.g\. 16\)"):
        quantize(tiny_dir, tmp_path / "out", QuantConfig(bits=4, group_size=64), calib=calib_file, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setup,match", [
    (lambda p: p / "missing.txt", "calibration file or folder does not exist"),
    (lambda p: (p / "empty.txt").write_text("") or p / "empty.txt", "calibration text is empty"),
    (lambda p: (p / "blank.txt").write_text("  \n\n") and p / "blank.txt", "calibration text is empty"),
    (lambda p: (p / "d").mkdir() or (p / "d" / "x.csv").write_text("a") and p / "d", "no calibration files"),
    (lambda p: (p / "small.txt").write_text("hello world") and p / "small.txt",
     r"has \d+ tokens, too few for 8 samples of 32 tokens \(256 needed\)"),
])
def test_bad_calibration(float_dir, tmp_path, setup, match):
    calib = setup(tmp_path)
    with pytest.raises(QuantError, match=match):
        quantize(float_dir, tmp_path / "out", QuantConfig(bits=4, group_size=32), calib=calib, calib_samples=8,
                 calib_seq_len=32, progress=False)
    assert not (tmp_path / "out").exists()


def test_other_request_errors(float_dir, gptq4_dir, calib_file, tmp_path):
    cfg = QuantConfig(bits=4, group_size=32)
    with pytest.raises(QuantError, match="needs calibration text"):
        quantize(float_dir, tmp_path / "o", cfg, progress=False)
    with pytest.raises(QuantError, match="already quantized"):
        quantize(gptq4_dir, tmp_path / "o", cfg, calib=calib_file, progress=False)
    with pytest.raises(QuantError, match="longer than the model's context 128"):
        quantize(float_dir, tmp_path / "o", cfg, calib=calib_file, calib_seq_len=512, progress=False)
    with pytest.raises(QuantError, match="need at least 1 calibration sample"):
        quantize(float_dir, tmp_path / "o", cfg, calib=calib_file, calib_samples=0, calib_seq_len=32, progress=False)
    with pytest.raises(telechat.CheckpointError, match="not a checkpoint folder"):
        quantize(tmp_path / "nothing", tmp_path / "o", cfg, calib=calib_file, progress=False)
    assert not (tmp_path / "o").exists()


def test_bad_quantized_checkpoints(gptq4_dir, tmp_path):
    d = tmp_path / "q"
    shutil.copytree(gptq4_dir, d)
    qc = json.loads((d / "quantize_config.json").read_text())
    (d / "quantize_config.json").write_text(json.dumps({**qc, "bits": 8}))
    with pytest.raises(telechat.CheckpointError, match="quantization_config has bits=4 but quantize_config.json has bits=8"):
        telechat.load(d)
    (d / "quantize_config.json").write_text(json.dumps({**qc, "checkpoint_format": "marlin"}))
    with pytest.raises(telechat.CheckpointError, match="checkpoint_format 'marlin' is not supported"):
        telechat.load(d)
    (d / "quantize_config.json").unlink()
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "awq"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(telechat.CheckpointError, match="quant_method 'awq' is not supported"):
        telechat.load(d)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 64}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(telechat.CheckpointError, match="shape mismatch"):  # the tensors were written for g32
        telechat.load(d)


# ---- command line -----------------------------------------------------------------------------------
def test_cli_quantize(float_dir, calib_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--bits {4,8}", "--group-size", "--sym", "--asym", "--act-order", "--method {gptq,rtn}", "--calib",
                 "--calib-samples", "--calib-seq-len", "--output"):
        assert flag in out, flag
    assert main(["quantize", "--model", str(float_dir), "--output", str(tmp_path / "q"), "--bits", "8",
                 "--group-size", "32", "--asym", "--calib", str(calib_file), "--calib-samples", "4",
                 "--calib-seq-len", "32", "--quiet"]) == 0
    assert "gptq int8 g32 asym" in capsys.readouterr().out
    assert read_quant_config(tmp_path / "q") == QuantConfig(bits=8, group_size=32, sym=False)
    assert main(["quantize", "--model", str(float_dir), "--output", str(tmp_path / "r"), "--method", "rtn",
                 "--group-size", "48", "--quiet"]) == 1
    assert "error: group_size must be" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


TRITON_CHECK = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from test_quant import CASES, make_layer
errs = {}
for bits, sym, act_order in CASES:
    layer, w, b = make_layer(bits, sym, act_order)
    assert layer.prepare("triton") == "triton", layer.path
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float16):
        for rows in (1, 3, 40):
            x = torch.randn(rows, 128, generator=g).to(dtype)
            ref = x.double() @ w.double().t() + b.double()
            err = ((layer(x).double() - ref).abs().max() / ref.abs().max()).item()
            errs[f"int{bits} sym={sym} act_order={act_order} {dtype} rows={rows}"] = err
print(json.dumps(errs))
"""


def test_triton_kernel_matches_reference_in_the_interpreter():
    """The CUDA kernel's own code, run by Triton's interpreter on CPU tensors (int4/int8, act-order,
    GEMV and tl.dot paths), against the independent numpy dequantizer."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton", reason="Triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", TRITON_CHECK, str(Path(__file__).parent)], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    errs = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(errs) == len(CASES) * 6
    bad = {k: v for k, v in errs.items() if v > (1e-5 if "float32" in k else 2e-3)}
    assert not bad, bad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits,sym,act_order", CASES)
def test_cuda_triton_kernel_matches_reference(bits, sym, act_order):
    pytest.importorskip("triton")
    layer, w, b = make_layer(bits, sym, act_order, N=256, K=1024, gs=128)
    layer = layer.cuda()
    assert layer.prepare("triton") == "triton"
    if bits == 8:  # int8 on CUDA: the Triton kernel by default, never a per-call dequantized weight
        assert layer.prepare("auto") == "triton"
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        for rows in (1, 7, 40):
            x = torch.randn(rows, 1024, device="cuda").to(dtype)
            ref = x.double() @ w.cuda().double().t() + b.cuda().double()
            assert (layer(x).double() - ref).abs().max() <= tol * ref.abs().max()


# ---- GPTQ on the default model, calibrated on one text, measured on another ----------------------------
DATA = Path(__file__).parent / "data"


@pytest.mark.slow
def test_gptq_beats_rtn_on_text_unlike_its_calibration(tmp_path):
    """Issue 22's finding, small: calibrated on Chinese news, GPTQ int4 must still beat round-to-nearest on
    English WikiText-2 (with AutoGPTQ's 0.01 dampening and a plain Hessian it was far worse than RTN)."""
    import math

    import torch.nn.functional as F

    from telechat.default_model import ensure_default_model

    src = ensure_default_model()
    ids = torch.tensor(telechat.load_tokenizer(src).encode((DATA / "wikitext2_test_excerpt.txt").read_text()))

    def ppl(folder) -> float:
        model = telechat.load(folder, dtype="float32").model
        windows = ids[: ids.numel() // 512 * 512].view(-1, 512)
        with torch.inference_mode():
            nll = sum(float(F.cross_entropy(model(w[None])[0, :-1], w[1:], reduction="sum")) for w in windows)
        return math.exp(nll / (windows.numel() - windows.shape[0]))

    kw = dict(calib=DATA / "msra_news_zh_excerpt.txt", calib_samples=16, calib_seq_len=256, progress=False)
    quantize(src, tmp_path / "gptq", QuantConfig(bits=4, group_size=64), **kw)
    quantize(src, tmp_path / "rtn", QuantConfig(bits=4, group_size=64, method="rtn"), **kw)
    base, q_gptq, q_rtn = ppl(src), ppl(tmp_path / "gptq"), ppl(tmp_path / "rtn")
    # 16 x 256 tokens: 0.91 here (the benchmark's 64 x 512: 0.7 or better); the old defaults gave above 1
    assert q_gptq - base < 0.95 * (q_rtn - base), (base, q_gptq, q_rtn)

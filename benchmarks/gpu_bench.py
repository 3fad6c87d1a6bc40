"""GPU check and benchmark: correctness on CUDA, then decode, quantized decode, training and serving.

    python benchmarks/gpu_bench.py [--sections check,decode,quant,train,serve] [--budget 480] [--oracle DIR]
    python benchmarks/gpu_bench.py --device cpu --small      # smoke run of this script on a CPU

One call, sections in order of importance, each bounded by what is left of --budget seconds (a
section that would not fit is skipped and says so). Every row is printed as it is measured and
appended to $OUT/gpu_bench.jsonl (or --jsonl). Random weights in the official layout, made on the device.

  check   oracle logits of the published code (fp32 and bf16), batched rows = single rows, the
          CUDA-graph (compiled) decode = eager, GPTQ int4/int8 layers = their dequantized reference
          on every kernel path, packed FlexAttention = per-segment attention, a short packed SFT
          run whose loss falls.
  decode  tok/s at batch 1 and 32 (1B) and batch 1 (7B): HF transformers eager, telechat eager and
          telechat compiled (CUDA graphs), with prefill tok/s and the fraction of copy bandwidth.
  quant   7B int4 and int8 (RTN codes, the GPTQ layout) batch-1 decode against bf16.
  train   1B, sequence 2048, bf16 autocast, packed SFT batches: telechat (FlexAttention document
          mask) and HF transformers (SDPA, unpacked), both with fused AdamW; MFU of the bf16 peak.
  serve   `telechat serve --device cuda` with 1, 32 and 128 concurrent streaming clients
          (benchmarks/serve_load.py), 1B random weights with TeleChat's tokenizer (--tokenizer).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import telechat  # noqa: E402
from telechat.hf import llama_config, llama_state_dict  # noqa: E402
from telechat.model import PackedSegments, causal_lm_loss, packed_labels  # noqa: E402

DEVICE = "cuda"
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12}
START = time.time()
ARGS = None
ROWS: list[dict] = []


def left() -> float:
    return ARGS.budget - (time.time() - START)


def emit(section: str, **row) -> None:
    row = {"section": section, **row}
    ROWS.append(row)
    print(json.dumps(row, default=str), flush=True)
    if ARGS.jsonl:
        with open(ARGS.jsonl, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def free():
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def bandwidth_gbs() -> float:
    x = torch.empty(1 << 30 if DEVICE == "cuda" else 1 << 26, dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    t = timed(lambda: [y.copy_(x) for _ in range(20)])
    return 2 * x.numel() * 20 / t / 1e9


def bf16_peak() -> float:
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else ""
    return next((v for k, v in BF16_PEAK.items() if k in name), 989e12)


def model_on_device(name: str, dtype=torch.bfloat16, **overrides) -> telechat.LLM:
    llm = telechat.from_preset(name, device=DEVICE, dtype=dtype, seed=0, **overrides)
    with torch.no_grad():
        for pname, p in llm.model.named_parameters():
            if pname.endswith("bias"):
                p.normal_(std=0.02)
    return llm


def hf_copy(model):
    from transformers import LlamaForCausalLM

    with torch.device(DEVICE):
        hf = LlamaForCausalLM(llama_config(model.config)).to(model.dtype)
    hf.load_state_dict(llama_state_dict(model), strict=True)
    return hf.eval()


# ---- check ------------------------------------------------------------------------------------------
def check() -> None:
    # 1. The published code's logits (tiny checkpoint in the official layout, vectors it computed).
    if ARGS.oracle and Path(ARGS.oracle).exists():
        from safetensors.torch import load_file

        v = load_file(str(Path(ARGS.oracle) / "vectors.safetensors"))
        for dtype, tol in (("float32", 1e-3), ("bfloat16", 3e-2)):
            llm = telechat.load(ARGS.oracle, device=DEVICE, dtype=dtype)
            with torch.inference_mode():
                for name in ("short", "long"):
                    out = llm.model(v[f"ids_{name}"].to(DEVICE)).float().cpu()
                    ref = v[f"logits_{name}"]
                    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
                    emit("check", what=f"oracle logits {name}", dtype=dtype, rel_err=rel(out, ref),
                         argmax_agree=agree, ok=rel(out, ref) < tol)
            if dtype == "float32":
                n = v["gen_greedy"].shape[1] - v["gen_prompt"].shape[1]
                for compile_ in (False, True):
                    out = llm.generate(v["gen_prompt"].to(DEVICE), max_new_tokens=n, eos_token_id=-1,
                                       do_sample=False, compile=compile_).cpu()
                    emit("check", what="oracle greedy tokens", dtype=dtype, compiled=compile_,
                         ok=torch.equal(out, v["gen_greedy"]))
            del llm
    else:
        emit("check", what="oracle", ok=None, note="no --oracle folder")

    # 2. Batched rows = single rows; compiled (CUDA-graph) decode = eager. fp32 so that equality is exact.
    llm = model_on_device("small", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 4000, (n,), generator=g) for n in (5, 17, 9, 30)]
    n_new = 24
    single = [llm.generate(p[None].to(DEVICE), max_new_tokens=n_new, eos_token_id=-1,
                           repetition_penalty=1.0)[0, len(p):].cpu() for p in prompts]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
    batched = llm.generate(ids.to(DEVICE), attention_mask=mask.to(DEVICE), max_new_tokens=n_new, eos_token_id=-1,
                           repetition_penalty=1.0)[:, T:].cpu()
    emit("check", what="batched rows = single rows (greedy, fp32, left padding)",
         ok=all(torch.equal(batched[i], single[i]) for i in range(len(prompts))))
    x = prompts[3][None].to(DEVICE)
    eager = llm.generate(x, max_new_tokens=n_new, eos_token_id=-1, repetition_penalty=1.0)
    graph = llm.generate(x, max_new_tokens=n_new, eos_token_id=-1, repetition_penalty=1.0, compile=True)
    emit("check", what="compiled CUDA-graph decode = eager (greedy, fp32)", ok=torch.equal(eager, graph))
    del llm
    free()

    # 3. GPTQ layers on every CUDA path against their dequantized reference.
    from telechat.quant import QuantConfig, QuantLinear
    from telechat.quant.gptq import rtn

    for bits in (4, 8):
        for act_order in (False, True):
            N, K, gs = 512, 1024, 128
            w = torch.randn(N, K, generator=g) * 0.02
            qw = rtn(w, QuantConfig(bits=bits, group_size=gs, sym=bits == 8))
            if act_order:
                perm = torch.randperm(K, generator=g)
                qw.g_idx = (torch.arange(K) // gs)[perm].to(torch.int32)
            ref_w = qw.dequantize()
            bias = torch.randn(N, generator=g) * 0.01
            for kernel in ("auto", "triton", "dequant"):
                for dtype in (torch.bfloat16, torch.float32):
                    layer = QuantLinear.from_weight(qw.to(DEVICE), bias.to(DEVICE), dtype)
                    path = layer.prepare(kernel)
                    for M in (1, 5, 40):
                        xx = torch.randn(M, K, generator=g).to(DEVICE, dtype)
                        ref = xx.double() @ ref_w.to(DEVICE).double().t() + bias.to(DEVICE).double()
                        err = (layer(xx).double() - ref).abs().max().item() / ref.abs().max().item()
                        bf16_math = dtype != torch.float32 or path.endswith("pack")  # tinygemm takes bf16 inputs
                        emit("check", what=f"GPTQ int{bits} layer", act_order=act_order, kernel=kernel, path=path,
                             dtype=str(dtype), rows=M, max_rel_err=err, ok=err < (2e-2 if bf16_math else 2e-3))

    # 4. Packed SFT: FlexAttention = per-segment attention, and a short run whose loss falls.
    seg = torch.tensor([[0] * 7 + [1] * 300 + [2] * 150 + [3] * 55, [1] * 400 + [0] * 112]).to(DEVICE)
    q = torch.randn(2, 16, 512, 128, generator=g).to(DEVICE, torch.bfloat16)
    k = torch.randn(2, 4, 512, 128, generator=g).to(DEVICE, torch.bfloat16)
    v = torch.randn(2, 4, 512, 128, generator=g).to(DEVICE, torch.bfloat16)
    flex = PackedSegments(seg).attend(q, k, v).float().cpu()
    spans = PackedSegments(seg.cpu()).attend(q.float().cpu(), k.float().cpu(), v.float().cpu())
    emit("check", what="packed FlexAttention = per-segment SDPA", rel_err=rel(flex, spans), ok=rel(flex, spans) < 2e-2)
    llm = model_on_device("small", dtype=torch.float32, training_seqlen=64)
    model = llm.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=DEVICE == "cuda")
    B, T = 4, 256
    data = torch.randint(4, 300, (B, T), generator=g)  # a small vocabulary slice: learnable
    segs = torch.tensor([[1] * 100 + [2] * 60 + [3] * 96] * B)
    data, segs = data.to(DEVICE), segs.to(DEVICE)
    labels = packed_labels(data, None, segs)
    losses = []
    for _ in range(30):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = causal_lm_loss(model(data, segment_ids=segs), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    emit("check", what="packed SFT loss falls (30 steps, bf16 autocast, FlexAttention)", first=losses[0],
         last=losses[-1], ok=losses[-1] < 0.5 * losses[0])
    del llm, model, opt
    free()


# ---- decode -----------------------------------------------------------------------------------------
def decode_rates(name: str, llm, batches, engines, n_new: int, prompt_len: int, bw: float, weight_bytes=None,
                 hf=None, tag: str = "") -> None:
    cfg = llm.config
    weight_bytes = weight_bytes or sum(p.numel() * p.element_size() for p in llm.model.parameters())
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def run(engine, x, n):
        if engine == "hf":
            with torch.inference_mode():
                return hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                   pad_token_id=0, attention_mask=torch.ones_like(x))
        return llm.generate(x, max_new_tokens=n, eos_token_id=-1, repetition_penalty=1.0,
                            compile=engine.endswith("compiled"))

    for B in batches:
        x = torch.randint(0, cfg.vocab_size, (B, prompt_len), device=DEVICE, generator=g)
        for engine in engines:
            if left() < 30:
                emit("decode", shape=name, batch=B, engine=engine + tag, skipped="budget")
                continue
            t0 = time.time()
            run(engine, x, n_new)  # warm-up (and compile)
            warm = time.time() - t0
            t1 = min(timed(lambda: run(engine, x, 1)) for _ in range(2))
            tn = timed(lambda: run(engine, x, n_new))
            step = (tn - t1) / (n_new - 1)
            kv_bytes = 2 * cfg.n_layer * B * (prompt_len + n_new / 2) * cfg.n_kv_head * cfg.head_dim * 2
            emit("decode", shape=name, batch=B, engine=engine + tag, tok_s=B / step, ms_step=step * 1e3,
                 prefill_tok_s=B * prompt_len / t1, bw_frac=(weight_bytes + kv_bytes) / step / 1e9 / bw,
                 warmup_s=warm)


def decode(bw: float) -> None:
    for name, batches in (("1B", [1, 32]), ("7B", [1])):
        if name not in ARGS.decode_shapes.split(","):
            continue
        if left() < 60:
            emit("decode", shape=name, skipped="budget")
            continue
        llm = model_on_device(name)
        hf = hf_copy(llm.model)
        ids = torch.randint(0, llm.config.vocab_size, (1, 64), device=DEVICE)
        with torch.inference_mode():
            r = rel(llm.model(ids).float(), hf(ids).logits.float())
        emit("decode", shape=name, what="logits rel err vs HF (bf16)", rel_err=r)
        decode_rates(name, llm, batches, ARGS.decode_engines.split(","), ARGS.new_tokens,
                     ARGS.prompt_len, bw, hf=hf)
        del llm, hf
        free()
        torch._dynamo.reset()


def quant(bw: float) -> None:
    from telechat.quant import QuantConfig, QuantLinear
    from telechat.quant.format import QUANTIZED_MODULES
    from telechat.quant.gptq import rtn

    for bits in [int(b) for b in ARGS.quant_bits.split(",")]:
        if left() < 90:
            emit("quant", bits=bits, skipped="budget")
            continue
        llm = model_on_device(ARGS.quant_shape)
        qcfg = QuantConfig(bits=bits, group_size=64 if ARGS.small else 128, sym=True)
        with torch.no_grad():
            for block in llm.model.transformer.h:
                for name in QUANTIZED_MODULES:
                    lin = block.get_submodule(name)
                    layer = QuantLinear.from_weight(rtn(lin.weight.float(), qcfg), lin.bias, torch.bfloat16)
                    layer.prepare(ARGS.quant_kernel)
                    parent, _, attr = name.rpartition(".")
                    setattr(block.get_submodule(parent), attr, layer)
        free()
        paths = sorted({m.path for m in llm.model.modules() if isinstance(m, QuantLinear)})
        weight_bytes = sum(b.numel() * b.element_size() for n, b in llm.model.named_buffers()
                           if n.endswith(("qrows", "srows", "zrows", "_w", "_s"))) + \
            sum(p.numel() * p.element_size() for p in llm.model.parameters())
        decode_rates(ARGS.quant_shape, llm, [1], ["telechat", "telechat-compiled"], ARGS.new_tokens,
                     ARGS.prompt_len, bw, weight_bytes=weight_bytes, tag=f"-int{bits}({'+'.join(paths)})")
        del llm
        free()
        torch._dynamo.reset()


# ---- train ------------------------------------------------------------------------------------------
def train() -> None:
    B, T, steps = ARGS.train_batch, ARGS.train_seq, 6
    peak = bf16_peak()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(T // 32, T // 2, (400,), generator=g).tolist()
    segs = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):  # pack dialogues of random lengths, the tail of each row is padding
        pos, k = 0, 1
        while pos < T:
            n = lengths[(b * 37 + k) % len(lengths)]
            if pos + n > T:
                break
            segs[b, pos:pos + n], pos, k = k, pos + n, k + 1
    real_tokens = int((segs > 0).sum())
    for engine in ARGS.train_engines.split(","):
        if left() < 60:
            emit("train", engine=engine, skipped="budget")
            continue
        llm = model_on_device(ARGS.train_shape, dtype=torch.float32)
        cfg = llm.config
        if engine.startswith("hf"):
            model = hf_copy(llm.model).train()
            del llm
        else:
            model = llm.model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        forward = torch.compile(model) if engine.endswith("compiled") else model
        ids = torch.randint(4, cfg.vocab_size, (B, T), device=DEVICE)
        s = segs.to(DEVICE)
        labels = packed_labels(ids, None, s)

        def step():
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                if engine.startswith("hf"):
                    logits = forward(ids).logits
                else:
                    logits = forward(ids, segment_ids=s)
                loss = causal_lm_loss(logits, labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(2):
            step()
        dt = timed(lambda: [step() for _ in range(steps)]) / steps
        # matmul parameters: all but the input embedding (a lookup), unless it is tied to the head
        embed = model.get_input_embeddings() if engine.startswith("hf") else model.transformer.word_embeddings
        n_params = sum(p.numel() for p in model.parameters()) - (0 if cfg.tie_word_embeddings else embed.weight.numel())
        # 6 N per token plus attention (causal, within each document for telechat; whole rows for HF)
        L, H = cfg.n_layer, cfg.hidden_size
        # causal attention within each document: the useful work, counted the same for both engines
        attn = 6 * L * H * sum(int(n) ** 2 for b in range(B) for n in torch.bincount(segs[b])[1:].tolist())
        flops = 6 * n_params * real_tokens + attn
        emit("train", engine=engine, shape=ARGS.train_shape, batch=B, seq=T, real_tokens=real_tokens,
             s_per_step=dt, tok_s=real_tokens / dt, mfu=flops / dt / peak,
             peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9 if DEVICE == "cuda" else None)
        del model, opt
        free()
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()


# ---- serve ------------------------------------------------------------------------------------------
def serve() -> None:
    if left() < 90:
        emit("serve", skipped="budget")
        return
    tok = telechat.load_tokenizer(ARGS.tokenizer) if ARGS.tokenizer else None
    if tok is None:
        emit("serve", skipped="no --tokenizer")
        return
    out = Path(tempfile.mkdtemp(prefix="gpu-serve-"))
    llm = telechat.from_preset(ARGS.serve_shape, device=DEVICE, dtype=torch.bfloat16, seed=0, tokenizer=tok,
                               vocab_size=len(tok))
    llm.save(out)
    del llm
    free()
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--model", str(out), "--levels",
           ARGS.serve_levels, "--requests-per-client", "1", "--max-tokens", "64", "--server-args",
           f"--device {DEVICE} --dtype bfloat16 --max-model-len 1024"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30, left() - 10), env=env)
        print(r.stdout[-4000:], r.stderr[-3000:], flush=True)
        emit("serve", returncode=r.returncode, table=[ln for ln in r.stdout.splitlines() if ln.startswith("|")])
    except subprocess.TimeoutExpired as e:
        emit("serve", skipped=f"timed out: {str(e.stdout)[-2000:]}")


def main() -> None:
    global ARGS, DEVICE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="check,decode,quant,train,serve")
    ap.add_argument("--budget", type=float, default=480, help="seconds for the whole run")
    ap.add_argument("--device", default="cuda", help="cpu runs a smoke test of this script")
    ap.add_argument("--small", action="store_true", help="small shapes everywhere (smoke run)")
    ap.add_argument("--oracle", default=str(ROOT.parent / "shared" / "oracle" / "v12"))
    ap.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "telechat-official" / "12B" / "tokenizer.model"))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--decode-shapes", default="1B,7B")
    ap.add_argument("--decode-engines", default="hf,telechat,telechat-compiled")
    ap.add_argument("--quant-bits", default="4,8")
    ap.add_argument("--quant-kernel", default="auto", help="auto, packed, triton or dequant")
    ap.add_argument("--train-engines", default="telechat,hf", help="also telechat-compiled, hf-compiled")
    ap.add_argument("--jsonl", default=os.path.join(os.environ["OUT"], "gpu_bench.jsonl") if "OUT" in os.environ else None)
    ARGS = ap.parse_args()
    DEVICE = ARGS.device
    small = ARGS.small
    ARGS.quant_shape = "small" if small else "7B"
    ARGS.train_shape, ARGS.train_seq, ARGS.train_batch = ("small", 256, 2) if small else ("1B", 2048, 8)
    ARGS.serve_shape = "small" if small else "1B"
    ARGS.serve_levels = "1,4" if small else "1,32,128"
    for knob in ("cache_size_limit", "recompile_limit"):  # many shapes in one process: never fall back to eager
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_bench.py needs a CUDA device (or --device cpu for a smoke run)")
    bw = bandwidth_gbs()
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else platform.processor() or "cpu"
    emit("env", device=name, torch=torch.__version__, python=platform.python_version(), copy_gbs=bw,
         bf16_peak_tflops=bf16_peak() / 1e12)
    for section in ARGS.sections.split(","):
        t = time.time()
        try:
            if section == "decode" and small:
                llm = model_on_device("small")
                decode_rates("small", llm, [1, 4], ["hf", "telechat", "telechat-compiled"], 8, 16, bw,
                             hf=hf_copy(llm.model))
            else:
                {"check": check, "decode": lambda: decode(bw), "quant": lambda: quant(bw), "train": train,
                 "serve": serve}[section]()
        except Exception as e:  # one failing section must not cost the others
            import traceback

            traceback.print_exc()
            emit(section, error=f"{type(e).__name__}: {e}")
        free()
        print(f"[{section}: {time.time() - t:.0f} s, {left():.0f} s left]", flush=True)
    bad = [r for r in ROWS if r.get("ok") is False]
    print(f"\n{len([r for r in ROWS if r.get('ok')])} checks ok, {len(bad)} failed")
    for r in bad:
        print("FAILED:", json.dumps(r, default=str))


if __name__ == "__main__":
    main()

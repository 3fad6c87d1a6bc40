"""GPU decode benchmark: telechat vs HF transformers, 1B and 7B shapes in bf16, one call.

    python benchmarks/gpu_bench.py [--shapes 1B,7B] [--batches 1,32] [--new-tokens 128]

For each shape: random weights on the GPU, the same weights in HF's LlamaForCausalLM, a
correctness check (forward logits and greedy tokens), then decode tok/s at each batch size for
HF eager, telechat eager and telechat compiled (CUDA graphs), and the fraction of the measured
memory bandwidth each reaches (weights + KV cache read per step / step time).
Needs only torch and transformers; runs offline.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import telechat  # noqa: E402
from telechat.generate import _compiled_steps  # noqa: E402
from telechat.hf import to_hf_llama  # noqa: E402


DEVICE = "cuda"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def bandwidth_gbs() -> float:
    """Device memory bandwidth from a large copy (bytes read + written per second)."""
    x = torch.empty(1 << 30 if DEVICE == "cuda" else 1 << 27, dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync()
    t = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    sync()
    return 2 * x.numel() * 20 / (time.perf_counter() - t) / 1e9


def timed(fn) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def bench_shape(name: str, batches: list[int], prompt_len: int, new_tokens: int, bw: float) -> list[dict]:
    llm = telechat.from_preset(name, device=DEVICE, dtype=torch.bfloat16, seed=0)
    with torch.no_grad():
        for pname, p in llm.model.named_parameters():
            if pname.endswith("bias"):
                p.normal_(std=0.02)
    hf = to_hf_llama(llm.model).to(DEVICE)
    cfg = llm.config
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    rows = []
    g = torch.Generator(device=DEVICE).manual_seed(0)
    # Correctness: forward logits and greedy tokens against HF.
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), device=DEVICE, generator=g)
    with torch.inference_mode():
        a, b = llm.model(ids).float(), hf(ids).logits.float()
    rel = ((a - b).norm() / b.norm()).item()
    ours = llm.generate(ids, max_new_tokens=32, eos_token_id=-1, repetition_penalty=1.0)[0, prompt_len:]
    with torch.inference_mode():
        theirs = hf.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones_like(ids))[0, prompt_len:]
    agree = (ours == theirs).float().mean().item()
    print(f"{name}: {weight_bytes / 1e9:.2f} GB bf16 weights; logits rel err vs HF {rel:.2e}; "
          f"greedy tokens equal to HF {agree:.0%} of 32", flush=True)

    def ours_gen(x, n, compile_):
        return llm.generate(x, max_new_tokens=n, eos_token_id=-1, repetition_penalty=1.0, compile=compile_)

    def hf_gen(x, n):
        with torch.inference_mode():
            return hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                               pad_token_id=0, attention_mask=torch.ones_like(x))

    engines = {"hf": hf_gen, "telechat": lambda x, n: ours_gen(x, n, False),
               "telechat-compiled": lambda x, n: ours_gen(x, n, True)}
    for B in batches:
        x = torch.randint(0, cfg.vocab_size, (B, prompt_len), device=DEVICE, generator=g)
        for engine, fn in engines.items():
            fn(x, new_tokens)  # warm-up / compile
            fn(x, new_tokens)
            t1 = min(timed(lambda: fn(x, 1)) for _ in range(2))
            tn = min(timed(lambda: fn(x, new_tokens)) for _ in range(2))
            step = (tn - t1) / (new_tokens - 1)
            kv_bytes = 2 * cfg.n_layer * B * (prompt_len + new_tokens / 2) * cfg.n_kv_head * cfg.head_dim * 2
            frac = (weight_bytes + kv_bytes) / step / 1e9 / bw
            rows.append({"shape": name, "batch": B, "engine": engine, "tok_s": B / step, "ms_step": step * 1e3,
                         "bw_frac": frac})
            print(f"  {name} b={B} {engine}: {B / step:.1f} tok/s ({step * 1e3:.2f} ms/step, {frac:.0%} of bandwidth)",
                  flush=True)
    del llm, hf
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    _compiled_steps.clear()
    torch._dynamo.reset()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1B,7B")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--device", default="cuda", help="cpu runs a smoke test of this script")
    a = ap.parse_args()
    global DEVICE
    DEVICE = a.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_bench.py needs a CUDA device")
    bw = bandwidth_gbs()
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, measured copy bandwidth {bw:.0f} GB/s\n")
    rows = []
    for name in a.shapes.split(","):
        rows += bench_shape(name, [int(b) for b in a.batches.split(",")], a.prompt_len, a.new_tokens, bw)
    print("\n| shape | batch | engine | decode tok/s | ms/step | vs HF | of bandwidth |\n|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(x for x in rows if x["shape"] == r["shape"] and x["batch"] == r["batch"] and x["engine"] == "hf")
        print(f"| {r['shape']} | {r['batch']} | {r['engine']} | {r['tok_s']:.1f} | {r['ms_step']:.2f} | "
              f"{r['tok_s'] / base['tok_s']:.2f}x | {r['bw_frac']:.0%} |")


if __name__ == "__main__":
    main()

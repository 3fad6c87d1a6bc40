"""Batch-1 generation on CPU with default arguments: `LLM.generate` vs HF transformers (eager) vs
llama.cpp (llama-cpp-python), all on the default model's weights at one precision.

    python benchmarks/engine_bench.py                   # --dtype auto: what `telechat.load` picks here
    python benchmarks/engine_bench.py --dtype float32 --new-tokens 128 --rounds 3
    python benchmarks/engine_bench.py --startup         # also: `telechat chat --prompt` start-up times

Each engine runs in its own process (llama.cpp and torch in one process crashed here), on the same
weights: telechat loads the imported default model, HF transformers dequantizes the same GGUF,
llama.cpp reads a GGUF exported from the telechat folder at the same precision (F32 for fp32, BF16
for bf16). Times are end to end (prompt prefill + every new token), best of --rounds after a
warm-up call (which for telechat includes compiling its decode step). Prints the CPU flags: the
ratios hold for this machine only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = ("<|im_start|>user\nWrite a short story about a lighthouse keeper who finds a message in a bottle."
          "<|im_end|>\n<|im_start|>assistant\n")


def prepare(folder: Path, outtype: str) -> None:
    from telechat.convert import import_gguf
    from telechat.default_model import smollm2_gguf
    from telechat.gguf_export import export_gguf

    import_gguf(smollm2_gguf(), folder / "telechat", progress=False, keep_quantized=False)  # float, as the default model
    export_gguf(folder / "telechat", folder / f"model-{outtype}.gguf", outtype=outtype)


def best(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def run_engine(engine: str, folder: Path, dtype: str, new_tokens: int, rounds: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import telechat

    prompt = telechat.load_tokenizer(folder / "telechat").encode(PROMPT)
    info = {}
    if engine == "telechat":
        t = time.perf_counter()
        llm = telechat.load(folder / "telechat", dtype=dtype)  # everything else: defaults
        info = {"dtype": str(llm.dtype).removeprefix("torch."), "decoder": llm.engine.decoder,
                "load_s": time.perf_counter() - t}

        def gen(n):
            return llm.generate([prompt], max_new_tokens=n, eos_token_id=-1)[0, len(prompt):].tolist()
    elif engine == "hf":
        from transformers import AutoModelForCausalLM

        from telechat.default_model import smollm2_gguf

        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        gguf = smollm2_gguf()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch_dtype).eval()
        ids = torch.tensor([prompt])

        def gen(n):
            with torch.inference_mode():
                return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                      pad_token_id=0, attention_mask=torch.ones_like(ids))[0, len(prompt):].tolist()
    else:
        from llama_cpp import Llama

        outtype = {"float32": "f32", "bfloat16": "bf16"}[dtype]
        model = Llama(model_path=str(folder / f"model-{outtype}.gguf"), n_ctx=1024, n_threads=threads,
                      n_threads_batch=threads, n_batch=512, verbose=False)

        def gen(n):
            model.reset()
            out = []
            for tok in model.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                out.append(tok)
                if len(out) == n:
                    break
            return out
    t = time.perf_counter()
    tokens = gen(new_tokens)  # warm-up (telechat: compiles the decode step, or loads it from the cache)
    info["warmup_s"] = time.perf_counter() - t
    prefill = best(lambda: gen(1), rounds)
    full = best(lambda: gen(new_tokens), rounds)
    return {**info, "e2e_tok_s": new_tokens / full, "prefill_tok_s": len(prompt) / prefill,
            "decode_tok_s": (new_tokens - 1) / max(full - prefill, 1e-9), "tokens": tokens[:24],
            "prompt_len": len(prompt)}


def startup(dtype: str) -> list[tuple[str, float]]:
    """`telechat chat --prompt` wall time: first with an empty compile cache, then again."""
    out = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for label in ("first run (empty compile cache)", "second run (compile cache warm)"):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "telechat.cli", "chat", "--prompt", "Hello! Who are you?",
                            "--max-new-tokens", "32", "--dtype", dtype], env=env, check=True,
                           capture_output=True, text=True)
            out.append((label, time.perf_counter() - t))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--engines", default="telechat,hf,llama.cpp")
    ap.add_argument("--startup", action="store_true", help="also time `telechat chat --prompt` start-up")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--prepare", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.prepare:
        prepare(Path(a.prepare[0]), a.prepare[1])
        return
    if a.worker:
        engine, folder, dtype = a.worker
        print("RESULT " + json.dumps(run_engine(engine, Path(folder), dtype, a.new_tokens, a.rounds, a.threads)))
        return
    import torch

    from telechat.device import cpu_summary, resolve_dtype

    dtype = a.dtype if a.dtype != "auto" else str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, __file__, "--prepare", tmp, {"float32": "f32", "bfloat16": "bf16"}[dtype]],
                       check=True)
        for engine in a.engines.split(","):
            if engine == "llama.cpp":
                try:
                    import llama_cpp  # noqa: F401
                except ImportError:
                    print("llama.cpp: llama-cpp-python is not installed (pip install -e '.[bench]'), skipped",
                          file=sys.stderr)
                    continue
            out = subprocess.run([sys.executable, __file__, "--worker", engine, tmp, dtype, "--new-tokens",
                                  str(a.new_tokens), "--rounds", str(a.rounds), "--threads", str(a.threads)],
                                 capture_output=True, text=True)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{engine} failed:\n{out.stderr[-3000:]}")
            results[engine] = json.loads(line[7:])
    first = next(iter(results.values()))
    ours = results.get("telechat")
    print(f"\nDefault model (SmolLM2-135M-Instruct), {dtype}, batch 1, prompt {first['prompt_len']} tokens + "
          f"{a.new_tokens} new, {a.threads} threads, torch {torch.__version__}")
    print(f"CPU: {cpu_summary()}")
    if ours:
        print(f"telechat defaults: dtype {ours['dtype']}, {ours['decoder']} decode, "
              f"warm-up call {ours['warmup_s']:.1f} s")
    print("\n| engine | end-to-end tok/s | telechat vs it | prefill tok/s | decode tok/s |\n|---|---:|---:|---:|---:|")
    for engine, r in results.items():
        ratio = f"{ours['e2e_tok_s'] / r['e2e_tok_s']:.2f}x" if ours and engine != "telechat" else "-"
        print(f"| {engine} | {r['e2e_tok_s']:.1f} | {ratio} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} |")
    if ours:
        same = {e: r["tokens"] == ours["tokens"] for e, r in results.items() if e != "telechat"}
        print(f"\ngreedy tokens equal to telechat's (first 24): {same}")
    if a.startup:
        print("\n| `telechat chat --prompt` (32 new tokens) | wall s |\n|---|---:|")
        for label, s in startup(dtype):
            print(f"| {label} | {s:.1f} |")


if __name__ == "__main__":
    main()

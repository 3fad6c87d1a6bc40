"""Quantized decode on CPU against llama.cpp, same weights: the default model's own Q4_1 GGUF (and the
same model re-quantized to Q8_0), run by llama.cpp and by telechat from its kept-quantized import.

    python benchmarks/quant_cpu_bench.py [--new-tokens 128] [--rounds 3] [--threads N]

Each engine runs in its own process; llama.cpp with a 512-token context (llama.cpp and torch in one process crashed here). Per engine:
batch-1 decode tok/s for --new-tokens tokens after the chat prompt, prefill tok/s of that prompt and of a
--long-prompt token one, peak RSS; telechat also batch-8 decode (8 prompts at once through the engine),
with its default decode step (on CPU the native one, telechat/native.py) and with the torch.compile one.
Prints the CPU flags, a table, and the ratios the issue's targets name, for the default:
int4 >= 1.0x llama.cpp Q4_1, int8 >= 1.0x Q8_0, prefill >= 0.8x, RSS <= 1.5x, batch-8 >= 3x batch-1.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

PROMPT = ("<|im_start|>user\nWrite a short story about a lighthouse keeper who finds a message in a bottle."
          "<|im_end|>\n<|im_start|>assistant\n")
FILLER = ("The lighthouse stood on the rocks for a hundred years, and every night its keeper climbed the stairs "
          "to light the lamp. ")


def prepare(work: Path) -> dict[str, Path]:
    from telechat.convert import import_gguf
    from telechat.default_model import smollm2_gguf
    from telechat.gguf_export import requantize_gguf

    work.mkdir(parents=True, exist_ok=True)
    q41 = smollm2_gguf()
    q80 = work / "smollm2-q8_0.gguf"
    if not q80.exists():
        requantize_gguf(q41, q80, "Q8_0")
    out = {"gguf-q4_1": q41, "gguf-q8_0": q80}
    for name, g in (("telechat-q4_1", q41), ("telechat-q8_0", q80)):
        folder = work / name
        if not (folder / "config.json").exists():
            import_gguf(g, folder, progress=False, keep_quantized=True)
        out[name] = folder
    return out


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_llama_cpp(gguf: str, new_tokens: int, rounds: int, threads: int, long_prompt: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=512, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
    prompt = llm.tokenize(PROMPT.encode(), special=True)
    long = (llm.tokenize((FILLER * 200).encode(), add_bos=False) * 2)[:long_prompt]
    best = {"decode_tok_s": 0.0, "prefill_tok_s": 0.0, "prefill_long_tok_s": 0.0}
    for _ in range(rounds + 1):  # the first round warms up
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        p = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([llm.sample(top_k=1, temp=0.0)])
        d = time.perf_counter() - t
        llm.reset()
        t = time.perf_counter()
        llm.eval(long)
        pl = time.perf_counter() - t
        best = {"decode_tok_s": max(best["decode_tok_s"], new_tokens / d),
                "prefill_tok_s": max(best["prefill_tok_s"], len(prompt) / p),
                "prefill_long_tok_s": max(best["prefill_long_tok_s"], len(long) / pl)}
    return best | {"peak_rss_mib": peak_rss_mib(), "prompt_len": len(prompt)}


def run_telechat(folder: str, new_tokens: int, rounds: int, threads: int, long_prompt: int,
                 compile: bool | None) -> dict:
    import torch

    import telechat

    torch.set_num_threads(threads)
    llm = telechat.load(folder)
    llm.engine.prefix_caching = False  # every round prefills its prompt again, as llama.cpp's reset does
    prompt = llm.tokenizer.encode(PROMPT)
    long = (llm.tokenizer.encode(FILLER * 200) * 2)[:long_prompt]

    def gen(ids, n):
        return llm.generate(ids, max_new_tokens=n, do_sample=False, repetition_penalty=1.0, eos_token_id=-1,
                            compile=compile)

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    gen([prompt], new_tokens + 1)  # warm up (and compile) the shapes timed below
    gen([long], 1)
    best = {"decode_tok_s": 0.0, "prefill_tok_s": 0.0, "prefill_long_tok_s": 0.0, "batch8_decode_tok_s": 0.0}
    padded = [prompt] * 8  # 8 sequences decoding together
    gen(padded, 2)
    for _ in range(rounds):
        p = timed(lambda: gen([prompt], 1))
        f = timed(lambda: gen([prompt], new_tokens + 1))
        pl = timed(lambda: gen([long], 1))
        p8 = timed(lambda: gen(padded, 1))
        f8 = timed(lambda: gen(padded, new_tokens + 1))
        best = {"decode_tok_s": max(best["decode_tok_s"], new_tokens / (f - p)),
                "prefill_tok_s": max(best["prefill_tok_s"], len(prompt) / p),
                "prefill_long_tok_s": max(best["prefill_long_tok_s"], len(long) / pl),
                "batch8_decode_tok_s": max(best["batch8_decode_tok_s"], 8 * new_tokens / (f8 - p8))}
    from telechat.quant import kernels

    return best | {"peak_rss_mib": peak_rss_mib(), "prompt_len": len(prompt), "isa": kernels.cpu_isa(),
                   "decoder": llm.engine.decoder}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--long-prompt", type=int, default=256)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--engine", help=argparse.SUPPRESS)  # internal: run one engine and print its JSON
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)  # else the default decode step
    args = ap.parse_args()
    if args.engine:
        if args.engine == "llama.cpp":
            res = run_llama_cpp(args.path, args.new_tokens, args.rounds, args.threads, args.long_prompt)
        else:
            res = run_telechat(args.path, args.new_tokens, args.rounds, args.threads, args.long_prompt,
                               True if args.compile else None)
        print(json.dumps(res))
        return 0

    from telechat.default_model import telechat_home
    from telechat.device import cpu_summary

    work = Path(args.workdir) if args.workdir else telechat_home() / "quant-cpu-bench"
    paths = prepare(work)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, "
          f"CPU flags: {cpu_summary()}")
    runs = {"llama.cpp Q4_1": ("llama.cpp", paths["gguf-q4_1"], False),
            "llama.cpp Q8_0": ("llama.cpp", paths["gguf-q8_0"], False),
            "telechat Q4_1": ("telechat", paths["telechat-q4_1"], False),
            "telechat Q4_1 compiled": ("telechat", paths["telechat-q4_1"], True),
            "telechat Q8_0": ("telechat", paths["telechat-q8_0"], False),
            "telechat Q8_0 compiled": ("telechat", paths["telechat-q8_0"], True)}
    results = {}
    for name, (engine, path, comp) in runs.items():
        cmd = [sys.executable, __file__, "--engine", engine, "--path", str(path), "--new-tokens", str(args.new_tokens),
               "--rounds", str(args.rounds), "--threads", str(args.threads), "--long-prompt", str(args.long_prompt)]
        r = subprocess.run(cmd + (["--compile"] if comp else []), capture_output=True, text=True, timeout=3600)
        if r.returncode != 0:
            print(f"{name}: failed\n{r.stderr[-2000:]}")
            continue
        results[name] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]}", flush=True)
        if engine == "telechat" and not comp:
            results[name]["name"] = f"{name} (default: {results[name]['decoder']} decode)"
    print(f"\nbatch-1 decode of {args.new_tokens} tokens after a {results.get('telechat Q4_1', {}).get('prompt_len')}"
          f"-token chat prompt; prefill of that prompt and of {args.long_prompt} tokens; best of {args.rounds}")
    print("| engine | decode tok/s | prefill tok/s (chat / long) | batch-8 decode tok/s | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        b8 = f"{r['batch8_decode_tok_s']:.0f}" if "batch8_decode_tok_s" in r else "-"
        print(f"| {r.get('name', name)} | {r['decode_tok_s']:.1f} | {r['prefill_tok_s']:.0f} / {r['prefill_long_tok_s']:.0f} | "
              f"{b8} | {r['peak_rss_mib']:.0f} |")
    print("\ntargets (ours with default settings / llama.cpp):")
    for bits, ref in (("Q4_1", "llama.cpp Q4_1"), ("Q8_0", "llama.cpp Q8_0")):
        mine, base = results.get(f"telechat {bits}"), results.get(ref)
        if not mine or not base:
            continue
        dec = mine["decode_tok_s"] / base["decode_tok_s"]
        pre = mine["prefill_long_tok_s"] / base["prefill_long_tok_s"]
        rss = mine["peak_rss_mib"] / base["peak_rss_mib"]
        b8 = mine["batch8_decode_tok_s"] / mine["decode_tok_s"]
        print(f"- {bits}: decode {dec:.2f}x (>= 1.0: {'PASS' if dec >= 1 else 'MISS'}), long prefill {pre:.2f}x "
              f"(>= 0.8: {'PASS' if pre >= 0.8 else 'MISS'}), peak RSS {rss:.2f}x (<= 1.5: "
              f"{'PASS' if rss <= 1.5 else 'MISS'}), batch-8 / batch-1 {b8:.1f}x (>= 3: {'PASS' if b8 >= 3 else 'MISS'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

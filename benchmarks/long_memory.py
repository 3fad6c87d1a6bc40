"""Peak memory of long prompts on CPU: the engine's chunked prefill and `longppl`'s chunked scoring.

    python benchmarks/long_memory.py                          # the default model, 2K-32K tokens
    python benchmarks/long_memory.py --lengths 4096,16384 --model path/to/checkpoint

Each (path, length) runs in a fresh process: the model is loaded, the peak-RSS counter is reset
(/proc/self/clear_refs), then either a prompt of LENGTH tokens is prefilled by the engine and one
token generated (`engine`, what chat/serve/passkey do) or the last 256 tokens of a LENGTH-token text
are scored (`longppl`); both on a passkey prompt (memory does not depend on the text). The table shows the resident memory after loading, the peak while running,
the KV cache the length needs (2 x layers x kv heads x head dim x LENGTH at the model's dtype) and
what the peak adds beyond both; the target is at most 1 GiB. Prints the CPU flags.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time
import telechat
from telechat.eval.long import greedy, passkey_prompt, tail_perplexity

model, path, length = sys.argv[1], sys.argv[2], int(sys.argv[3])

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

llm = telechat.load(model)
prompt = passkey_prompt(llm.tokenizer, length, 0.5, "12345")  # memory does not depend on the text
llm.engine.configure(compile=False)  # the compiled decode step would add its compile-time memory
import gc; gc.collect()
loaded = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM, the peak-RSS counter
t = time.perf_counter()
if path == "engine":
    greedy(llm, [prompt], 1)
    pool = llm.engine.kv.capacity * llm.engine.kv.bytes_per_block() \
        if llm.engine.kv is not None else 0
else:
    tail_perplexity(llm.model, prompt)
    pool = 0
c = llm.config
kv = 2 * c.n_layer * c.n_kv_head * c.head_dim * len(prompt) * llm.dtype.itemsize
print(json.dumps({"tokens": len(prompt), "loaded": loaded, "peak": status("VmHWM"), "kv": kv, "pool": pool,
                  "seconds": time.perf_counter() - t, "dtype": str(llm.dtype).replace("torch.", "")}))
"""


def run(model: str, path: str, length: int) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, model, path, str(length)], capture_output=True, text=True,
                       timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"{path} at {length} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--lengths", default="2048,4096,8192,16384,32768")
    ap.add_argument("--paths", default="engine,longppl")
    args = ap.parse_args()
    from telechat.device import cpu_summary

    print(f"CPU flags: {cpu_summary()}")
    MB = 1 << 20
    print("| path | tokens | dtype | after load MiB | peak MiB | KV needed MiB | engine pool MiB | beyond load + KV MiB "
          "| target <= 1024 | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for length in [int(x) for x in args.lengths.split(",")]:
        for path in args.paths.split(","):
            r = run(args.model, path, length)
            extra = (r["peak"] - r["loaded"] - r["kv"]) / MB
            print(f"| {path} | {r['tokens']} | {r['dtype']} | {r['loaded'] / MB:.0f} | {r['peak'] / MB:.0f} | "
                  f"{r['kv'] / MB:.0f} | {r['pool'] / MB:.0f} | {extra:.0f} | {'yes' if extra <= 1024 else 'NO'} | "
                  f"{r['seconds']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

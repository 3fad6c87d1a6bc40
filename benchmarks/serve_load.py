"""Load test of `telechat serve`: rounds of 1, 16 and 32 concurrent streaming chat clients.

Starts the server on loopback (unless --url is given), runs each round for a bounded number of
requests, and prints generated tokens/s, time to first token p50/p99 and errors, with the
throughput ratio against the one-client round measured in the same run, and against
`LLM.generate` on one stream (measured in its own process before the server starts).
Then the interference round: while 8 streams decode, a ~2,000-token prompt arrives; the table
gives the streams' median inter-token gap and their worst gap while it is prefilled.

    python benchmarks/serve_load.py                   # default model, levels 1, 16, 32
    python benchmarks/serve_load.py --levels 1,4 --max-tokens 32 --no-interference
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import httpx

QUESTIONS = [
    "What is the capital of France?", "Give me three tips for better sleep.", "Explain what a CPU does.",
    "Write a haiku about the sea.", "What is photosynthesis?", "How do I boil an egg?",
    "Name three planets in our solar system.", "What is the difference between a list and a tuple in Python?",
    "Why is the sky blue?", "Suggest a name for a pet cat.", "What does HTTP stand for?",
    "How many legs does a spider have?", "请用一句话介绍一下北京。", "什么是人工智能？",
    "Describe a rainy day in two sentences.", "What is 12 times 12?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, concurrency: int, queue: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "telechat.cli", "serve", "--model", model, "--port", str(port),
           "--max-concurrency", str(concurrency), "--max-queue", str(queue), "--log-level", "warning", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server at {url} not healthy after {timeout}s")


async def one_request(client: httpx.AsyncClient, url: str, model: str, question: str, max_tokens: int,
                      stamps: list | None = None) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens, done = None, 0, False
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"error": f"HTTP {r.status_code}: {r.text[:200]}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                if stamps is not None:
                    stamps.append(time.perf_counter())
                if ttft is None:
                    ttft = time.perf_counter() - t0
    if not done:
        return {"error": "stream ended without [DONE]"}
    return {"ttft": ttft if ttft is not None else time.perf_counter() - t0, "tokens": tokens}


async def run_round(url: str, model: str, clients: int, requests_per_client: int, max_tokens: int) -> dict:
    results: list[dict] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        async def worker(w: int):
            for i in range(requests_per_client):
                q = QUESTIONS[(w * requests_per_client + i) % len(QUESTIONS)]
                try:
                    results.append(await one_request(client, url, model, q, max_tokens))
                except httpx.HTTPError as e:
                    results.append({"error": f"{type(e).__name__}: {e}"})

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    ttfts = sorted(r["ttft"] for r in ok)

    def pct(p):
        return ttfts[min(len(ttfts) - 1, int(round(p / 100 * (len(ttfts) - 1))))] if ttfts else float("nan")

    tokens = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall": wall, "tok_s": tokens / wall,
            "ttft_p50": pct(50), "ttft_p99": pct(99), "errors": len(results) - len(ok),
            "first_error": next((r["error"] for r in results if "error" in r), None)}


LONG_TEXT = ("The history of lighthouses begins with fires lit on hilltops to guide ships at night. "
             "Over the centuries they became towers of stone with lamps, lenses and keepers who lived beside them. ")


async def interference(url: str, model: str, streams: int = 8, long_words: int = 1500) -> dict:
    """Inter-token gaps of `streams` decoding streams, before and while a long prompt is prefilled."""
    stamps: list[list[float]] = [[] for _ in range(streams)]
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        topics = ["a lighthouse keeper", "a lost dog", "a city under the sea", "a robot chef", "a mountain village",
                  "a time traveller", "a desert caravan", "a space station"]
        tasks = [asyncio.create_task(one_request(client, url, model, f"Write a long story about {topics[i % 8]}.",
                                                 400, stamps[i])) for i in range(streams)]
        while any(len(s) < 10 and not t.done() for s, t in zip(stamps, tasks)):  # every stream decoding
            await asyncio.sleep(0.01)
        words = (LONG_TEXT * 200).split()[:long_words]
        t_long = time.perf_counter()
        long = await one_request(client, url, model, " ".join(words) + "\nSummarize this in one word.", 1)
        t_done = time.perf_counter()
        await asyncio.sleep(0.5)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    gaps_before, gaps_during = [], []
    for s in stamps:
        for a, b in zip(s, s[1:]):
            (gaps_before if b < t_long else gaps_during if a <= t_done and b >= t_long else []).append(b - a)
    gaps_before.sort()
    median = gaps_before[len(gaps_before) // 2] if gaps_before else float("nan")
    worst = max(gaps_during, default=float("nan"))
    return {"median_gap": median, "worst_gap": worst, "ratio": worst / median, "long_ttft": long.get("ttft"),
            "long_error": long.get("error"), "prefill_s": t_done - t_long}


def generate_baseline(model: str, max_tokens: int, server_args: list[str], questions: list[str]) -> float:
    """Tokens/s of `LLM.chat` answering the one-client round's questions in turn (prefill included,
    stopping where the server's answers stop), in its own process."""
    dtype = server_args[server_args.index("--dtype") + 1] if "--dtype" in server_args else "auto"
    code = f"""
import time, telechat
llm = telechat.load({model!r}, dtype={dtype!r})
for q in {questions!r}:
    llm.chat(q, max_new_tokens={max_tokens})  # warm-up (compiles the decode step)
n, t = 0, time.perf_counter()
for q in {questions!r}:
    n += sum(1 for _ in llm.stream([llm.encode_chat(q)], max_new_tokens={max_tokens}))
print("RESULT", n / (time.perf_counter() - t))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")).split()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="checkpoint folder or 'default'")
    ap.add_argument("--url", default=None, help="use a running server instead of starting one")
    ap.add_argument("--levels", default="1,16,32", help="concurrent clients per round")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--server-args", default="", help="extra `telechat serve` flags, e.g. '--dtype bfloat16'")
    ap.add_argument("--no-interference", action="store_true", help="skip the long-prompt interference round")
    ap.add_argument("--no-baseline", action="store_true", help="skip the in-process LLM.generate baseline")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    baseline = None if args.no_baseline or args.url else generate_baseline(
        args.model, args.max_tokens, args.server_args.split(), QUESTIONS[:args.requests_per_client])

    proc = None
    url = args.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(args.model, port, max(levels), 2 * max(levels), args.server_args.split())
    try:
        wait_healthy(url, proc)
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        asyncio.run(run_round(url, model, 1, 1, 8))  # warm-up: compiles the one-row decode step
        asyncio.run(run_round(url, model, 4, 1, 8))  # and the batched one (any batch size above 1)
        rows = []
        for c in levels:
            rows.append(asyncio.run(run_round(url, model, c, args.requests_per_client, args.max_tokens)))
            print(f"round of {c} clients: {rows[-1]['tok_s']:.1f} tok/s, {rows[-1]['errors']} errors",
                  file=sys.stderr, flush=True)
        inter = None if args.no_interference else asyncio.run(interference(url, model))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)

    base = rows[0]["tok_s"]
    from telechat.device import cpu_summary

    print(f"\nserve_load: model {model}, max_tokens {args.max_tokens}, greedy, {args.requests_per_client} "
          f"requests per client, {os.cpu_count()} CPUs ({cpu_summary()}), server flags: {args.server_args or 'none'}")
    print(f"| clients | requests | gen tokens | wall s | gen tok/s | vs 1 client | TTFT p50 s | TTFT p99 s | errors |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['wall']:.1f} | {r['tok_s']:.1f} | "
              f"{r['tok_s'] / base:.2f}x | {r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | {r['errors']} |")
    for r in rows:
        if r["first_error"]:
            print(f"first error at {r['clients']} clients: {r['first_error']}")
    if baseline:
        print(f"\nLLM.stream, the same questions in-process: {baseline:.1f} tok/s; 1 client through the server: "
              f"{rows[0]['tok_s']:.1f} tok/s ({rows[0]['tok_s'] / baseline:.2f}x)")
    if inter:
        print(f"\ninterference: 8 streams decoding, a ~2,000-token prompt arrives (prefilled in "
              f"{inter['prefill_s']:.2f} s, error: {inter['long_error']})")
        print("| median inter-token gap s | worst gap while it is prefilled s | worst / median |\n|---:|---:|---:|")
        print(f"| {inter['median_gap']:.3f} | {inter['worst_gap']:.3f} | {inter['ratio']:.2f}x |")


if __name__ == "__main__":
    main()

"""Training speed on CPU: `telechat train` vs HF transformers' Trainer, same model, data and batch.

Both start from the same randomly initialised weights (ours as TeleChat, HF's as the equivalent
LlamaForCausalLM), train on the same token blocks with AdamW (0.9, 0.95), clipping 1.0 and a
cosine schedule, one process each (run one after the other in subprocesses, so peak memory is
each engine's own). Prints median tokens/s over the steps after the first and peak RSS.

    python benchmarks/train_bench.py [--preset 100M] [--seq-len 256] [--batch-size 2] [--steps 6]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_data(folder: Path, vocab: int, seq_len: int, blocks: int) -> None:
    """A prepared pre-training folder of random token blocks (what `data prepare --mode pretrain` writes)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", blocks), ("val", 0)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        np.save(folder / split / "input_ids.npy", rng.integers(4, vocab, (n, seq_len), dtype=np.int32))
        np.save(folder / split / "segment_ids.npy", np.ones((n, seq_len), np.uint16))
    (folder / "manifest.json").write_text(json.dumps({
        "format": "telechat-prepared-v1", "mode": "pretrain", "max_seq_len": seq_len, "seed": 0,
        "arrays": {"input_ids": "int32", "segment_ids": "uint16"}, "tokenizer": None}))


def run_telechat(args, data: Path, out: Path) -> dict:
    from telechat.train import TrainConfig, train

    s = train(TrainConfig(stage="pretrain", data=str(data), output=str(out), preset=args.preset,
                          max_steps=args.steps, per_device_batch_size=args.batch_size, learning_rate=3e-4,
                          progress=False, seed=0))
    rates = [h["tokens_per_s"] for h in s["history"][1:]]
    return {"tokens_per_s": statistics.median(rates), "loss": s["history"][-1]["loss"]}


def run_hf(args, data: Path, out: Path) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import telechat
    from telechat.hf import to_hf_llama

    torch.manual_seed(0)
    model = to_hf_llama(telechat.from_preset(args.preset, seed=0, seq_length=max(args.seq_len, 32)).model)
    model.config.use_cache = False
    ids = np.load(data / "train" / "input_ids.npy")

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            t = torch.from_numpy(ids[i].astype(np.int64))
            return {"input_ids": t, "labels": t}

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    targs = TrainingArguments(output_dir=str(out), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                              learning_rate=3e-4, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-5,
                              max_grad_norm=1.0, lr_scheduler_type="cosine", weight_decay=0.0, use_cpu=True,
                              report_to=[], save_strategy="no", logging_steps=1, dataloader_num_workers=0,
                              seed=0, disable_tqdm=True)
    result = Trainer(model=model, args=targs, train_dataset=Blocks(), callbacks=[Clock()]).train()
    tokens = args.batch_size * args.seq_len
    return {"tokens_per_s": statistics.median(tokens / t for t in times[1:]), "loss": result.training_loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="100M")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--engine", choices=["telechat", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:  # child process: one engine
        work = Path(args.work)
        r = (run_telechat if args.engine == "telechat" else run_hf)(args, work / "data", work / args.engine)
        r["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(r))
        return
    import telechat

    vocab = telechat.preset(args.preset).vocab_size
    work = Path(tempfile.mkdtemp())
    make_data(work / "data", vocab, args.seq_len, blocks=args.steps * args.batch_size)
    results = {}
    for engine in ("hf", "telechat"):
        cmd = [sys.executable, __file__, "--engine", engine, "--work", str(work), "--preset", args.preset,
               "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{engine} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        results[engine] = json.loads(line[7:])
    n = sum(p.numel() for p in telechat.from_preset(args.preset).model.parameters())
    print(f"\ntrain_bench: preset {args.preset} ({n / 1e6:.0f}M params), seq {args.seq_len}, batch {args.batch_size}, "
          f"{args.steps} steps (median of steps 2+), fp32, {os.cpu_count()} CPUs")
    print("| engine | tokens/s | vs HF | peak RSS MiB | vs HF | last loss |")
    print("|---|---:|---:|---:|---:|---:|")
    hf = results["hf"]
    for name, r in (("HF Trainer", hf), ("telechat train", results["telechat"])):
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / hf['tokens_per_s']:.2f}x | "
              f"{r['max_rss_mb']:.0f} | {r['max_rss_mb'] / hf['max_rss_mb']:.2f}x | {r['loss']:.3f} |")


if __name__ == "__main__":
    main()

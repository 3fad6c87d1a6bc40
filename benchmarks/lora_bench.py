"""LoRA SFT of the default model: full fine-tuning vs LoRA vs QLoRA (int4) with `telechat train`, and
PEFT + transformers' Trainer doing the same LoRA SFT on the same data.

Each run is its own subprocess (peak RSS is that run's own; the RSS after imports is given too).
All use AdamW (0.9, 0.95), clipping 1.0, constant learning rate, the same prepared SFT samples
(`telechat data prepare --tokenizer default`, ChatML) and the same held-out rows, whose loss is
measured the same way for every run: each dialogue on its own, summed over its answer tokens.

    python benchmarks/lora_bench.py --data runs/lora_default/data [--steps 10] [--batch-size 4] [--rank 8]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

VAL_ROWS = 16  # held-out packed rows (the last ones of the prepared file)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def split_rows(data: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    from telechat.data.prepare import load_prepared

    arrays = load_prepared(data)
    n = len(arrays["input_ids"])
    return np.arange(n - VAL_ROWS), np.arange(n - VAL_ROWS, n), arrays


def segments(arrays: dict, rows) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels) of every dialogue in `rows`, each on its own (labels -100 off the answers)."""
    from telechat.model import packed_labels

    out = []
    for r in rows:
        ids = torch.from_numpy(np.asarray(arrays["input_ids"][r], np.int64))[None]
        seg = torch.from_numpy(np.asarray(arrays["segment_ids"][r], np.int64))[None]
        labels = packed_labels(ids, torch.from_numpy(np.asarray(arrays["loss_mask"][r], np.int64))[None], seg)
        for s in seg.unique().tolist():
            if s:
                keep = seg[0] == s
                out.append((ids[0, keep], labels[0, keep]))
    return out


@torch.no_grad()
def held_out_loss(forward, segs) -> float:
    total, n = 0.0, 0
    for ids, labels in segs:
        logits = forward(ids[None]).float()[0, :-1]
        total += float(torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum"))
        n += int((labels[1:] != -100).sum())
    return total / max(n, 1)


def held_out_rows_folder(data: Path, tmp: Path) -> Path:
    """The prepared folder without the held-out rows (what every run trains on)."""
    import shutil

    train_rows, _, arrays = split_rows(data)
    out = tmp / "train_data"
    out.mkdir()
    for name in ("input_ids", "loss_mask", "segment_ids"):
        np.save(out / f"{name}.npy", np.asarray(arrays[name][train_rows]))
    shutil.copy(data / "manifest.json", out / "manifest.json")
    return out


def run_ours(args, kind: str, train_data: Path, data: Path, tmp: Path) -> dict:
    import telechat
    from telechat.lora import apply_adapter
    from telechat.train import TrainConfig, train

    base_rss = rss_mb()
    model = args.model
    if kind == "qlora":
        model = str(tmp / "int4")
    lora = {} if kind == "full" else dict(lora_dim=args.rank, lora_scaling=2.0 * args.rank, only_optimize_lora=True)
    cfg = TrainConfig(stage="sft", data=str(train_data), output=str(tmp / f"run_{kind}"), model=model,
                      max_steps=args.steps, per_device_batch_size=args.batch_size, learning_rate=args.lr,
                      lr_scheduler="constant", eval_fraction=0.0, progress=False, seed=0, **lora)
    s = train(cfg)
    peak = rss_mb()
    steps = s["history"][1:]
    tok_s = statistics.median(h["tokens_per_s"] for h in steps)
    _, val_rows, arrays = split_rows(data)
    if kind == "full":
        llm = telechat.load(s["checkpoint"], dtype=torch.float32)
    else:
        llm = apply_adapter(telechat.load(model, dtype=torch.float32), s["checkpoint"], merge=False)
    return {"run": kind, "tokens_per_s": tok_s, "peak_rss_mb": peak, "rss_after_imports_mb": base_rss,
            "last_loss": s["history"][-1]["loss"],
            "held_out_loss": held_out_loss(llm.model, segments(arrays, val_rows))}


def run_hf(args, train_data: Path, data: Path, tmp: Path) -> dict:
    """PEFT LoRA on transformers' LlamaForCausalLM (the same weights) under transformers' Trainer; each
    step takes the dialogues of the same packed rows as ours, padded (no packing in the HF model)."""
    import telechat
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from telechat.hf import to_hf_llama

    base_rss = rss_mb()
    hf = to_hf_llama(telechat.load(args.model, dtype=torch.float32).model).float()
    hf.config.use_cache = False
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(hf, LoraConfig(r=args.rank, lora_alpha=2.0 * args.rank, lora_dropout=0.0,
                                          target_modules=targets, task_type="CAUSAL_LM"))
    train_rows, val_rows, arrays = split_rows(data)
    pad = int(hf.config.pad_token_id or 0)
    batches = []
    for i in range(args.steps):
        rows = train_rows[(np.arange(args.batch_size) + i * args.batch_size) % len(train_rows)]
        segs = segments(arrays, rows)
        width = max(len(x) for x, _ in segs)
        ids = torch.full((len(segs), width), pad)
        labels = torch.full((len(segs), width), -100)
        mask = torch.zeros((len(segs), width), dtype=torch.long)
        for j, (x, y) in enumerate(segs):  # right padding
            ids[j, :len(x)], labels[j, :len(y)], mask[j, :len(x)] = x, y, 1
        batches.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    times, tokens = [], [int(b["attention_mask"].sum()) for b in batches]

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    targs = TrainingArguments(output_dir=str(tmp / "hf"), per_device_train_batch_size=1, max_steps=args.steps,
                              learning_rate=args.lr, lr_scheduler_type="constant", adam_beta1=0.9, adam_beta2=0.95,
                              adam_epsilon=1e-5, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
                              save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                              disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=targs, train_dataset=batches, data_collator=lambda items: items[0],
                      callbacks=[Timer()])
    trainer.train()
    peak = rss_mb()
    tok_s = statistics.median(n / t for n, t in zip(tokens[1:], times[1:]))
    model.eval()
    return {"run": "peft+hf-trainer", "tokens_per_s": tok_s, "peak_rss_mb": peak, "rss_after_imports_mb": base_rss,
            "held_out_loss": held_out_loss(lambda ids: model(input_ids=ids).logits, segments(arrays, val_rows))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="an SFT folder from `telechat data prepare --tokenizer default`")
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--runs", default="full,lora,qlora,hf")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    data = Path(args.data)
    if args.one:
        tmp = Path(args.tmp)
        train_data = tmp / "train_data"
        r = run_hf(args, train_data, data, tmp) if args.one == "hf" else run_ours(args, args.one, train_data, data, tmp)
        print("RESULT " + json.dumps(r), flush=True)
        return
    flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0] if os.path.exists("/proc/cpuinfo") else ""
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}; AVX512: {'avx512f' in flags}, "
          f"AMX: {'amx_tile' in flags}, AVX2: {'avx2' in flags}")
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        held_out_rows_folder(data, tmp)
        runs = args.runs.split(",")
        if "qlora" in runs:
            from telechat.quant import QuantConfig, quantize

            quantize(args.model, tmp / "int4", QuantConfig(bits=4, group_size=64, method="rtn"), dtype="float32",
                     progress=False)
        results = {}
        for kind in runs:
            cmd = [sys.executable, __file__, "--one", kind, "--tmp", str(tmp)] + [
                a for a in sys.argv[1:] if a != "--runs" and not a.startswith("--runs=")]
            p = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode or not line:
                print(f"{kind}: failed\n{p.stderr[-2000:]}")
                continue
            results[kind] = json.loads(line[0][7:])
            print(json.dumps(results[kind]), flush=True)
    full, lora = results.get("full"), results.get("lora")
    if full and lora:
        print(f"LoRA r={args.rank} vs full: peak memory {lora['peak_rss_mb'] / full['peak_rss_mb']:.2f}x "
              f"(target <= 0.5), tokens/s {lora['tokens_per_s'] / full['tokens_per_s']:.2f}x (target >= 1.3)")
    if full and results.get("qlora"):
        print(f"QLoRA int4 vs full: peak memory {results['qlora']['peak_rss_mb'] / full['peak_rss_mb']:.2f}x "
              "(target <= 0.35)")
    hf = results.get("hf")
    if lora and hf:
        print(f"LoRA vs PEFT + HF Trainer: tokens/s {lora['tokens_per_s'] / hf['tokens_per_s']:.2f}x (target >= 1.0), "
              f"peak memory {lora['peak_rss_mb'] / hf['peak_rss_mb']:.2f}x (target <= 1.0), held-out loss "
              f"{lora['held_out_loss']:.4f} vs {hf['held_out_loss']:.4f} "
              f"({100 * (lora['held_out_loss'] / hf['held_out_loss'] - 1):+.1f}%, target within 2%)")


if __name__ == "__main__":
    main()

"""Speed: MMLU 5-shot loglik items/s with and without sharing the few-shot prefix.

Runs `telechat.eval.evaluate` on the same MMLU items twice (default model, same batch size):
once with every row computed in full (--no-share-prefix), once with each subject's common prompt
prefix computed once and kept in the KV cache. Prints items/s of both and the ratio (target >= 2x),
and checks that both give the same predictions.

    python benchmarks/eval_speed.py [--data-dir ../shared/data/eval] [--subjects a,b] [--limit 40]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import telechat
from telechat.eval import EvalConfig, evaluate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"))
    ap.add_argument("--model", default="default")
    ap.add_argument("--subjects", default="abstract_algebra,anatomy,astronomy")
    ap.add_argument("--limit", type=int, default=40, help="items per subject")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = telechat.load(args.model)
    subjects = [s for s in args.subjects.split(",") if s]

    def run(share: bool, limit: int):
        cfg = EvalConfig(tasks=["mmlu"], data_dir=args.data_dir, subjects=subjects, limit=limit,
                         batch_size=args.batch_size, share_prefix=share, progress=False)
        t = time.perf_counter()
        r = evaluate(llm, cfg)["results"]["mmlu"]
        return r, time.perf_counter() - t

    run(True, 2)  # warm-up (allocations, first kernels)
    out = {}
    for share in (False, True):
        r, sec = run(share, args.limit)
        out[share] = {"items": r["n"], "seconds": sec, "items_per_s": r["n"] / sec, "acc_micro": r["metrics"]["acc_micro"],
                      "tokens_computed": r["engine"]["tokens_computed"], "rows": r["engine"]["rows"],
                      "preds": [it["pred"] for it in r["items"]]}
    same = out[False]["preds"] == out[True]["preds"]
    ratio = out[True]["items_per_s"] / out[False]["items_per_s"]
    print("| prefix sharing | items | seconds | items/s | tokens computed | accuracy |")
    print("|---|---|---|---|---|---|")
    for share in (False, True):
        o = out[share]
        print(f"| {'on' if share else 'off'} | {o['items']} | {o['seconds']:.1f} | {o['items_per_s']:.2f} | "
              f"{o['tokens_computed']:,} | {100 * o['acc_micro']:.2f} |")
    print(f"\nspeed-up from sharing the few-shot prefix: {ratio:.2f}x (target >= 2x: {'met' if ratio >= 2 else 'NOT met'}); "
          f"same predictions: {same}; subjects {', '.join(subjects)}, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}")
    if args.output:
        for o in out.values():
            o.pop("preds")
        Path(args.output).write_text(json.dumps({"off": out[False], "on": out[True], "ratio": ratio,
                                                 "same_predictions": same}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

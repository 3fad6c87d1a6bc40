"""Scoring arithmetic: choice picking, pass@k, averages over subjects and categories, perplexity."""
from __future__ import annotations

import math
from typing import Iterable, Sequence


def pick(scores: Sequence[float]) -> int:
    """Index of the highest score (the first one on ties)."""
    best = 0
    for i, s in enumerate(scores):
        if s > scores[best]:
            best = i
    return best


def pick_normalized(scores: Sequence[float], lengths: Sequence[int]) -> int:
    """acc_norm's choice: log-likelihood per character of the continuation."""
    return pick([s / max(1, n) for s, n in zip(scores, lengths)])


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    # product form: no huge binomials
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


def group_accuracy(records: Iterable[dict], key: str = "correct") -> dict:
    """{"n", "acc"} per subject, "macro" (mean over subjects) and "micro" (over items)."""
    per: dict[str, list[float]] = {}
    for r in records:
        per.setdefault(r["subject"], []).append(float(r[key]))
    subjects = {s: {"n": len(v), "acc": sum(v) / len(v)} for s, v in sorted(per.items())}
    total = sum(len(v) for v in per.values())
    return {
        "subjects": subjects,
        "macro": sum(s["acc"] for s in subjects.values()) / len(subjects) if subjects else float("nan"),
        "micro": sum(sum(v) for v in per.values()) / total if total else float("nan"),
        "n": total,
    }


def category_accuracy(subjects: dict[str, dict], categories_of) -> dict[str, dict]:
    """Per category: "macro" over its subjects, "micro" over its items, "n" items, "subjects" count."""
    cats: dict[str, list[tuple[int, float]]] = {}
    for name, s in subjects.items():
        for c in categories_of(name):
            cats.setdefault(c, []).append((s["n"], s["acc"]))
    out = {}
    for c, v in cats.items():
        n = sum(k for k, _ in v)
        out[c] = {"n": n, "subjects": len(v), "macro": sum(a for _, a in v) / len(v),
                  "micro": sum(k * a for k, a in v) / n if n else float("nan")}
    return dict(sorted(out.items()))


def perplexity(nll: float, count: int) -> float:
    return math.exp(nll / count) if count else float("nan")

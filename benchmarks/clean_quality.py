"""Precision and recall of `telechat data clean` with its default configuration (issue 20).

The labelled evaluation set (benchmarks/clean_eval_sets.py: clean zh/en documents of many kinds,
junk of every kind the rules target) goes through the real pipeline (run_clean, default config,
the removed-documents sidecar on). Printed per language, for the chosen split:

  clean kept      share of clean documents in the output; every removal (a false positive) by
                  rule, with examples
  junk removed    share of junk documents removed (recall), per junk kind, and the share removed by
                  the stage the kind is labelled with
  near-dups       edited copies (5% of the characters replaced, inserted or deleted; English
                  words instead with --en-edit-unit words) of a third of the clean documents:
                  copies caught, unique documents kept

The thresholds of clean.yaml were chosen on the calibration split (--split calib --calibrate
prints the statistics they were read from); the figures to quote are the held-out split's.

    python benchmarks/clean_quality.py                       # held-out split, builds the set
    python benchmarks/clean_quality.py --split calib --calibrate
    python benchmarks/clean_quality.py --eval /tmp/clean-eval/eval.jsonl --limit 300
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def machine_line() -> str:
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("unknown CPU", platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    shown = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "neon") if f in flags]
    return (f"machine: {model}, {os.cpu_count()} logical cores, flags {' '.join(shown) or '-'}; "
            f"Python {platform.python_version()}")


def _read(path: Path) -> list[dict]:
    out = []
    for f in sorted(path.glob("*.jsonl")):
        with open(f, encoding="utf-8") as fh:
            out += [json.loads(line) for line in fh if line.strip()]
    return out


OVERRIDES: dict = {}  # config changes from the command line (--en-shingles)


def run_set(records: list[dict], folder: Path, workers: int) -> tuple[set[str], dict[str, dict]]:
    """(ids kept, {id: removal record}) after the default pipeline."""
    from telechat.data.clean import run_clean

    src = folder / "in"
    src.mkdir(parents=True, exist_ok=True)
    with open(src / "eval.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    out = folder / "out"
    run_clean(str(src / "eval.jsonl"), out, {"output": {"write_removed": True}, **OVERRIDES}, workers=workers)
    kept = {r["id"] for r in _read(out)}
    removed = {r["id"]: r for r in _read(out / "removed")}
    return kept, removed


def excerpt(text: str, n: int = 100) -> str:
    t = " ".join(text.split())
    return t if len(t) <= n else t[:n] + "…"


def report_quality(records: list[dict], kept: set[str], removed: dict[str, dict]) -> dict:
    figures = {}
    for lang in ("zh", "en"):
        clean = [r for r in records if r["lang"] == lang and r["label"] == "clean"]
        junk = [r for r in records if r["lang"] == lang and r["label"] == "junk"]
        if not clean and not junk:
            continue
        print(f"\n== {lang}: clean documents kept")
        by_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        fp: dict[str, list[dict]] = defaultdict(list)
        for r in clean:
            by_kind[r["kind"]][0] += 1
            if r["id"] in kept:
                by_kind[r["kind"]][1] += 1
            else:
                fp[removed.get(r["id"], {}).get("reason", "missing")].append(r)
        for kind, (n, k) in sorted(by_kind.items()):
            print(f"  {kind:<14} {k:>5}/{n:<5} {k / n:7.1%}")
        n_clean = len(clean)
        n_kept = sum(k for _, k in by_kind.values())
        print(f"  {'all':<14} {n_kept:>5}/{n_clean:<5} {n_kept / max(1, n_clean):7.1%}")
        print(f"-- {lang}: clean documents removed, by rule (false positives)")
        for reason, rs in sorted(fp.items(), key=lambda kv: -len(kv[1])):
            print(f"  {reason:<32} {len(rs):>4} ({len(rs) / max(1, n_clean):.2%})")
            for r in rs[:3]:
                detail = removed.get(r["id"], {}).get("detail")
                print(f"      [{r['kind']}, {r['source']}{', ' + detail if detail else ''}] {excerpt(r['data'])}")
        print(f"-- {lang}: junk removed (recall), by kind; by the labelled stage")
        jk: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        missed: dict[str, list[dict]] = defaultdict(list)
        for r in junk:
            jk[r["kind"]][0] += 1
            if r["id"] not in kept:
                jk[r["kind"]][1] += 1
                if removed.get(r["id"], {}).get("stage", "").replace(" ", "_") == r["expect"]:
                    jk[r["kind"]][2] += 1
            else:
                missed[r["kind"]].append(r)
        for kind, (n, k, e) in sorted(jk.items()):
            print(f"  {kind:<20} {k:>4}/{n:<4} {k / n:7.1%}   by {junk_expect(junk, kind)}: {e / n:.0%}")
            for r in missed[kind][:2]:
                print(f"      missed: {excerpt(r['data'])}")
        n_junk = len(junk)
        n_rm = sum(k for _, k, _ in jk.values())
        print(f"  {'all':<20} {n_rm:>4}/{n_junk:<4} {n_rm / max(1, n_junk):7.1%}")
        figures[lang] = {"clean_kept": n_kept / max(1, n_clean), "clean": n_clean, "junk_removed": n_rm / max(1, n_junk),
                         "junk": n_junk, "rules": per_rule(lang, clean, junk, kept, removed)}
    return figures


def per_rule(lang: str, clean: list[dict], junk: list[dict], kept: set[str], removed: dict[str, dict]) -> dict:
    """Per rule: the junk documents labelled with it (removed at all, removed by it) and the clean
    documents it removed (false positives); rules no junk is labelled with get a row of their own."""
    import re

    from telechat.data.clean.synth import JUNK_KINDS

    def rule_of(r):
        return r.get("expect_rule") or JUNK_KINDS[r["kind"]][lang][1]

    reason = lambda r: removed.get(r["id"], {}).get("reason", "missing")  # noqa: E731
    patterns = sorted({rule_of(r) for r in junk})
    rows = {}
    for pat in patterns:
        made = [r for r in junk if rule_of(r) == pat]
        gone = [r for r in made if r["id"] not in kept]
        by_it = [r for r in gone if re.fullmatch(pat, reason(r))]
        fps = [r for r in clean if r["id"] not in kept and re.fullmatch(pat, reason(r))]
        rows[pat] = {"junk": len(made), "removed": len(gone), "by_rule": len(by_it), "clean_removed": len(fps)}
    for r in clean:
        if r["id"] not in kept and not any(re.fullmatch(p, reason(r)) for p in patterns):
            row = rows.setdefault(reason(r), {"junk": 0, "removed": 0, "by_rule": 0, "clean_removed": 0})
            row["clean_removed"] += 1
    print(f"-- {lang}: per rule: junk labelled with it removed (recall) and removed by it; clean removed by it")
    print(f"  {'rule':<32} {'junk':>5} {'removed':>8} {'by rule':>8} {'clean removed':>14}")
    for name, row in rows.items():
        n = row["junk"]
        rec = f"{row['removed'] / n:8.1%} {row['by_rule'] / n:8.1%}" if n else f"{'-':>8} {'-':>8}"
        print(f"  {name:<32} {n:>5} {rec} {row['clean_removed']:>5} ({row['clean_removed'] / max(1, len(clean)):.2%})")
    return rows


def junk_expect(junk: list[dict], kind: str) -> str:
    return next(r["expect"] for r in junk if r["kind"] == kind)


def near_duplicates(records: list[dict], folder: Path, workers: int, per_lang: int, rate: float, seed: int,
                    en_unit: str = "chars") -> dict:
    """Copies with `rate` of their characters (English: `en_unit`) edited, of a third of the clean documents."""
    from telechat.data.clean import synth

    rng = random.Random(seed)
    docs, group = [], []
    for lang in ("zh", "en"):
        clean = [r for r in records if r["lang"] == lang and r["label"] == "clean"]
        rng.shuffle(clean)
        for i, r in enumerate(clean[:per_lang]):
            docs.append({"id": f"{r['id']}#0", "data": r["data"], "lang": lang})
            group.append(r["id"])
            if i % 3 == 0:
                words = lang == "en" and en_unit == "words"
                edited = edit_words(r["data"], rng, rate) if words else edit_chars(r["data"], rng, rate)
                docs.append({"id": f"{r['id']}#1", "data": edited, "lang": lang})
                group.append(r["id"])
    order = list(range(len(docs)))
    rng.shuffle(order)
    docs = [docs[i] for i in order]
    from telechat.data.clean import run_clean

    src = folder / "in"
    src.mkdir(parents=True, exist_ok=True)
    for k in range(3):  # several files: copies meet across tasks
        with open(src / f"part{k}.jsonl", "w", encoding="utf-8") as f:
            for d in docs[k::3]:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
    # the rules' own removals are not the subject here
    off = {s: {"enabled": False} for s in ("rules_zh", "rules_en", "gopher_quality_en", "gopher_repetition_en",
                                           "boilerplate", "sensitive_words")}
    off["language"] = {"keep": ["zh", "en"]}
    run_clean(str(src / "*.jsonl"), folder / "out", {**off, **OVERRIDES}, workers=workers)
    kept = Counter(r["id"].split("#")[0] for r in _read(folder / "out"))
    size = Counter(d["id"].split("#")[0] for d in docs)
    del synth
    res = {}
    for lang in ("zh", "en"):
        groups = {d["id"].split("#")[0] for d in docs if d["lang"] == lang}
        planted = [g for g in groups if size[g] == 2]
        unique = [g for g in groups if size[g] == 1]
        caught = sum(1 for g in planted if kept[g] == 1)
        unique_kept = sum(1 for g in unique if kept[g] == 1)
        pair_kept = sum(1 for g in planted if kept[g] >= 1)
        res[lang] = {"copies": len(planted), "caught": caught / max(1, len(planted)),
                     "unique_kept": unique_kept / max(1, len(unique)), "originals_kept": pair_kept / max(1, len(planted))}
        unit = "words" if lang == "en" and en_unit == "words" else "characters"
        print(f"  {lang}: {len(planted)} edited copies ({rate:.0%} of the {unit}): caught {res[lang]['caught']:.1%}; "
              f"unique documents kept {unique_kept}/{len(unique)} ({res[lang]['unique_kept']:.1%}); "
              f"one of each pair kept {res[lang]['originals_kept']:.1%}")
    return res


def edit_words(text: str, rng: random.Random, rate: float) -> str:
    """`rate` of the words replaced, inserted or deleted (by a word of the text)."""
    words = text.split(" ")
    pool = [w for w in words if w.strip()] or ["x"]
    for _ in range(max(1, int(len(words) * rate))):
        i = rng.randrange(len(words))
        op = rng.random()
        if op < 0.5:
            words[i] = rng.choice(pool)
        elif op < 0.75:
            words.insert(i, rng.choice(pool))
        elif len(words) > 1:
            del words[i]
    return " ".join(words)


def edit_chars(text: str, rng: random.Random, rate: float) -> str:
    """`rate` of the characters replaced, inserted or deleted (by a character of the text)."""
    chars = list(text)
    pool = [c for c in text if not c.isspace()] or ["x"]
    for _ in range(max(1, int(len(chars) * rate))):
        i = rng.randrange(len(chars))
        op = rng.random()
        if op < 0.5:
            chars[i] = rng.choice(pool)
        elif op < 0.75:
            chars.insert(i, rng.choice(pool))
        elif len(chars) > 1:
            del chars[i]
    return "".join(chars)


def calibrate(records: list[dict]) -> None:
    """The statistics behind rules_zh's thresholds: percentiles over the clean Chinese documents,
    and the lowest values over the junk kinds each statistic targets."""
    import numpy as np
    from datatrove.pipeline.filters.gopher_repetition_filter import find_all_duplicate

    from telechat.data.clean.rules import top_ngram_chars
    from telechat.data.clean.text import DIGIT_RE, HAN_RE, SPACE_RE, SYMBOL_RE, detect_language, prose, rare_han_share

    names = ["han", "digits", "symbols", "rare_han"] + [f"dup{k}" for k in range(5, 11)] + [f"top{k}" for k in (2, 3, 4)]
    rows = []
    for r in records:
        if r["lang"] != "zh" or detect_language(r["data"])[0] != "zh":
            continue
        t = prose(r["data"])
        vis = len(t) - len(SPACE_RE.findall(t)) or 1
        chars = SPACE_RE.sub("", t)
        m = len(chars) or 1
        v = [len(HAN_RE.findall(t)) / vis, len(DIGIT_RE.findall(t)) / vis, len(SYMBOL_RE.findall(t)) / vis,
             rare_han_share(r["data"])[0]]
        v += [find_all_duplicate(chars, k) / m for k in range(5, 11)]
        v += [top_ngram_chars(chars, k) / m for k in (2, 3, 4)]
        rows.append((r, v))
    clean = np.array([v for r, v in rows if r["label"] == "clean"])
    print(f"\n== zh statistics on {len(clean)} clean documents (prose view)")
    print("  " + " ".join(f"{n:>8}" for n in ["pct"] + names))
    for q in (0.2, 1, 50, 99, 99.5, 99.8, 100):
        print("  " + " ".join([f"{q:>8}"] + [f"{x:8.3f}" for x in np.percentile(clean, q, axis=0)]))
    kinds = sorted({r["kind"] for r, _ in rows if r["label"] == "junk"})
    print("== junk, 5th percentile (the 95th for han)")
    for kind in kinds:
        j = np.array([v for r, v in rows if r["kind"] == kind])
        lo = np.percentile(j, 5, axis=0)
        lo[0] = np.percentile(j[:, 0], 95)
        print("  " + " ".join([f"{kind[:8]:>8}"] + [f"{x:8.3f}" for x in lo]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval", default=None, help="an eval.jsonl from clean_eval_sets.py (default: build it now)")
    ap.add_argument("--split", default="heldout", choices=["heldout", "calib", "all"])
    ap.add_argument("--limit", type=int, default=None, help="at most this many documents per (language, label, kind)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--near-dup-docs", type=int, default=450, help="clean documents per language for the near-dup run")
    ap.add_argument("--edit-rate", type=float, default=0.05)
    ap.add_argument("--near-dup-only", action="store_true")
    ap.add_argument("--en-shingles", choices=["word", "char"], help="dedup.minhash.en_shingles (default: the config's)")
    ap.add_argument("--en-edit-unit", default="chars", choices=["chars", "words"],
                    help="what the English near-duplicates' edits change (Chinese: always characters)")
    ap.add_argument("--calibrate", action="store_true", help="also print the statistics the thresholds were read from")
    ap.add_argument("--offline", action="store_true", help="building the set: shared files only, no registries")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(machine_line())
    if a.en_shingles:
        OVERRIDES["dedup"] = {"minhash": {"en_shingles": a.en_shingles}}
    t0 = time.perf_counter()
    if a.eval:
        with open(a.eval, encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
    else:
        import clean_eval_sets

        cache = None
        if not a.offline:
            from telechat.default_model import telechat_home

            cache = telechat_home() / "corpus-cache"
        records = clean_eval_sets.build(cache=cache, seed=a.seed)
    if a.split != "all":
        records = [r for r in records if r["split"] == a.split]
    if a.limit:
        seen: Counter = Counter()
        keep = []
        for r in records:
            k = (r["lang"], r["label"], r["kind"])
            if seen[k] < a.limit:
                seen[k] += 1
                keep.append(r)
        records = keep
    c = Counter((r["lang"], r["label"]) for r in records)
    print(f"split {a.split}: " + ", ".join(f"{k[0]} {k[1]} {v}" for k, v in sorted(c.items())))
    if a.calibrate:
        calibrate(records)
    with tempfile.TemporaryDirectory() as tmp:
        figures = {}
        if not a.near_dup_only:
            kept, removed = run_set(records, Path(tmp) / "quality", a.workers)
            figures = report_quality(records, kept, removed)
        print(f"\n== near-duplicates (default config, rules off, {a.near_dup_docs} clean documents per language)")
        figures["near_dup"] = near_duplicates(records, Path(tmp) / "near", a.workers, a.near_dup_docs, a.edit_rate,
                                              a.seed, a.en_edit_unit)
    print(f"\nsummary: {json.dumps(figures)}")
    print(f"({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

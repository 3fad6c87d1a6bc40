"""Tokenizer training speed and compression: our byte-level BPE vs the official 12B SentencePiece
tokenizer and the default model's (SmolLM2) GPT-2-style byte-level BPE.

    python benchmarks/tokenizer_bench.py [--size-mb 50] [--vocab-size 160256] [--shared ../shared]

(a) Assembles ~SIZE_MB of mixed Chinese/English text from shared/data/corpus (SophonPlus reviews
    and MSRA news sentences; NLTK English corpora, read straight from their zip files), repeating
    the material if it is short, with the last HOLDOUT share of every source held out; then times
    `telechat.data.tokenizer_train.train_tokenizer` on it (MB/s, seconds, os.cpu_count()).
(b) Characters per token on the held-out Chinese and English text (each line encoded on its own,
    as a chat segment is), and the share of lines that decode back exactly, for: ours, the official
    12B tokenizer.model (shared/telechat-official/12B) and the default model's tokenizer.json.

Needs ../shared (or --shared / $TELECHAT_SHARED); says so and exits 2 when it is missing.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import re
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = Path(os.environ.get("TELECHAT_SHARED", ROOT.parent / "shared"))
# TeleChat's 160256: about 65 s for 50 MB on the 2-core build machine (peak RSS about 2 GB).
DEFAULT_BENCH_VOCAB = 160256


# ---- corpus -----------------------------------------------------------------------------------------
def _csv_reviews(data: str) -> list[str]:
    rows = csv.DictReader(io.StringIO(data))
    reviews = ((r.get("review") or "").replace("\ufeff", "").strip() for r in rows)
    return [r for r in reviews if r]


def chinese_sources(corpus: Path) -> dict[str, list[str]]:
    zh = corpus / "zh-sophonplus"
    out: dict[str, list[str]] = {}
    with zipfile.ZipFile(zh / "dh_msra" / "dh_msra.zip") as z:  # one "char\tTAG" per line, blank line = sentence end
        raw = z.read("dh_msra.txt").decode("utf-8")
    out["msra"] = ["".join(line.split("\t", 1)[0] for line in block.splitlines() if line.strip())
                   for block in raw.split("\n\n") if block.strip()]
    with zipfile.ZipFile(zh / "online_shopping_10_cats" / "online_shopping_10_cats.zip") as z:
        out["shopping"] = _csv_reviews(z.read("online_shopping_10_cats.csv").decode("utf-8"))
    out["hotel"] = _csv_reviews((zh / "ChnSentiCorp_htl_all" / "ChnSentiCorp_htl_all.csv").read_text("utf-8"))
    out["waimai"] = _csv_reviews((zh / "waimai_10k" / "waimai_10k.csv").read_text("utf-8"))
    return out


def _zip_texts(path: Path, pattern: str) -> list[str]:
    with zipfile.ZipFile(path) as z:
        names = sorted(n for n in z.namelist() if re.search(pattern, n) and not n.endswith("/"))
        return [z.read(n).decode("utf-8", errors="replace") for n in names]


def _paragraphs(docs: list[str]) -> list[str]:
    return [p.strip() for d in docs for p in re.split(r"\n\s*\n", d) if p.strip()]


def english_sources(corpus: Path) -> dict[str, list[str]]:
    en = corpus / "en-nltk"
    untag = re.compile(r"(\S+)/[^\s/]+")  # brown: "The/at jury/nn" -> "The jury"
    brown = [untag.sub(r"\1", d) for d in _zip_texts(en / "brown.zip", r"^brown/c[a-r]\d\d$")]
    return {
        "abc": [line for d in _zip_texts(en / "abc.zip", r"\.txt$") for line in d.splitlines() if line.strip()],
        "brown": [" ".join(p.split()) for p in _paragraphs(brown)],
        "movie_reviews": _paragraphs(_zip_texts(en / "movie_reviews.zip", r"\.txt$")),
        "state_union": _paragraphs(_zip_texts(en / "state_union.zip", r"\.txt$")),
        "inaugural": _paragraphs(_zip_texts(en / "inaugural.zip", r"\.txt$")),
        "webtext": [line for d in _zip_texts(en / "webtext.zip", r"\.txt$") for line in d.splitlines() if line.strip()],
        "genesis": [line for d in _zip_texts(en / "genesis.zip", r"english-(kjv|web)\.txt$")
                    for line in d.splitlines() if line.strip()],
    }


def split_sources(sources: dict[str, list[str]], holdout: float, eval_chars: int) -> tuple[list[str], list[str]]:
    """(train docs, held-out docs): the last `holdout` share of each source is held out; the held-out
    text is capped at `eval_chars`, shared evenly between the sources."""
    train, held = [], []
    per_source = eval_chars // max(1, len(sources))
    for docs in sources.values():
        cut = len(docs) - max(1, int(len(docs) * holdout))
        train += docs[:cut]
        n = 0
        for d in docs[cut:]:
            if n >= per_source:
                break
            held.append(d)
            n += len(d)
    return train, held


def write_training_file(path: Path, docs: list[str], size_bytes: int) -> tuple[int, int]:
    """Write docs one per line, repeating them until `size_bytes`; (bytes written, repeats)."""
    lines = [" ".join(d.splitlines()) + "\n" for d in docs]
    data = "".join(lines).encode("utf-8")
    unique = len(data)
    written, rounds = 0, 0
    with open(path, "wb") as f:
        while written < size_bytes:
            chunk = data[: size_bytes - written]
            if len(chunk) < len(data):  # end on a whole line
                chunk = chunk[: chunk.rfind(b"\n") + 1] or chunk
            f.write(chunk)
            written += len(chunk)
            rounds += 1
    return written, unique


# ---- measurement ------------------------------------------------------------------------------------
def measure(tok, docs: list[str]) -> tuple[float, float, int]:
    """(characters per token, share of lines that decode back exactly, tokens)."""
    chars = tokens = exact = 0
    for d in docs:
        ids = tok.encode(d)
        chars += len(d)
        tokens += len(ids)
        exact += tok.decode(ids, skip_special_tokens=False) == d
    return chars / max(1, tokens), exact / max(1, len(docs)), tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the shared/ folder (default: %(default)s)")
    ap.add_argument("--size-mb", type=float, default=50.0, help="training text size in MB (default: %(default)s)")
    ap.add_argument("--vocab-size", type=int, default=DEFAULT_BENCH_VOCAB, help="(default: %(default)s)")
    ap.add_argument("--min-frequency", type=int, default=2)
    ap.add_argument("--holdout", type=float, default=0.03, help="share of each source held out (default: %(default)s)")
    ap.add_argument("--eval-chars", type=int, default=400_000, help="held-out characters per language")
    ap.add_argument("--work-dir", type=Path, default=None, help="keep the corpus and tokenizer here")
    ap.add_argument("--no-default-model", action="store_true", help="skip the default model's tokenizer")
    args = ap.parse_args()

    corpus = args.shared / "data" / "corpus"
    sp_model = args.shared / "telechat-official" / "12B" / "tokenizer.model"
    missing = [p for p in (corpus / "zh-sophonplus", corpus / "en-nltk", sp_model) if not p.exists()]
    if missing:
        print(f"tokenizer_bench: needs the shared material, missing: {', '.join(map(str, missing))} "
              f"(pass --shared DIR or set TELECHAT_SHARED)", file=sys.stderr)
        return 2

    import telechat
    from telechat.data.tokenizer_train import train_tokenizer

    t = time.perf_counter()
    zh_train, zh_held = split_sources(chinese_sources(corpus), args.holdout, args.eval_chars)
    en_train, en_held = split_sources(english_sources(corpus), args.holdout, args.eval_chars)
    held = set(zh_held + en_held)  # the shopping data's hotel reviews overlap ChnSentiCorp
    zh_train = [d for d in zh_train if d not in held]
    en_train = [d for d in en_train if d not in held]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="tokenizer_bench-"))
    work.mkdir(parents=True, exist_ok=True)
    train_file = work / "train.txt"
    size, unique = write_training_file(train_file, zh_train + en_train, int(args.size_mb * 1e6))
    print(f"corpus: {size / 1e6:.1f} MB training text ({unique / 1e6:.1f} MB unique, repeated to size; "
          f"zh {len(zh_train)} docs, en {len(en_train)} docs), held out: zh {sum(map(len, zh_held))} chars "
          f"in {len(zh_held)} lines, en {sum(map(len, en_held))} chars in {len(en_held)} lines "
          f"[{time.perf_counter() - t:.1f}s to assemble]", flush=True)

    out = work / "tokenizer"
    if out.exists():  # an earlier run's tokenizer in --work-dir
        import shutil
        shutil.rmtree(out)
    cores = os.cpu_count()
    print(f"training: vocab_size {args.vocab_size}, min_frequency {args.min_frequency}, {cores} cores ...", flush=True)
    summary = train_tokenizer([train_file], out, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    print()
    print("| train | text | vocab (requested) | seconds | MB/s | os.cpu_count() |")
    print("|---|---|---|---|---|---|")
    print(f"| telechat tokenizer train | {summary['bytes'] / 1e6:.1f} MB zh+en | {summary['vocab_size']} "
          f"({summary['requested_vocab_size']}) | {summary['seconds']:.1f} | {summary['mb_per_s']:.2f} | {cores} |")
    if args.vocab_size != 160256:
        print(f"\n(vocab {args.vocab_size}, not TeleChat's 160256: pass --vocab-size 160256 for the full size)")

    tokenizers = {f"ours (byte-level BPE, {summary['vocab_size']})": telechat.load_tokenizer(out)}
    official = telechat.load_tokenizer(sp_model)
    tokenizers[f"official 12B SentencePiece ({official.vocab_size})"] = official
    if not args.no_default_model:
        try:
            from telechat.default_model import ensure_default_model

            default = telechat.load_tokenizer(ensure_default_model(progress=False))
            tokenizers[f"default model SmolLM2 (GPT-2-style BPE, {default.vocab_size})"] = default
        except Exception as e:  # the default model is optional here
            print(f"(default model tokenizer unavailable: {e})")
    print()
    print("| tokenizer | zh chars/token | en chars/token | zh exact round-trip | en exact round-trip |")
    print("|---|---|---|---|---|")
    for name, tok in tokenizers.items():
        zc, zr, _ = measure(tok, zh_held)
        ec, er, _ = measure(tok, en_held)
        print(f"| {name} | {zc:.3f} | {ec:.3f} | {zr:.1%} | {er:.1%} |")
    print("\n(held-out lines encoded one at a time; higher chars/token = fewer tokens. Ours is trained on other "
          "documents of the same sources as the held-out text, so it is in-domain; the official 12B and SmolLM2 "
          "tokenizers are general-purpose.)")
    if args.work_dir is None:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"(corpus and tokenizer kept in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

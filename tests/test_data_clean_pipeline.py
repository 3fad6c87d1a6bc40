"""The whole pipeline on datatrove's executors: input formats, bad input, the report, resuming,
near-duplicate precision/recall, the CLI (with worker processes) and the Slurm executor's chain."""
from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("datatrove")

from telechat.data.clean import run_clean, synth  # noqa: E402
from telechat.data.prepare import DataError  # noqa: E402

NO_DEDUP = {"dedup": {"exact": {"enabled": False}, "minhash": {"enabled": False}}}


def _write_jsonl(path: Path, records, opener=open):
    path.parent.mkdir(parents=True, exist_ok=True)
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _outputs(folder: Path) -> list[dict]:
    recs = []
    for f in sorted(folder.glob("[0-9]*.jsonl*")):
        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rt", encoding="utf-8") as fh:
            recs += [json.loads(line) for line in fh]
    return recs


def test_formats_and_bad_input(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rng = random.Random(0)
    docs = [synth.document(lang, rng) for _ in range(6) for lang in ("zh", "en")]
    src = tmp_path / "in"
    _write_jsonl(src / "ptd.jsonl", [{"data": d} for d in docs[:3]])
    _write_jsonl(src / "other.jsonl.gz", [{"body": d} for d in docs[3:5]], opener=gzip.open)
    with open(src / "z.jsonl.zst", "wb") as f:
        f.write(zstandard.ZstdCompressor().compress("".join(json.dumps({"data": d}) + "\n" for d in docs[5:7]).encode()))
    pq.write_table(pa.table({"data": [docs[7], None, docs[8]]}), src / "t.parquet")
    (src / "page.txt").write_text(docs[9], encoding="utf-8")
    # bad input, with the line numbers the report must name
    with open(src / "bad.jsonl", "wb") as f:
        f.write(json.dumps({"data": docs[10]}).encode() + b"\n")  # line 1: fine
        f.write(b'{"data": "unterminated\n')  # line 2: malformed JSON
        f.write(b'{"data": "caf\xe9 \xff"}\n')  # line 3: invalid UTF-8
        f.write(b'{"data": "   "}\n')  # line 4: empty document
        f.write(b'{"title": "no text field"}\n')  # line 5: no text field
        f.write(b"[1, 2, 3]\n")  # line 6: not an object
        f.write(json.dumps({"data": docs[11] + "\n" + "z" * 5000}).encode() + b"\n")  # line 7: truncated
        f.write(b'{"data": "' + b"x" * 9000 + b'"}\n')  # line 8: longer than max_line_bytes
    with open(src / "broken.jsonl.gz", "wb") as f:  # a truncated archive
        f.write(gzip.compress(("".join(json.dumps({"data": d}) + "\n" for d in docs)).encode())[:150])
    cfg = dict(NO_DEDUP, reader={"max_doc_chars": 3000, "max_line_bytes": 8000})
    rep = run_clean(str(src / "*"), tmp_path / "out", cfg, text_field=None)
    out = _outputs(tmp_path / "out")
    assert all(set(r) == {"data"} for r in out)
    # every readable document, the "body" pair excepted (not a default text field); line 7 cut at its line break
    assert sorted(r["data"] for r in out) == sorted(docs[:3] + docs[5:12])
    read = rep["stages"][0]
    assert read["name"] == "read"
    bad = rep["bad_input"]
    assert bad["bad.jsonl"]["invalid_json"] == {"count": 2, "lines": [2, 6]}
    assert bad["bad.jsonl"]["invalid_utf8"]["lines"] == [3]
    assert bad["bad.jsonl"]["empty_document"]["lines"] == [4]
    assert bad["bad.jsonl"]["missing_field"]["lines"] == [5]
    assert bad["bad.jsonl"]["line_too_long"]["lines"] == [8]
    assert bad["bad.jsonl"]["truncated"]["count"] == 1
    assert bad["other.jsonl.gz"]["missing_field"]["count"] == 2
    assert bad["t.parquet"]["missing_field"]["lines"] == [2]
    assert "unreadable_file" in bad["broken.jsonl.gz"]
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "`bad.jsonl`" in md and "invalid_json 2 (lines 2, 6)" in md
    # a chosen text field reads the other file
    rep2 = run_clean(str(src / "other.jsonl.gz"), tmp_path / "out2", NO_DEDUP, text_field="body")
    assert rep2["output"]["documents"] == 2


def test_report_counts_are_consistent(tmp_path):
    rng = random.Random(3)
    recs = [{"data": synth.document(lang, rng)} for _ in range(15) for lang in ("zh", "en")]
    recs += [{"data": t} for group in synth.bad_documents(rng).values() for t in group]
    recs += recs[:5]  # exact duplicates
    _write_jsonl(tmp_path / "in" / "a.jsonl", recs)
    rep = run_clean(str(tmp_path / "in"), tmp_path / "out", {"output": {"fields": ["language"]}})
    stages = rep["stages"]
    for a, b in zip(stages, stages[1:]):
        assert a["docs_out"] == b["docs_in"], (a["name"], b["name"])
    for s in stages:
        assert s["docs_in"] - s["docs_out"] == sum(r["count"] for r in s["removed"].values()), s["name"]
        for r in s["removed"].values():
            assert 1 <= len(r["examples"]) <= 3 and all("where" in e and "text" in e for e in r["examples"])
    exact = next(s for s in stages if s["name"] == "exact dedup")
    assert exact["removed"]["exact_duplicate"]["count"] == 5
    assert rep["output"]["documents"] == 30 == len(_outputs(tmp_path / "out"))
    assert {r["language"] for r in _outputs(tmp_path / "out")} == {"zh", "en"}
    assert json.loads((tmp_path / "out" / "report.json").read_text())["format"] == "telechat-clean-report-v1"


def test_near_duplicates_precision_and_recall(tmp_path):
    """Edited copies (3% of the words/characters replaced, inserted or deleted, plus an added line)
    of Chinese and English documents, among unrelated documents of the same vocabulary."""
    rng = random.Random(0)
    recs, group = [], []
    for lang in ("zh", "en"):
        for i in range(80):
            text = synth.document(lang, rng)
            recs.append({"data": text})
            group.append(f"{lang}{i}")
            if i < 40:
                recs.append({"data": synth.near_duplicate(text, lang, rng, rate=0.03)})
                group.append(f"{lang}{i}")
    order = list(range(len(recs)))
    rng.shuffle(order)
    recs, group = [recs[i] for i in order], [group[i] for i in order]
    for k in range(3):  # spread over files, so duplicates meet across tasks
        _write_jsonl(tmp_path / "in" / f"part{k}.jsonl", recs[k::3])
    rep = run_clean(str(tmp_path / "in" / "*.jsonl"), tmp_path / "out", {"output": {"fields": ["id"]}}, workers=2)
    line_group = {f"part{k}.jsonl:{n + 1}": group[k + 3 * n] for k in range(3) for n in range(len(recs[k::3]))}
    kept = [line_group[r["id"]] for r in _outputs(tmp_path / "out")]
    size, survivors = Counter(group), Counter(kept)
    removed = len(recs) - len(kept)
    true_pos = sum(size[g] - survivors[g] for g in size if size[g] == 2 and survivors[g] >= 1)
    planted = [g for g in size if size[g] == 2]
    precision = true_pos / removed if removed else 1.0
    recall = sum(1 for g in planted if survivors[g] == 1) / len(planted)
    assert precision >= 0.95 and recall >= 0.9, (precision, recall, rep["stages"][-1]["removed"])
    # unrelated documents kept (issue 20: >= 95%; these share the templates' phrases, real text lost none
    # in benchmarks/clean_quality.py)
    unique = [g for g in size if size[g] == 1]
    assert sum(survivors[g] == 1 for g in unique) >= 0.95 * len(unique)
    near = next(s for s in rep["stages"] if s["name"] == "near dedup")
    assert near["removed"]["near_duplicate"]["examples"][0]["detail"].startswith("minhash_cluster_id=")


@pytest.mark.slow
def test_jieba_shingles(tmp_path):
    pytest.importorskip("jieba")
    rng = random.Random(2)
    base = [synth.document("zh", rng) for _ in range(10)]
    recs = [{"data": t} for t in base] + [{"data": synth.near_duplicate(t, "zh", rng, 0.02)} for t in base[:5]]
    _write_jsonl(tmp_path / "in.jsonl", recs)
    cfg = {"dedup": {"minhash": {"zh_shingles": "jieba", "zh_ngram": 2}}}
    rep = run_clean(str(tmp_path / "in.jsonl"), tmp_path / "out", cfg)
    assert rep["output"]["documents"] == 10


def test_resume_reruns_only_the_unfinished_shard(tmp_path):
    rng = random.Random(4)
    for k in range(4):
        _write_jsonl(tmp_path / "in" / f"p{k}.jsonl", [{"data": synth.document("en", rng)} for _ in range(5)])
    out = tmp_path / "out"
    keep = {"output": {"keep_intermediate": True}}  # as during a run, before the final clean-up
    first = run_clean(str(tmp_path / "in"), out, keep, workers=2)
    assert first["output"]["documents"] == 20 and len(first["output"]["shards"]) == 4
    before = {f.name: f.read_bytes() for f in out.glob("0*.jsonl")}
    # a crash in the last stage's task 2: its shard half written, its completion mark missing
    last = [s["stage"] for s in first["run"]["stages"]][-2]
    os.remove(out / ".work" / "logs" / last / "completions" / "00002")
    (out / "00002.jsonl").write_text('{"data": "half a')
    again = run_clean(str(tmp_path / "in"), out, keep)
    ran = {s["stage"]: s["ran"] for s in again["run"]["stages"]}
    assert ran[last] == 1 and ran["filter"] == 0 and again["run"]["stages"][0]["skipped"] == 4
    assert {f.name: f.read_bytes() for f in out.glob("0*.jsonl")} == before
    assert again["output"]["documents"] == 20
    # another configuration or other inputs must not mix with this run
    with pytest.raises(DataError, match="another configuration"):
        run_clean(str(tmp_path / "in"), out, {"rules_en": {"min_chars": 10}})
    with pytest.raises(DataError, match="other"):
        run_clean(str(tmp_path / "in" / "p0.jsonl"), out, keep)
    # without intermediate shards (removed after a complete run) an unfinished task reruns everything
    out2 = tmp_path / "out2"
    run_clean(str(tmp_path / "in"), out2, {"dedup": {"exact": {"enabled": False}}})
    os.remove(out2 / ".work" / "logs" / last / "completions" / "00002")
    third = run_clean(str(tmp_path / "in"), out2, {"dedup": {"exact": {"enabled": False}}})
    assert {s["stage"]: s["ran"] for s in third["run"]["stages"]}["filter"] == 4
    assert {f.name: f.read_bytes() for f in out2.glob("0*.jsonl")} == before
    fresh = run_clean(str(tmp_path / "in" / "p0.jsonl"), out, restart=True)
    assert fresh["output"]["documents"] == 5
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="not the output"):
        run_clean(str(tmp_path / "in"), tmp_path / "foreign")


def test_cli_with_worker_processes(tmp_path, capsys, monkeypatch, request):
    """The console entry point with 2 workers (a pool started from the CLI must not hang)."""
    rng = random.Random(5)
    _write_jsonl(tmp_path / "in" / "a.jsonl", [{"data": synth.document("zh", rng)} for _ in range(6)])
    _write_jsonl(tmp_path / "in" / "b.jsonl", [{"data": synth.document("en", rng)} for _ in range(6)])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("output:\n  compression: gzip\nrules_en:\n  min_chars: 50\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "telechat.cli", "data", "clean", "--input", str(tmp_path / "in" / "*.jsonl"),
           "--output", str(tmp_path / "out"), "--config", str(cfg), "--workers", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "cleaned 12 documents" in r.stdout and "-> 12 documents" in r.stdout
    assert "INFO" not in r.stderr  # datatrove's per-task logs stay in the log files
    assert len(list((tmp_path / "out").glob("0*.jsonl.gz"))) == 2
    import datatrove.executor.base as executor_base
    from datatrove.utils.logging import setup_default_logger
    from tqdm import tqdm

    from telechat.cli import main

    # the CLI quiets datatrove's logs and progress bars process-wide: undo that after this test
    for obj, name in ((executor_base, "add_task_logger"), (executor_base, "close_task_logger"), (tqdm, "__init__")):
        monkeypatch.setattr(obj, name, getattr(obj, name))
    request.addfinalizer(setup_default_logger)
    assert main(cmd[3:]) == 0  # again, in this process: everything is already complete
    assert "resumed" in capsys.readouterr().out
    assert main(cmd[3:-2] + ["--workers", "0"]) == 1
    assert "error: --workers must be >= 1" in capsys.readouterr().err


def test_slurm_executor_chain(tmp_path):
    from datatrove.executor import SlurmPipelineExecutor

    from telechat.data.clean.config import load_config
    from telechat.data.clean.pipeline import make_executor, plan

    _write_jsonl(tmp_path / "a.jsonl", [{"data": "x"}])
    cfg = load_config({"executor": {"slurm": {"partition": "cpu"}}})
    stages, _ = plan(cfg, [str(tmp_path / "a.jsonl")], str(tmp_path / "out"), 4, 2, None)
    prev = None
    for st in stages:
        prev = make_executor(st, "slurm", cfg, str(tmp_path / "out" / ".work"), 2, depends=prev)
        assert isinstance(prev, SlurmPipelineExecutor) and prev.tasks == st.tasks
    assert [s.name for s in stages] == ["filter", "exact-find", "exact", "minhash-buckets", "minhash-verify",
                                        "minhash-cluster",
                                        "near-dup", "report"]
    assert stages[3].tasks == 30 and stages[0].tasks == 4
    with pytest.raises(DataError, match="partition"):
        make_executor(stages[0], "slurm", load_config(None), str(tmp_path), 1)


def test_ray_executor_needs_ray(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed (import raises ImportError)
    _write_jsonl(tmp_path / "a.jsonl", [{"data": synth.document("en", random.Random(0))}])
    with pytest.raises(DataError, match="pip install 'ray"):
        run_clean(str(tmp_path / "a.jsonl"), tmp_path / "out", executor="ray")


def _edit_chars(text: str, rng: random.Random, rate: float) -> str:
    chars, pool = list(text), [c for c in text if not c.isspace()]
    for _ in range(max(1, int(len(chars) * rate))):
        i, op = rng.randrange(len(chars)), rng.random()
        if op < 0.5:
            chars[i] = rng.choice(pool)
        elif op < 0.75:
            chars.insert(i, rng.choice(pool))
        else:
            del chars[i]
    return "".join(chars)


@pytest.mark.parametrize("en_edits", ["words", "chars"])
def test_near_duplicates_of_real_text_at_five_percent(tmp_path, en_edits):
    """Issue 20's target on real documents (the labelled fixture's clean prose): copies with 5% of the
    characters edited (English: of the words, or of the characters with `en_shingles: char`) are caught
    >= 90%, documents without a copy all kept. Prose only: a table's copy with 5% of its characters
    edited keeps less of its n-grams (Jaccard about 0.5, at the LSH threshold);
    benchmarks/clean_quality.py measures every kind on the large set."""
    data = Path(__file__).parent / "data" / "clean_eval_small.jsonl"
    docs = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    rng = random.Random(5)
    recs, group, lang_of = [], [], {}
    prose = [r for r in docs if r["label"] == "clean" and r["kind"] not in ("tables", "code_mixed", "docs")]
    for i, d in enumerate(prose):
        g = f"g{i}"
        lang_of[g] = d["lang"]
        recs.append({"data": d["data"]})
        group.append(g)
        if i % 2 == 0:
            chars = d["lang"] == "en" and en_edits == "chars"
            edited = (_edit_chars(d["data"], rng, 0.05) if chars else
                      synth.near_duplicate(d["data"], d["lang"], rng, 0.05))
            recs.append({"data": edited})
            group.append(g)
    order = list(range(len(recs)))
    rng.shuffle(order)
    recs, group = [recs[i] for i in order], [group[i] for i in order]
    for k in range(3):
        _write_jsonl(tmp_path / "in" / f"part{k}.jsonl", recs[k::3])
    off = {s: {"enabled": False} for s in ("rules_zh", "rules_en", "gopher_quality_en", "gopher_repetition_en",
                                           "boilerplate", "sensitive_words")}
    off["language"] = {"keep": ["zh", "en"]}
    off["output"] = {"fields": ["id"]}
    if en_edits == "chars":  # word shingles (the default) do not see such copies; character shingles do
        off["dedup"] = {"minhash": {"en_shingles": "char"}}
    run_clean(str(tmp_path / "in" / "*.jsonl"), tmp_path / "out", off, workers=2)
    line_group = {f"part{k}.jsonl:{n + 1}": group[k + 3 * n] for k in range(3) for n in range(len(recs[k::3]))}
    survivors, size = Counter(line_group[r["id"]] for r in _outputs(tmp_path / "out")), Counter(group)
    for lang in ("zh", "en"):
        planted = [g for g in size if size[g] == 2 and lang_of[g] == lang]
        unique = [g for g in size if size[g] == 1 and lang_of[g] == lang]
        assert len(planted) >= 8 and len(unique) >= 8
        caught = sum(survivors[g] == 1 for g in planted) / len(planted)
        assert caught >= 0.9, (lang, caught)
        assert all(survivors[g] == 1 for g in unique), lang


@pytest.mark.parametrize("verify", [None, 0.42])
def test_band_collisions_of_unrelated_documents_are_checked(tmp_path, verify):
    """With one hash per band, unrelated documents collide in some band all the time; the check of the
    whole signature (dedup.minhash.verify_jaccard) keeps them, without it they are clustered away."""
    data = Path(__file__).parent / "data" / "clean_eval_small.jsonl"
    docs = [json.loads(line)["data"] for line in data.read_text(encoding="utf-8").splitlines()
            if json.loads(line)["label"] == "clean"]
    _write_jsonl(tmp_path / "in" / "a.jsonl", [{"data": d} for d in docs])
    off = {s: {"enabled": False} for s in ("rules_zh", "rules_en", "gopher_quality_en", "gopher_repetition_en",
                                           "boilerplate", "sensitive_words")}
    off["language"] = {"keep": ["zh", "en"]}
    off["dedup"] = {"minhash": {"num_buckets": 40, "hashes_per_bucket": 1, "verify_jaccard": verify,
                                "en_shingles": "char"}}
    run_clean(str(tmp_path / "in" / "a.jsonl"), tmp_path / "out", off, workers=1)
    kept = len(_outputs(tmp_path / "out"))
    if verify is None:
        assert kept < 0.8 * len(docs), kept
    else:
        assert kept == len(docs)


def test_pair_check_rebuilds_band_groups(tmp_path):
    """datatrove writes a band's run of equal signatures A, B, C as A-B, B-C: with B unlike both, the
    check must still join A and C (compared within the group, not only along the chain)."""
    from datatrove.pipeline.dedup.minhash import SENTINEL

    from telechat.data.clean.dedup import MinhashVerify, full_signature_file

    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**63, 20, dtype=np.uint64)
    c = a.copy()
    c[:3] = rng.integers(0, 2**63, 3, dtype=np.uint64)  # 85% alike
    b = rng.integers(0, 2**63, 20, dtype=np.uint64)  # unlike both
    record = np.dtype([("doc", "<u4"), ("sig", "<u8", (20,))])
    (tmp_path / "sigs" / "full").mkdir(parents=True)
    np.array([(0, a), (1, b), (2, c)], dtype=record).tofile(tmp_path / "sigs" / full_signature_file(0))
    (tmp_path / "buckets").mkdir()
    pairs = np.array([[0, 0, 0, 1], [0, 1, 0, 2], [SENTINEL, SENTINEL, 0, 2]], dtype="<u4")
    pairs.tofile(tmp_path / "buckets" / "00000_00.dups")
    MinhashVerify(str(tmp_path / "sigs"), str(tmp_path / "buckets"), str(tmp_path / "out"), 20, 0.42).run()
    out = np.fromfile(tmp_path / "out" / "00000_00.dups", dtype="<u4").reshape(-1, 4).tolist()
    assert sorted(out) == sorted([[0, 0, 0, 2], [SENTINEL, SENTINEL, 0, 2]])

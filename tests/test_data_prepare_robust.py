"""`telechat data prepare` against bad and oversized input: memory bounded by a line cap (not by the
longest line), every bad record skipped and counted with file:line, a pre-training split that always
trains, warnings for an empty or oversized validation split, and the tokenizer in the manifest."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from telechat import load_tokenizer
from telechat.cli import main
from telechat.data import prepare
from telechat.data.prepare import (DataError, encode_long, load_prepared, prepare_pretrain, prepare_sft, read_lines,
                                   tokenizer_fingerprint)

WORDS = "the quick brown fox jumps over the lazy dog 今天 天气 很好 "


def write_lines(path: Path, lines) -> Path:
    with open(path, "wb") as fh:
        for r in lines:
            if isinstance(r, dict):
                r = json.dumps(r, ensure_ascii=False)
            if isinstance(r, str):
                r = r.encode("utf-8")
            fh.write(r + b"\n")
    return path


def data_json(tmp_path: Path, files: dict[str, list]) -> Path:
    for name, lines in files.items():
        write_lines(tmp_path / name, lines)
    p = tmp_path / "data.json"
    p.write_text(json.dumps({name: 1 for name in files}), encoding="utf-8")
    return p


def counts(m: dict) -> dict:
    return {r: v["count"] for r, v in m["skipped"].items()}


def lines_of(m: dict, reason: str) -> list[str]:
    return [x.split(": ")[0] for x in m["skipped"][reason]["first"]]


def run_cli(args, capsys) -> tuple[int, str, str]:
    rc = main(["data", "prepare", *map(str, args)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ---- reading with a byte cap ------------------------------------------------------------------------
def test_read_lines_caps_and_numbers(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_bytes(b"12345\n" + b"x" * 10 + b"\n\n   \n" + b"y" * 7 + b"\r\n" + b"z" * 8 + b"\r\n" + b"w" * 5000
                  + b"\n" + b"tail")
    got = list(read_lines(f, 8))
    assert got == [(1, b"12345", 5), (2, None, 10), (5, b"y" * 7, 7), (6, b"z" * 8, 8), (7, None, 5000),
                   (8, b"tail", 4)]
    # exactly at the cap, with and without a final newline
    f.write_bytes(b"a" * 8)
    assert list(read_lines(f, 8)) == [(1, b"a" * 8, 8)]
    f.write_bytes(b"a" * 9)
    assert list(read_lines(f, 8)) == [(1, None, 9)]
    f.write_bytes(b"a" * 10 + b"\n" + b"b")  # the line ends just past the read limit
    assert list(read_lines(f, 8)) == [(1, None, 10), (2, b"b", 1)]


def test_read_lines_unreadable(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        list(read_lines(tmp_path / "gone.jsonl", 8))


def test_bad_max_line_bytes(tmp_path, sp_model, capsys):
    dj = data_json(tmp_path, {"a.jsonl": [{"input": "q", "output": "a"}]})
    for bad in (0, -5):
        with pytest.raises(DataError, match="max_line_bytes"):
            prepare_sft(dj, sp_model, 32, tmp_path / "out", max_line_bytes=bad)
    rc, _, err = run_cli(["--data-json", dj, "--tokenizer", sp_model, "--max-seq-len", 32, "--max-line-bytes", 0,
                          "--output", tmp_path / "out"], capsys)
    assert rc == 1 and err.startswith("error:") and "max_line_bytes" in err and not (tmp_path / "out").exists()


def test_oversized_lines_skipped_with_file_line(tmp_path, sp_model):
    big = {"input": "q", "output": WORDS * 400}  # ~24 KB
    dj = data_json(tmp_path, {"a.jsonl": [{"input": "hello", "output": "hi"}, big, {"input": "x", "output": "y"}]})
    m = prepare_sft(dj, sp_model, 32, tmp_path / "out", max_line_bytes=4096)
    assert counts(m) == {"too_large": 1} and lines_of(m, "too_large") == [f"{tmp_path / 'a.jsonl'}:2"]
    assert "4,096" in m["skipped"]["too_large"]["first"][0] and m["max_line_bytes"] == 4096
    assert m["dialogues"] == 2 and m["sources"][str(tmp_path / "a.jsonl")]["records"] == 3
    # pre-training: a long line is a document, skipped only over the cap
    f = write_lines(tmp_path / "p.jsonl", [{"text": WORDS * 3}, {"text": WORDS * 400}, {"text": WORDS * 3}])
    m = prepare_pretrain([f], sp_model, 8, tmp_path / "pt", val_fraction=0, max_line_bytes=4096)
    assert counts(m) == {"too_large": 1} and lines_of(m, "too_large") == [f"{f}:2"]
    m = prepare_pretrain([f], sp_model, 8, tmp_path / "pt2", val_fraction=0)
    assert m["skipped_total"] == 0 and m["max_line_bytes"] == prepare.PRETRAIN_MAX_LINE_BYTES
    # a plain-text document over the cap
    txt = tmp_path / "book.txt"
    txt.write_text(WORDS * 400, encoding="utf-8")
    m = prepare_pretrain([f, txt], sp_model, 8, tmp_path / "pt3", val_fraction=0, max_line_bytes=4096)
    assert counts(m) == {"too_large": 2} and str(txt) in lines_of(m, "too_large")


def test_default_caps():
    assert prepare.default_max_line_bytes("sft", 64) == 1 << 20
    assert prepare.default_max_line_bytes("sft", 8192) == 256 * 8192
    assert prepare.default_max_line_bytes("pretrain", 64) == 64 << 20


# ---- memory: bounded by the cap, not by the longest line --------------------------------------------
CHILD = textwrap.dedent("""
    import json, resource, sys
    from telechat.data.prepare import prepare_pretrain, prepare_sft

    def status(key):
        with open("/proc/self/status") as fh:
            return next(int(x.split()[1]) for x in fh if x.startswith(key + ":"))

    mode, src, tok, out = sys.argv[1:5]
    try:  # reset the high-water mark, so that the imports' own peak does not hide prepare's
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = status("VmRSS")
    except OSError:
        before = 0
    if mode == "sft":
        m = prepare_sft(src, tok, 64, out)
    else:
        m = prepare_pretrain([src], tok, 64, out, val_fraction=0)
    peak = status("VmHWM") if before else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_kb": peak - before, "manifest": m}))
""")


def peak_mb(mode: str, src: Path, tok: Path, out: Path) -> tuple[float, dict]:
    """Peak resident memory (MB) that preparing `src` adds to a fresh process, and the manifest."""
    r = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(tok), str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return res["growth_kb"] / 1024, res["manifest"]


@pytest.mark.slow
def test_sft_memory_does_not_grow_with_a_20mb_line(tmp_path, sp_model):
    small = [{"input": f"question {i}", "output": "a short answer"} for i in range(20)]
    (tmp_path / "base").mkdir()
    base_dj = data_json(tmp_path / "base", {"a.jsonl": small})
    huge = {"input": "q", "output": WORDS * (20_000_000 // len(WORDS.encode()))}  # ~20 MB, one line
    (tmp_path / "big").mkdir()
    big_dj = data_json(tmp_path / "big", {"a.jsonl": small[:10] + [huge] + small[10:]})
    assert (tmp_path / "big" / "a.jsonl").stat().st_size > 20_000_000
    base, _ = peak_mb("sft", base_dj, sp_model, tmp_path / "o1")
    big, m = peak_mb("sft", big_dj, sp_model, tmp_path / "o2")
    # the line is read past in 1 MiB pieces: never held, decoded, parsed or tokenized
    assert big - base < 16, f"peak {big:.0f} MB with a 20 MB line vs {base:.0f} MB without"
    assert counts(m) == {"too_large": 1} and lines_of(m, "too_large") == [f"{tmp_path / 'big' / 'a.jsonl'}:11"]
    assert m["dialogues"] == 20


@pytest.mark.slow
def test_pretrain_memory_is_a_small_multiple_of_a_20mb_document(tmp_path, sp_model):
    small = write_lines(tmp_path / "small.jsonl", [{"text": WORDS * 20}] * 5)
    doc = WORDS * (20_000_000 // len(WORDS.encode()))
    big = write_lines(tmp_path / "big.jsonl", [{"text": WORDS * 20}] * 2 + [{"text": doc}] + [{"text": WORDS * 20}] * 3)
    size_mb = big.stat().st_size / 1e6
    base, _ = peak_mb("pretrain", small, sp_model, tmp_path / "o1")
    peak, m = peak_mb("pretrain", big, sp_model, tmp_path / "o2")
    # the text and the token ids (int32 pieces, then the blocks: about 10 bytes a token here, 0.7
    # tokens a byte with this small vocabulary) are the work; the tokenizer's own working memory is
    # bounded by tokenizing in pieces (the old code: 40 times the line)
    assert peak - base < 10 * size_mb, f"peak {peak:.0f} MB for a {size_mb:.0f} MB document vs {base:.0f} MB"
    assert m["skipped_total"] == 0 and m["splits"]["train"]["documents"] == 6


def test_segment_ids_across_block_boundaries(tmp_path, sp_model, sp_tokenizer):
    # documents of 1 to 3 blocks' length, some ending exactly on a block boundary
    L = 6
    texts = []
    for i in range(40):
        words = "ab cd ef gh ij kl mn op qr st uv wx".split()[: 1 + (i * 7) % 12]
        texts.append(" ".join(words))
    f = write_lines(tmp_path / "p.jsonl", [{"text": t} for t in texts])
    m = prepare_pretrain([f], sp_model, L, tmp_path / "out", val_fraction=0)
    stream = [i for t in texts for i in [*sp_tokenizer.encode(t), 2]]
    d = load_prepared(tmp_path / "out", "train")
    ids, seg = np.asarray(d["input_ids"]), np.asarray(d["segment_ids"])
    n = len(stream) // L
    assert ids.reshape(-1).tolist() == stream[:n * L] and m["splits"]["train"]["blocks"] == n
    doc_of = np.cumsum([0] + [int(t == 2) for t in stream[:-1]])[:n * L].reshape(n, L)  # document per token
    assert (seg == doc_of - doc_of[:, :1] + 1).all()
    assert any(doc_of[b, 0] != doc_of[b - 1, -1] for b in range(1, n))  # some block starts a document


def test_encode_long_matches_encode(monkeypatch, sp_tokenizer, hf_tokenizer_json):
    monkeypatch.setattr(prepare, "PIECE_CHARS", 64)
    text = (WORDS + "Numbers like 2024  and   3.14159\nare split. ") * 40
    for tok in (sp_tokenizer, load_tokenizer(hf_tokenizer_json)):
        got = encode_long(tok, text)
        assert got.dtype == np.int32 and got.tolist() == tok.encode(text)
    assert encode_long(sp_tokenizer, "short").tolist() == sp_tokenizer.encode("short")


# ---- one bad record never stops the run -----------------------------------------------------------
DEEP = b'{"input": "q", "output": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
BAD_SFT = [
    # (line, reason)
    (DEEP, "invalid_json"),
    (b"[" * 100_000, "invalid_json"),
    (b'{"input": "\\ud800", "output": "a"}', "bad_encoding"),
    (b'{"input": "q", "output": "ok \\udfff"}', "bad_encoding"),
    (b'{"system": "\\ud83d", "dialog": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}',
     "bad_encoding"),
    (b'{"dialog": [{"role": "user", "content": "\\ud800"}, {"role": "bot", "content": "a"}]}', "bad_encoding"),
    (b'{"input": "q", "output": "a", "n": ' + b"9" * 5001 + b"}", "invalid_json"),
    (b'{"input": ' + b"1" * 5001 + b', "output": "a"}', "invalid_json"),
    (b'{"input": ["q"], "output": "a"}', "missing_field"),
    (b'{"input": "q", "output": {"a": 1}}', "missing_field"),
    (b'{"input": null, "output": "a"}', "missing_field"),
    (b'{"system": 5, "dialog": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}', "missing_field"),
    (b'{"dialog": null}', "missing_field"),
    (b'{"dialog": "user: q"}', "missing_field"),
    (b'{"dialog": [1, 2]}', "unequal_turns"),
    (b'{"dialog": [{"role": ["user"], "content": "q"}, {"role": "bot", "content": "a"}]}', "unequal_turns"),
    (b'{"dialog": [{"role": "user", "content": 7}, {"role": "bot", "content": "a"}]}', "missing_field"),
    (b"null", "invalid_json"),
    (b"12", "invalid_json"),
    (b'{"input": "caf\xe9", "output": "a"}', "bad_encoding"),
    (b'{"input": "\xed\xa0\x80", "output": "a"}', "bad_encoding"),  # a surrogate encoded as UTF-8
    (b"\xff\xfe{", "bad_encoding"),
    (b'{"input": "q", "output": NaN', "invalid_json"),
]


@pytest.mark.parametrize("workers", [1, 2])
def test_each_bad_sft_record_is_skipped_and_counted(tmp_path, sp_model, workers):
    good = {"input": "hello", "output": "hi"}
    lines = [good]
    for raw, _ in BAD_SFT:
        lines += [raw, good]
    dj = data_json(tmp_path, {"bad.jsonl": lines})
    m = prepare_sft(dj, sp_model, 64, tmp_path / "out", num_workers=workers)
    f = tmp_path / "bad.jsonl"
    want: dict[str, list[int]] = {}
    for k, (_, reason) in enumerate(BAD_SFT):
        want.setdefault(reason, []).append(2 * k + 2)
    assert counts(m) == {r: len(v) for r, v in want.items()}
    for reason, nums in want.items():
        assert lines_of(m, reason) == [f"{f}:{n}" for n in nums][:prepare.MAX_EXAMPLES], reason
    assert m["skipped_total"] == len(BAD_SFT) and m["dialogues"] == len(BAD_SFT) + 1
    assert any("deep" in x for x in m["skipped"]["invalid_json"]["first"])
    assert any("surrogate" in x for x in m["skipped"]["bad_encoding"]["first"])


def test_bad_records_through_the_cli(tmp_path, sp_model, capsys):
    good = {"input": "hello", "output": "hi"}
    dj = data_json(tmp_path, {"bad.jsonl": [good, DEEP, b'{"input": "\\ud800", "output": "a"}',
                                            b'{"input": "q", "output": "a", "n": ' + b"9" * 5001 + b"}", good]})
    rc, out, err = run_cli(["--data-json", dj, "--tokenizer", sp_model, "--max-seq-len", 32,
                            "--output", tmp_path / "out"], capsys)
    assert rc == 0, err
    assert "3 skipped" in out and "skipped 2 (invalid_json)" in out and "skipped 1 (bad_encoding)" in out
    assert f"{tmp_path / 'bad.jsonl'}:2" in out and "Traceback" not in out + err


def test_tokenizer_failure_skips_only_that_record(tmp_path, sp_model, monkeypatch):
    from telechat.tokenizer import Tokenizer

    encode = Tokenizer.encode

    def flaky(self, text):
        if "BOOM" in text:
            raise RuntimeError("tokenizer exploded")
        return encode(self, text)

    monkeypatch.setattr(Tokenizer, "encode", flaky)
    dj = data_json(tmp_path, {"a.jsonl": [{"input": "hello", "output": "hi"}, {"input": "BOOM", "output": "x"},
                                          {"input": "ok", "output": "fine"}]})
    m = prepare_sft(dj, sp_model, 32, tmp_path / "out")
    assert counts(m) == {"tokenizer_error": 1} and lines_of(m, "tokenizer_error") == [f"{tmp_path / 'a.jsonl'}:2"]
    assert "exploded" in m["skipped"]["tokenizer_error"]["first"][0] and m["dialogues"] == 2
    f = write_lines(tmp_path / "p.jsonl", [{"text": WORDS}, {"text": "BOOM " + WORDS}, {"text": WORDS}])
    m = prepare_pretrain([f], sp_model, 8, tmp_path / "pt", val_fraction=0)
    assert counts(m) == {"tokenizer_error": 1} and lines_of(m, "tokenizer_error") == [f"{f}:2"]
    assert m["splits"]["train"]["documents"] == 2


BAD_PRETRAIN = [
    (DEEP, "invalid_json"),
    (b'{"text": "\\ud800 lone"}', "bad_encoding"),
    (b'{"text": "a", "n": ' + b"9" * 5001 + b"}", "invalid_json"),
    (b'{"text": ["a"]}', "missing_field"),
    (b'{"text": {"a": "b"}}', "missing_field"),
    (b"null", "missing_field"),
    (b'{"text": "caf\xe9"}', "bad_encoding"),
    (b"[" * 100_000, "invalid_json"),
]


@pytest.mark.parametrize("workers", [1, 2])
def test_each_bad_pretrain_record_is_skipped_and_counted(tmp_path, sp_model, workers):
    good = {"text": WORDS}
    lines = [good]
    for raw, _ in BAD_PRETRAIN:
        lines += [raw, good]
    f = write_lines(tmp_path / "p.jsonl", lines)
    m = prepare_pretrain([f], sp_model, 8, tmp_path / "out", val_fraction=0, num_workers=workers)
    want: dict[str, list[int]] = {}
    for k, (_, reason) in enumerate(BAD_PRETRAIN):
        want.setdefault(reason, []).append(2 * k + 2)
    assert counts(m) == {r: len(v) for r, v in want.items()}
    for reason, nums in want.items():
        assert lines_of(m, reason) == [f"{f}:{n}" for n in nums], reason
    assert m["splits"]["train"]["documents"] == len(BAD_PRETRAIN) + 1


def test_windows_of_tasks_keep_the_output_identical(tmp_path, sp_model, monkeypatch):
    monkeypatch.setattr(prepare, "CHUNK", 3)  # many windows of tasks through the pool
    recs = [{"input": f"q{i}", "output": f"answer {i}"} for i in range(150)] + ["{bad"]
    dj = data_json(tmp_path, {"a.jsonl": recs})
    m1 = prepare_sft(dj, sp_model, 48, tmp_path / "w1", num_workers=1, seed=3)
    m2 = prepare_sft(dj, sp_model, 48, tmp_path / "w2", num_workers=2, seed=3)
    for k in ("input_ids", "loss_mask", "segment_ids"):
        assert (np.load(tmp_path / "w1" / f"{k}.npy") == np.load(tmp_path / "w2" / f"{k}.npy")).all()
    assert m1["skipped"] == m2["skipped"] and m1["dialogues"] == 150
    f = write_lines(tmp_path / "p.jsonl", [{"text": f"doc {i} " + WORDS} for i in range(100)])
    p1 = prepare_pretrain([f], sp_model, 16, tmp_path / "p1", val_fraction=0.2, num_workers=1)
    p2 = prepare_pretrain([f], sp_model, 16, tmp_path / "p2", val_fraction=0.2, num_workers=2)
    assert p1["splits"] == p2["splits"]
    for s in ("train", "val"):
        assert (np.load(tmp_path / "p1" / s / "input_ids.npy") == np.load(tmp_path / "p2" / s / "input_ids.npy")).all()


# ---- the pre-training split ----------------------------------------------------------------------
def test_training_split_always_gets_a_block(tmp_path, sp_model, sp_tokenizer, capsys):
    # Nearly every document drawn for validation; the one left to training is shorter than a block.
    docs = ["hi"] + [f"long document {i}: " + WORDS * 3 for i in range(20)]
    f = write_lines(tmp_path / "p.jsonl", [{"text": t} for t in docs])
    L = 32
    assert len(sp_tokenizer.encode("hi")) + 1 < L
    seed = next(s for s in range(200) if (np.random.default_rng([s, 7]).random(len(docs)) < 0.99).all())
    m = prepare_pretrain([f], sp_model, L, tmp_path / "out", val_fraction=0.99, seed=seed)
    sp = m["splits"]
    assert sp["train"]["blocks"] >= 1 and sp["train"]["documents"] + sp["val"]["documents"] == len(docs)
    assert m["moved_to_train"] >= 1 and any("moved" in w for w in m["warnings"])
    assert np.load(tmp_path / "out" / "train" / "input_ids.npy").shape == (sp["train"]["blocks"], L)
    # the validation split, far larger than training, is also reported
    assert any("larger than the training split" in w for w in m["warnings"])
    rc, out, err = run_cli(["--mode", "pretrain", "--input", f, "--tokenizer", sp_model, "--max-seq-len", L,
                            "--val-fraction", 0.99, "--seed", seed, "--output", tmp_path / "cli"], capsys)
    assert rc == 0 and "warning: moved" in err and "larger than the training split" in err


def test_too_little_data_for_one_block_is_an_error(tmp_path, sp_model, capsys):
    f = write_lines(tmp_path / "p.jsonl", [{"text": "hi"}, {"text": "ok"}])
    with pytest.raises(DataError, match="fewer than max_seq_len 64"):
        prepare_pretrain([f], sp_model, 64, tmp_path / "out", val_fraction=0.5)
    rc, _, err = run_cli(["--mode", "pretrain", "--input", f, "--tokenizer", sp_model, "--max-seq-len", 64,
                          "--output", tmp_path / "out"], capsys)
    assert rc == 1 and err.startswith("error:") and "not enough for one block" in err
    assert not (tmp_path / "out").exists()


def test_empty_validation_split_is_a_warning(tmp_path, sp_model, capsys):
    # one short document goes to validation: fewer tokens than a block
    docs = [WORDS * 10, WORDS * 10, "hi"]
    f = write_lines(tmp_path / "p.jsonl", [{"text": t} for t in docs])
    L = 32
    seed = next(s for s in range(200)
                if (np.random.default_rng([s, 7]).random(3) < 0.3).tolist() == [False, False, True])
    m = prepare_pretrain([f], sp_model, L, tmp_path / "out", val_fraction=0.3, seed=seed)
    assert m["splits"]["val"]["documents"] == 1 and m["splits"]["val"]["blocks"] == 0
    assert m["splits"]["train"]["blocks"] >= 1
    assert any("validation split is empty" in w for w in m["warnings"])
    rc, _, err = run_cli(["--mode", "pretrain", "--input", f, "--tokenizer", sp_model, "--max-seq-len", L,
                          "--val-fraction", 0.3, "--seed", seed, "--output", tmp_path / "cli"], capsys)
    assert rc == 0 and "warning: the validation split is empty" in err
    # no validation asked for: nothing to warn about
    m = prepare_pretrain([f], sp_model, L, tmp_path / "noval", val_fraction=0)
    assert m["warnings"] == [] and m["moved_to_train"] == 0


def test_ordinary_split_has_no_warnings(tmp_path, sp_model):
    f = write_lines(tmp_path / "p.jsonl", [{"text": f"document {i}: " + WORDS * 2} for i in range(40)])
    m = prepare_pretrain([f], sp_model, 16, tmp_path / "out", val_fraction=0.2, seed=1)
    assert m["warnings"] == [] and m["splits"]["val"]["blocks"] >= 1
    assert m["splits"]["train"]["blocks"] > m["splits"]["val"]["blocks"]


# ---- the tokenizer in the manifest -------------------------------------------------------------------
def test_manifest_records_the_tokenizer(tmp_path, sp_model, sp_tokenizer, hf_tokenizer_json):
    dj = data_json(tmp_path, {"a.jsonl": [{"input": "hello", "output": "hi"}]})
    m = prepare_sft(dj, sp_model, 32, tmp_path / "out")
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    for mm in (m, on_disk):
        assert mm["tokenizer"] == mm["tokenizer_file"] == str(Path(sp_model).resolve())
        assert mm["tokenizer_vocab_size"] == sp_tokenizer.vocab_size == 400
        assert mm["tokenizer_sha256"] == hashlib.sha256(Path(sp_model).read_bytes()).hexdigest()
        assert mm["tokenizer_fingerprint"] == tokenizer_fingerprint(sp_tokenizer)
        assert mm["tokenizer_fingerprint"].startswith("sha256:") and len(mm["tokenizer_fingerprint"]) == 71
    # a copy elsewhere (e.g. inside a checkpoint) has the same fingerprint; another tokenizer does not
    copy = tmp_path / "ckpt"
    copy.mkdir()
    shutil.copy(sp_model, copy / "tokenizer.model")
    assert tokenizer_fingerprint(load_tokenizer(copy)) == m["tokenizer_fingerprint"]
    hf = load_tokenizer(hf_tokenizer_json)
    assert tokenizer_fingerprint(hf) != m["tokenizer_fingerprint"]
    f = write_lines(tmp_path / "p.jsonl", [{"text": WORDS * 5}])
    p = prepare_pretrain([f], hf_tokenizer_json.parent, 8, tmp_path / "pt", val_fraction=0)
    assert p["tokenizer_vocab_size"] == hf.vocab_size and p["tokenizer_fingerprint"] == tokenizer_fingerprint(hf)
    assert p["tokenizer_sha256"] == hashlib.sha256(hf_tokenizer_json.read_bytes()).hexdigest()
    assert p["tokenizer_file"] == str(hf_tokenizer_json.resolve())


# ---- fuzz: every mutated line is either used or skipped and counted, the run never aborts ----------
NASTY = [b"[" * 3000, b"\\ud800", b"\\udc00\\ud800", b"9" * 5000, b"\xff", b"\xed\xa0\x80", b"\xc3", b"\x00",
         b'"', b"\\", b"{", b"}", b"null", b"1e99999", b"NaN", b"-", b"\\u0000", b'"dialog": 1', b"<_user>",
         b"<_bot>", "今天".encode(), b"\xf0\x9f\x98"]


def mutate(rng: np.random.Generator, line: bytes) -> bytes:
    b = bytearray(line)
    for _ in range(int(rng.integers(1, 4))):
        op, pos = int(rng.integers(0, 4)), int(rng.integers(0, len(b) + 1))
        if op == 0:
            b[pos:pos] = NASTY[int(rng.integers(0, len(NASTY)))]
        elif op == 1 and b:
            del b[pos:pos + int(rng.integers(1, 8))]
        elif op == 2 and pos < len(b):
            b[pos] = int(rng.integers(0, 256))
        else:
            b = b[:pos]
    return bytes(b).replace(b"\n", b" ").replace(b"\r", b" ")


@pytest.mark.parametrize("mode", ["sft", "pretrain"])
def test_fuzzed_lines_are_all_accounted_for(tmp_path, sp_model, mode):
    rng = np.random.default_rng(23)
    if mode == "sft":
        seeds = [json.dumps({"input": "hello there", "output": "hi 今天"}).encode(),
                 json.dumps({"input": "<_user>q1<_bot>a1<_user>q2", "output": "a2"}).encode(),
                 json.dumps({"system": "be nice", "dialog": [{"role": "user", "content": "q"},
                                                              {"role": "bot", "content": "a"}]}).encode(),
                 json.dumps({"instruction": "say hi", "input": "to 今天", "output": "hi"}).encode(),
                 json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}).encode(),
                 json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "a"}]}).encode()]
    else:
        seeds = [json.dumps({"text": WORDS}).encode(), json.dumps({"data": "今天 " * 5, "text": 1}).encode()]
    lines = [mutate(rng, seeds[i % len(seeds)]) if i % 5 else seeds[i % len(seeds)] for i in range(1500)]
    f = tmp_path / "fuzz.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    records = sum(1 for x in lines if x.strip())
    if mode == "sft":
        (tmp_path / "data.json").write_text(json.dumps({"fuzz.jsonl": 1}))
        m = prepare_sft(tmp_path / "data.json", sp_model, 64, tmp_path / "out", num_workers=2)
        used = m["dialogues"]
    else:
        m = prepare_pretrain([f], sp_model, 16, tmp_path / "out", val_fraction=0.1, num_workers=2)
        used = m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"]
    assert used + m["skipped_total"] == records and used >= 300 and m["skipped_total"] >= 300
    assert set(m["skipped"]) <= {"invalid_json", "bad_encoding", "missing_field", "unequal_markers", "unequal_turns",
                                 "empty_answer", "empty_text", "too_long", "unknown_format", "unsupported_role"}

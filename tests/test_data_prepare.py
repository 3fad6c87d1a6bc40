"""`telechat data prepare`: SFT samples (weighting, formats, ids and loss mask, packing, truncation,
determinism, bad input) and pre-training blocks, through the functions and the command line."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from telechat.cli import main
from telechat.data.prepare import (DataError, copies, encode_dialogue, load_prepared, parse_dialogue,
                                   prepare_pretrain, prepare_sft, read_data_json)

from conftest import shared_path

# The SentencePiece fixture's special ids (checked in test_fixture_special_ids).
END, PAD, USER, BOT, SYSTEM = 2, 3, 4, 5, 6
ANSWER = "The quick brown fox jumps over the lazy dog"


# ---- helpers -------------------------------------------------------------------------------------
def write_jsonl(path: Path, records) -> Path:
    """One line per record: dicts as JSON, str/bytes as they are."""
    with open(path, "wb") as fh:
        for r in records:
            if isinstance(r, dict):
                r = json.dumps(r, ensure_ascii=False)
            if isinstance(r, str):
                r = r.encode("utf-8")
            fh.write(r + b"\n")
    return path


def data_json(tmp_path: Path, files: dict[str, tuple[list, float]], name: str = "data.json") -> Path:
    """Writes each {file: (records, weight)} and a data.json naming them (relative paths)."""
    spec = {}
    for fname, (records, weight) in files.items():
        write_jsonl(tmp_path / fname, records)
        spec[fname] = weight
    p = tmp_path / name
    p.write_text(json.dumps(spec), encoding="utf-8")
    return p


def expected(tok, turns, system=None) -> tuple[list[int], list[int]]:
    """Hand-built ids and loss mask: [<_system>] system, then [<_user>] q [<_bot>] a [<_end>] per turn,
    each text segment tokenized on its own."""
    ids, mask = [], []
    if system:
        s = tok.encode(system)
        ids += [SYSTEM, *s]
        mask += [0] * (1 + len(s))
    for q, a in turns:
        qi, ai = tok.encode(q), tok.encode(a)
        ids += [USER, *qi, BOT, *ai, END]
        mask += [1] + [0] * len(qi) + [1] + [1] * len(ai) + [1]
    return ids, mask


def dialogues_of(ids_row, mask_row, seg_row) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The packed dialogues of one sample, in order, after checking the left-padded layout."""
    ids_row, mask_row, seg_row = (np.asarray(a).astype(np.int64) for a in (ids_row, mask_row, seg_row))
    pad = int((seg_row == 0).sum())
    assert (seg_row[:pad] == 0).all() and (seg_row[pad:] > 0).all(), "padding must all be on the left"
    assert (ids_row[:pad] == PAD).all() and (mask_row[:pad] == 0).all(), "padding is pad ids without loss"
    body = seg_row[pad:]
    assert len(body) > 0, "a sample holds at least one dialogue"
    assert body[0] == 1 and (np.diff(body) >= 0).all() and (np.diff(body) <= 1).all(), "segments 1, 2, ... in order"
    out = []
    for k in range(1, int(body[-1]) + 1):
        idx = np.nonzero(seg_row == k)[0]
        out.append((tuple(ids_row[idx].tolist()), tuple(mask_row[idx].tolist())))
    return out


def all_dialogues(folder: Path) -> list[list[tuple]]:
    d = load_prepared(folder)
    return [dialogues_of(d["input_ids"][s], d["loss_mask"][s], d["segment_ids"][s])
            for s in range(d["input_ids"].shape[0])]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def short_records(prefix: str, n: int) -> list[dict]:
    return [{"input": f"{prefix}{i}", "output": "ok"} for i in range(n)]


# ---- formats, ids and loss mask ------------------------------------------------------------------
def test_fixture_special_ids(sp_tokenizer):
    t = sp_tokenizer
    assert (t.eos_id, t.pad_id, t.user_id, t.bot_id, t.system_id) == (END, PAD, USER, BOT, SYSTEM)


@pytest.mark.parametrize("record", [{"input": "hello", "output": ANSWER},
                                    {"input": "<_user>hello", "output": ANSWER}], ids=["plain", "marker"])
def test_single_turn_ids_and_mask(tmp_path, sp_model, sp_tokenizer, record):
    assert parse_dialogue(json.dumps(record).encode()) == (None, [("hello", ANSWER)])
    dj = data_json(tmp_path, {"a.jsonl": ([record], 1)})
    m = prepare_sft(dj, sp_model, 64, tmp_path / "out")
    ids, mask = expected(sp_tokenizer, [("hello", ANSWER)])
    d = load_prepared(tmp_path / "out")
    assert d["input_ids"].shape == d["loss_mask"].shape == d["segment_ids"].shape == (1, 64)
    assert d["input_ids"].dtype == np.int32 and d["loss_mask"].dtype == np.uint8 and d["segment_ids"].dtype == np.uint16
    pad = 64 - len(ids)
    assert d["input_ids"][0].tolist() == [PAD] * pad + ids
    assert d["loss_mask"][0].tolist() == [0] * pad + mask
    assert d["segment_ids"][0].tolist() == [0] * pad + [1] * len(ids)
    # the mask: 1 on <_user>, 0 on the question, 1 from <_bot> to <_end>
    q = len(sp_tokenizer.encode("hello"))
    assert mask[0] == 1 and mask[1:1 + q] == [0] * q and all(mask[1 + q:])
    assert m["num_samples"] == 1 and m["dialogues"] == 1 and m["tokens"] == len(ids)
    assert m["loss_tokens"] == sum(mask) and m["padding_tokens"] == pad and m["pad_id"] == PAD


def test_multi_turn_markers_ids_and_mask(tmp_path, sp_model, sp_tokenizer):
    rec = {"input": "<_user>q1 hello<_bot>a1 the lazy dog<_user>q2 today", "output": ANSWER}
    turns = [("q1 hello", "a1 the lazy dog"), ("q2 today", ANSWER)]
    assert parse_dialogue(json.dumps(rec).encode()) == (None, turns)
    dj = data_json(tmp_path, {"m.jsonl": ([rec], 1)})
    prepare_sft(dj, sp_model, 80, tmp_path / "out")
    d = load_prepared(tmp_path / "out")
    ids, mask = expected(sp_tokenizer, turns)
    assert ids.count(USER) == 2 and ids.count(BOT) == 2 and ids.count(END) == 2
    pad = 80 - len(ids)
    assert d["input_ids"][0].tolist() == [PAD] * pad + ids
    assert d["loss_mask"][0].tolist() == [0] * pad + mask
    assert d["segment_ids"][0].tolist() == [0] * pad + [1] * len(ids)


def test_system_dialog_ids_and_mask(tmp_path, sp_model, sp_tokenizer):
    system = "You are TeleChat, a bilingual model."
    dialog = [{"role": "user", "content": "hello"}, {"role": "bot", "content": "今天天气很好"},
              {"role": "user", "content": "The fox?"}, {"role": "bot", "content": ANSWER}]
    rec = {"system": system, "dialog": dialog}
    turns = [("hello", "今天天气很好"), ("The fox?", ANSWER)]
    assert parse_dialogue(json.dumps(rec, ensure_ascii=False).encode()) == (system, turns)
    ids, mask = expected(sp_tokenizer, turns, system)
    e_ids, e_mask, lengths = encode_dialogue(sp_tokenizer, system, turns)
    assert (np.asarray(e_ids).tolist(), np.asarray(e_mask).tolist()) == (ids, mask)
    assert sum(lengths) == len(ids) and len(lengths) == 3  # system prefix + two turns
    assert ids[0] == SYSTEM and mask[:1 + len(sp_tokenizer.encode(system))] == [0] * (1 + len(sp_tokenizer.encode(system)))

    dj = data_json(tmp_path, {"s.jsonl": ([rec], 1)})
    m = prepare_sft(dj, sp_model, 100, tmp_path / "out")
    d = load_prepared(tmp_path / "out")
    pad = 100 - len(ids)
    assert d["input_ids"][0].tolist() == [PAD] * pad + ids
    assert d["loss_mask"][0].tolist() == [0] * pad + mask
    assert m["special_ids"]["system"] == SYSTEM


def test_hf_tokenizer_pad_token_is_used(tmp_path, hf_tokenizer_json):
    """The 7B-style tokenizer.json pads with its own "<pad>" and marks turns with its <_user>/<_bot>/<_end>."""
    import telechat

    tok = telechat.load_tokenizer(hf_tokenizer_json.parent)
    pad, user, bot, end = (tok.token_to_id(t) for t in ("<pad>", "<_user>", "<_bot>", "<_end>"))
    dj = data_json(tmp_path, {"a.jsonl": ([{"input": "hello", "output": ANSWER}], 1)})
    m = prepare_sft(dj, hf_tokenizer_json.parent, 48, tmp_path / "out")
    q, a = tok.encode("hello"), tok.encode(ANSWER)
    ids = [user, *q, bot, *a, end]
    d = load_prepared(tmp_path / "out")
    assert m["pad_id"] == pad
    assert d["input_ids"][0].tolist() == [pad] * (48 - len(ids)) + ids
    assert d["loss_mask"][0].tolist() == [0] * (48 - len(ids)) + [1] + [0] * len(q) + [1] * (len(a) + 2)


def test_two_dialogues_left_padded_with_segment_ids(tmp_path, sp_model, sp_tokenizer):
    recs = [{"input": "hello", "output": "hi"}, {"input": "你好", "output": "世界"}]
    dj = data_json(tmp_path, {"a.jsonl": (recs, 1)})
    m = prepare_sft(dj, sp_model, 40, tmp_path / "out")
    d = load_prepared(tmp_path / "out")
    assert d["input_ids"].shape == (1, 40) and m["num_samples"] == 1
    e = [expected(sp_tokenizer, [("hello", "hi")]), expected(sp_tokenizer, [("你好", "世界")])]
    got = dialogues_of(d["input_ids"][0], d["loss_mask"][0], d["segment_ids"][0])
    assert sorted(got) == sorted((tuple(i), tuple(k)) for i, k in e)
    n0, n1 = len(got[0][0]), len(got[1][0])
    pad = 40 - n0 - n1
    assert d["segment_ids"][0].tolist() == [0] * pad + [1] * n0 + [2] * n1
    assert d["input_ids"][0, :pad].tolist() == [PAD] * pad
    assert m["fill"] == pytest.approx((n0 + n1) / 40, abs=1e-4)


# ---- packing, truncation, dropping -----------------------------------------------------------------
def test_packing_whole_dialogues_greedy(tmp_path, sp_model, sp_tokenizer):
    L = 100
    recs, by_ids = [], {}
    for i in range(30):
        rec = {"input": f"q{i}", "output": " ".join(["the lazy dog"] * (i % 5 + 1))}  # 15 to 51 tokens
        recs.append(rec)
        ids, mask = expected(sp_tokenizer, [(rec["input"], rec["output"])])
        assert len(ids) <= L
        by_ids[tuple(ids)] = (i, tuple(mask))
    assert len(by_ids) == 30
    dj = data_json(tmp_path, {"a.jsonl": (recs, 1)})
    m = prepare_sft(dj, sp_model, L, tmp_path / "out")
    samples = all_dialogues(tmp_path / "out")
    assert m["num_samples"] == len(samples) and m["dialogues"] == 30 and m["epochs"] == 1

    order = []
    for sample in samples:
        for ids, mask in sample:
            assert ids in by_ids, "every packed segment is one whole dialogue"
            assert mask == by_ids[ids][1]
            order.append(by_ids[ids][0])
    assert sorted(order) == list(range(30)), "one pass: each dialogue exactly once"

    # greedy: a new sample starts only when the next dialogue does not fit in the current one
    used = [sum(len(ids) for ids, _ in s) for s in samples]
    assert max(len(s) for s in samples) >= 3, "short dialogues share a sample"
    for s in range(len(samples) - 1):
        assert used[s] + len(samples[s + 1][0][0]) > L
    # ... so the packing is exactly greedy packing of the realized order
    greedy, cur = [], 0
    for i in order:
        n = len(expected(sp_tokenizer, [(recs[i]["input"], recs[i]["output"])])[0])
        if cur and cur + n > L:
            greedy.append(cur)
            cur = 0
        cur += n
    greedy.append(cur)
    assert greedy == used
    total = sum(used)
    assert m["tokens"] == total and m["padding_tokens"] == len(samples) * L - total
    assert m["fill"] == pytest.approx(total / (len(samples) * L), abs=1e-4)


def test_truncated_at_turn_boundary(tmp_path, sp_model, sp_tokenizer):
    turns = [("q1", "a first answer"), ("q2", ANSWER), ("q3", "今天天气很好，我们去公园散步吧。")]
    rec = {"input": "<_user>q1<_bot>a first answer<_user>q2<_bot>" + ANSWER + "<_user>q3", "output": turns[2][1]}
    two, two_mask = expected(sp_tokenizer, turns[:2])
    full, _ = expected(sp_tokenizer, turns)
    L = len(full) - 1  # the third turn does not fit, the first two do
    assert len(two) <= L
    dj = data_json(tmp_path, {"t.jsonl": ([rec], 1)})
    m = prepare_sft(dj, sp_model, L, tmp_path / "out")
    [[(ids, mask)]] = all_dialogues(tmp_path / "out")
    assert list(ids) == two and list(mask) == two_mask
    assert ids[-1] == END and mask[-1] == 1, "never cut mid-answer"
    assert m["truncated_dialogues"] == 1 and m["skipped_total"] == 0


def test_system_dialogue_truncated_keeps_system_and_first_turn(tmp_path, sp_model, sp_tokenizer):
    system = "You are TeleChat."
    turns = [("hello", "hi"), ("The fox?", ANSWER)]
    rec = {"system": system, "dialog": [{"role": r, "content": c} for q, a in turns for r, c in (("user", q), ("bot", a))]}
    one, one_mask = expected(sp_tokenizer, turns[:1], system)
    full, _ = expected(sp_tokenizer, turns, system)
    L = len(full) - 2
    dj = data_json(tmp_path, {"s.jsonl": ([rec], 1)})
    m = prepare_sft(dj, sp_model, L, tmp_path / "out")
    [[(ids, mask)]] = all_dialogues(tmp_path / "out")
    assert list(ids) == one and list(mask) == one_mask
    assert m["truncated_dialogues"] == 1


def test_first_turn_too_long_is_dropped(tmp_path, sp_model, sp_tokenizer):
    long_answer = " ".join([ANSWER] * 6)
    small = {"input": "hello", "output": "hi"}
    small_ids, _ = expected(sp_tokenizer, [("hello", "hi")])
    L = 32
    assert len(expected(sp_tokenizer, [("q", long_answer)])[0]) > L
    sys_rec = {"system": "You are TeleChat.", "dialog": [{"role": "user", "content": "q"},
                                                          {"role": "bot", "content": long_answer}]}
    recs = [small, {"input": "q", "output": long_answer}, sys_rec]
    dj = data_json(tmp_path, {"d.jsonl": (recs, 1)})
    m = prepare_sft(dj, sp_model, L, tmp_path / "out")
    assert m["skipped"]["too_long"]["count"] == 2 and m["skipped_total"] == 2
    firsts = m["skipped"]["too_long"]["first"]
    assert firsts[0].startswith(f"{tmp_path / 'd.jsonl'}:2") and firsts[1].startswith(f"{tmp_path / 'd.jsonl'}:3")
    assert m["dialogues"] == 1 and m["truncated_dialogues"] == 0
    [[(ids, _)]] = all_dialogues(tmp_path / "out")
    assert list(ids) == small_ids


def test_every_record_too_long_is_an_error(tmp_path, sp_model):
    dj = data_json(tmp_path, {"d.jsonl": ([{"input": "q", "output": ANSWER}], 1)})
    with pytest.raises(DataError, match="too_long"):
        prepare_sft(dj, sp_model, 8, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- weighting ---------------------------------------------------------------------------------------
def test_copies_semantics():
    rng = np.random.default_rng(0)
    n = 2000
    kept = [copies(0.3, rng) for _ in range(n)]
    assert set(kept) <= {0, 1}
    assert abs(sum(kept) - 0.3 * n) < 4 * np.sqrt(n * 0.3 * 0.7)  # ~30% within 4 sigma
    c = [copies(2.5, rng) for _ in range(n)]
    assert set(c) == {2, 3}
    assert abs(np.mean(c) - 2.5) < 0.05
    assert all(copies(0.0, rng) == 0 for _ in range(200))
    assert all(copies(1.0, rng) == 1 for _ in range(200))
    assert all(copies(3.0, rng) == 3 for _ in range(200))
    assert all(copies(0.999999, rng) in (0, 1) for _ in range(50))


def test_weights_in_manifest_and_output(tmp_path, sp_model, sp_tokenizer):
    files = {"a.jsonl": (short_records("a", 2000), 0.3), "b.jsonl": (short_records("b", 400), 2.5),
             "c.jsonl": (short_records("c", 50), 0)}
    dj = data_json(tmp_path, files)
    m = prepare_sft(dj, sp_model, 64, tmp_path / "out", seed=3)
    src = {Path(k).name: v for k, v in m["sources"].items()}
    assert src["a.jsonl"]["records"] == 2000 and src["b.jsonl"]["records"] == 400 and src["c.jsonl"]["records"] == 50
    assert (src["a.jsonl"]["weight"], src["b.jsonl"]["weight"], src["c.jsonl"]["weight"]) == (0.3, 2.5, 0.0)
    a, b = src["a.jsonl"]["selected"], src["b.jsonl"]["selected"]
    assert abs(a - 600) < 4 * np.sqrt(2000 * 0.21)
    assert 800 <= b <= 1200 and abs(b / 400 - 2.5) < 0.1
    assert src["c.jsonl"]["selected"] == 0
    assert m["dialogues"] == a + b and m["seed"] == 3

    # the output holds exactly those copies: each b record 2 or 3 times, no c record
    name_of = {}
    for prefix, n in (("a", 2000), ("b", 400), ("c", 50)):
        for i in range(n):
            name_of[tuple(expected(sp_tokenizer, [(f"{prefix}{i}", "ok")])[0])] = f"{prefix}{i}"
    seen = Counter(name_of[ids] for sample in all_dialogues(tmp_path / "out") for ids, _ in sample)
    assert sum(v for k, v in seen.items() if k[0] == "a") == a and set(v for k, v in seen.items() if k[0] == "a") == {1}
    b_counts = [seen.get(f"b{i}", 0) for i in range(400)]
    assert set(b_counts) == {2, 3} and sum(b_counts) == b
    assert not any(k.startswith("c") for k in seen)


def test_num_samples_cycles_the_data(tmp_path, sp_model, sp_tokenizer):
    recs = short_records("q", 10)
    dj = data_json(tmp_path, {"a.jsonl": (recs, 1)})
    m = prepare_sft(dj, sp_model, 32, tmp_path / "out", num_samples=25)
    samples = all_dialogues(tmp_path / "out")
    assert len(samples) == 25 and m["num_samples"] == 25 and load_prepared(tmp_path / "out")["input_ids"].shape == (25, 32)
    assert m["epochs"] >= 2
    known = {tuple(expected(sp_tokenizer, [(r["input"], "ok")])[0]) for r in recs}
    count = Counter(ids for s in samples for ids, _ in s)
    assert set(count) == known
    assert max(count.values()) - min(count.values()) <= 1, "whole passes over the data, then a partial one"

    m1 = prepare_sft(dj, sp_model, 32, tmp_path / "few", num_samples=2)
    assert m1["num_samples"] == 2 and m1["epochs"] == 1 and len(all_dialogues(tmp_path / "few")) == 2


# ---- determinism ---------------------------------------------------------------------------------------
def _mixed_files():
    x = [{"input": f"<_user>question {i}<_bot>answer {i}<_user>and {i}?", "output": ANSWER} for i in range(500)]
    x[17] = "{broken"
    x[300] = {"input": "q"}
    y = [{"system": "You are TeleChat.", "dialog": [{"role": "user", "content": f"你好 {i}"},
                                                    {"role": "bot", "content": f"世界 {i}"}]} for i in range(200)]
    return {"x.jsonl": (x, 0.7), "y.jsonl": (y, 1.5)}


def test_same_seed_byte_identical_for_any_num_workers(tmp_path, sp_model):
    dj = data_json(tmp_path, _mixed_files())
    outs = []
    for w in (1, 2, 3):
        out = tmp_path / f"out{w}"
        prepare_sft(dj, sp_model, 128, out, num_samples=60, num_workers=w, seed=5)
        outs.append(folder_bytes(out))
    assert set(outs[0]) == {"input_ids.npy", "loss_mask.npy", "segment_ids.npy", "manifest.json"}
    assert outs[0] == outs[1] == outs[2]
    manifest = json.loads(outs[0]["manifest.json"])
    assert manifest["seed"] == 5 and manifest["skipped_total"] > 0  # bad lines took part too

    prepare_sft(dj, sp_model, 128, tmp_path / "seed6", num_samples=60, num_workers=2, seed=6)
    other = folder_bytes(tmp_path / "seed6")
    assert other["input_ids.npy"] != outs[0]["input_ids.npy"]


def test_different_seed_different_order(tmp_path, sp_model):
    dj = data_json(tmp_path, {"a.jsonl": (short_records("r", 40), 1)})
    orders = []
    for seed in (0, 1):
        prepare_sft(dj, sp_model, 48, tmp_path / f"s{seed}", seed=seed)
        orders.append([ids for s in all_dialogues(tmp_path / f"s{seed}") for ids, _ in s])
    assert sorted(orders[0]) == sorted(orders[1]), "weight 1: the same dialogues"
    assert orders[0] != orders[1], "in another order"


# ---- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, reason", [
    (b'{"input": "q", "output": ', "invalid_json"),
    (b'[1, 2]', "invalid_json"),
    (b'"just a string"', "invalid_json"),
    (b'{"input": "q"}', "missing_field"),
    (b'{"output": "a"}', "missing_field"),
    (b'{"input": 3, "output": "a"}', "missing_field"),
    (b'{"input": "<_user>q1<_bot>a1<_bot>q2", "output": "a"}', "unequal_markers"),
    (b'{"input": "<_user>q1<_bot>a1", "output": "a"}', "unequal_markers"),
    (b'{"input": "q<_bot>", "output": "a"}', "unequal_markers"),
    (b'{"input": "q", "output": "  "}', "empty_answer"),
    (b'{"input": "<_user>q1<_bot> <_user>q2", "output": "a"}', "empty_answer"),
    (b'{"input": "caf\xe9", "output": "a"}', "bad_encoding"),
    (b'{"dialog": [{"role": "bot", "content": "a"}, {"role": "user", "content": "q"}]}', "unequal_turns"),
    (b'{"dialog": [{"role": "user", "content": "q"}]}', "unequal_turns"),
    (b'{"dialog": []}', "missing_field"),
    (b'{"dialog": [{"role": "user", "content": "q"}, {"role": "bot", "content": ""}]}', "empty_answer"),
])
def test_parse_dialogue_rejects(raw, reason):
    with pytest.raises(ValueError) as e:
        parse_dialogue(raw)
    assert str(e.value).split(":")[0] == reason


def test_bad_input_counted_per_reason(tmp_path, sp_model, sp_tokenizer):
    lines = [
        {"input": "hello", "output": "hi"},                                                   # 1 good
        '{"input": "q", "output": ',                                                          # 2 malformed JSON
        "[1, 2, 3]",                                                                          # 3 not an object
        {"input": "q"},                                                                       # 4 no output
        {"input": "<_user>q1<_bot>a1<_bot>q2", "output": "a"},                                # 5 unequal markers
        {"input": "q", "output": ""},                                                         # 6 empty answer
        b'{"input": "caf\xe9", "output": "a"}',                                               # 7 not UTF-8
        {"dialog": [{"role": "bot", "content": "a"}, {"role": "user", "content": "q"}]},     # 8 role order
        "",                                                                                   # 9 blank: ignored
        {"input": "你好", "output": "世界"},                                                   # 10 good
    ]
    dj = data_json(tmp_path, {"bad.jsonl": (lines, 1)})
    m = prepare_sft(dj, sp_model, 64, tmp_path / "out")
    f = tmp_path / "bad.jsonl"
    want = {"invalid_json": [2, 3], "missing_field": [4], "unequal_markers": [5], "empty_answer": [6],
            "bad_encoding": [7], "unequal_turns": [8]}
    assert {r: v["count"] for r, v in m["skipped"].items()} == {r: len(v) for r, v in want.items()}
    for reason, line_nos in want.items():
        firsts = m["skipped"][reason]["first"]
        assert [x.split(": ")[0] for x in firsts] == [f"{f}:{n}" for n in line_nos], reason
    assert m["skipped_total"] == 7
    assert m["sources"][str(f)]["records"] == 9  # the blank line is no record
    assert m["dialogues"] == 2
    got = {ids for s in all_dialogues(tmp_path / "out") for ids, _ in s}
    assert got == {tuple(expected(sp_tokenizer, [("hello", "hi")])[0]), tuple(expected(sp_tokenizer, [("你好", "世界")])[0])}


def test_first_examples_are_limited(tmp_path, sp_model):
    lines = [{"input": "hello", "output": "hi"}] + ["not json"] * 12
    dj = data_json(tmp_path, {"bad.jsonl": (lines, 1)})
    m = prepare_sft(dj, sp_model, 32, tmp_path / "out")
    assert m["skipped"]["invalid_json"]["count"] == 12
    firsts = m["skipped"]["invalid_json"]["first"]
    assert 1 <= len(firsts) < 12 and firsts[0].startswith(f"{tmp_path / 'bad.jsonl'}:2")


# ---- errors --------------------------------------------------------------------------------------------
def run_cli(args, capsys) -> tuple[int, str, str]:
    rc = main(["data", "prepare", *map(str, args)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_missing_data_json(tmp_path, sp_model, capsys):
    missing = tmp_path / "nope.json"
    with pytest.raises(DataError, match="nope.json"):
        prepare_sft(missing, sp_model, 32, tmp_path / "out")
    rc, _, err = run_cli(["--data-json", missing, "--tokenizer", sp_model, "--max-seq-len", 32,
                          "--output", tmp_path / "out"], capsys)
    assert rc == 1 and err.startswith("error:") and "nope.json" in err
    assert not (tmp_path / "out").exists()


def test_data_json_names_missing_file(tmp_path, sp_model, capsys):
    dj = tmp_path / "data.json"
    dj.write_text(json.dumps({"ghost.jsonl": 1}))
    with pytest.raises(DataError, match="ghost.jsonl"):
        read_data_json(dj)
    rc, _, err = run_cli(["--data-json", dj, "--tokenizer", sp_model, "--max-seq-len", 32,
                          "--output", tmp_path / "out"], capsys)
    assert rc == 1 and "ghost.jsonl" in err and "error:" in err


@pytest.mark.parametrize("weight", [-1, -0.5, "2", True, None, float("nan")])
def test_bad_weight(tmp_path, weight):
    write_jsonl(tmp_path / "a.jsonl", short_records("a", 1))
    dj = tmp_path / "data.json"
    dj.write_text(json.dumps({"a.jsonl": weight}))
    with pytest.raises(DataError, match="a.jsonl") as e:
        read_data_json(dj)
    assert "weight" in str(e.value) and str(dj) in str(e.value)


def test_bad_data_json(tmp_path):
    dj = tmp_path / "data.json"
    for text in ("{not json", "[]", "{}"):
        dj.write_text(text)
        with pytest.raises(DataError, match="data.json"):
            read_data_json(dj)


def test_read_data_json_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "a.jsonl", short_records("a", 1))
    dj = tmp_path / "data.json"
    dj.write_text(json.dumps({"sub/a.jsonl": 2.5, str(tmp_path / "sub" / "a.jsonl"): 0}))
    assert read_data_json(dj) == [(tmp_path / "sub" / "a.jsonl", 2.5), (tmp_path / "sub" / "a.jsonl", 0.0)]


@pytest.fixture(scope="module")
def no_specials_tokenizer(tmp_path_factory) -> Path:
    """A tokenizer.json with <_end> and <pad> but no <_user>/<_bot>/<_system>."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path_factory.mktemp("nospecials")
    vocab = {"<unk>": 0, "<pad>": 1, "<_end>": 2, "hello": 3, "hi": 4, "ok": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<_end>"])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<_end>", "pad_token": "<pad>", "unk_token": "<unk>"}))
    return d


def test_tokenizer_without_user_token(tmp_path, no_specials_tokenizer, capsys):
    dj = data_json(tmp_path, {"a.jsonl": ([{"input": "hello", "output": "hi"}], 1)})
    with pytest.raises(DataError, match="<_user>") as e:
        prepare_sft(dj, no_specials_tokenizer, 32, tmp_path / "out")
    assert str(no_specials_tokenizer) in str(e.value) and "<_bot>" in str(e.value)
    rc, _, err = run_cli(["--data-json", dj, "--tokenizer", no_specials_tokenizer, "--max-seq-len", 32,
                          "--output", tmp_path / "out"], capsys)
    assert rc == 1 and "<_user>" in err and str(no_specials_tokenizer) in err
    assert not (tmp_path / "out").exists()
    # pre-training needs only <_end>: the same tokenizer is fine there
    doc = tmp_path / "doc.txt"
    doc.write_text("hello hi ok " * 20)
    m = prepare_pretrain([doc], no_specials_tokenizer, 8, tmp_path / "pt", val_fraction=0)
    assert m["end_id"] == 2 and m["splits"]["train"]["blocks"] == 61 // 8


def test_missing_tokenizer_folder(tmp_path, capsys):
    dj = data_json(tmp_path, {"a.jsonl": ([{"input": "hello", "output": "hi"}], 1)})
    (tmp_path / "empty").mkdir()
    rc, _, err = run_cli(["--data-json", dj, "--tokenizer", tmp_path / "empty", "--max-seq-len", 32,
                          "--output", tmp_path / "out"], capsys)
    assert rc == 1 and "error:" in err and str(tmp_path / "empty") in err


def test_system_record_with_tokenizer_without_system_token(tmp_path, hf_tokenizer_json):
    rec = {"system": "You are TeleChat.", "dialog": [{"role": "user", "content": "hello"},
                                                      {"role": "bot", "content": "hi"}]}
    dj = data_json(tmp_path, {"s.jsonl": ([rec, {"input": "hello", "output": "hi"}], 1)})
    try:
        m = prepare_sft(dj, hf_tokenizer_json.parent, 64, tmp_path / "out")
    except DataError as e:
        assert "<_system>" in str(e)
    else:
        assert m["skipped_total"] == 1 and m["dialogues"] == 1
        assert "no_system_token" in m["skipped"]


# ---- output folder -----------------------------------------------------------------------------------
def test_output_folder_protection(tmp_path, sp_model, capsys):
    dj = data_json(tmp_path, {"a.jsonl": (short_records("a", 3), 1)})
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing"):
        prepare_sft(dj, sp_model, 32, precious)
    assert (precious / "notes.txt").read_text() == "keep me" and sorted(p.name for p in precious.iterdir()) == ["notes.txt"]
    rc, _, err = run_cli(["--data-json", dj, "--tokenizer", sp_model, "--max-seq-len", 32, "--output", precious], capsys)
    assert rc == 1 and str(precious) in err
    assert (precious / "notes.txt").exists()

    a_file = tmp_path / "file.bin"
    a_file.write_bytes(b"x")
    with pytest.raises(DataError):
        prepare_sft(dj, sp_model, 32, a_file)
    assert a_file.read_bytes() == b"x"

    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_sft(dj, sp_model, 32, empty)
    assert (empty / "manifest.json").exists()
    # a prepared dataset is replaced, with nothing stale left over
    prepare_pretrain([tmp_path / "a.jsonl"], sp_model, 4, empty, text_field="input", val_fraction=0)
    assert sorted(p.name for p in empty.iterdir()) == ["manifest.json", "train", "val"]
    assert json.loads((empty / "manifest.json").read_text())["mode"] == "pretrain"
    assert not any(p.name.endswith(".tmp-prepare") for p in tmp_path.iterdir())


def test_foreign_folder_with_manifest_is_not_replaced(tmp_path, sp_model):
    dj = data_json(tmp_path, {"a.jsonl": (short_records("a", 3), 1)})
    app = tmp_path / "webapp"
    app.mkdir()
    (app / "manifest.json").write_text(json.dumps({"name": "my web app"}))
    (app / "index.html").write_text("<html></html>")
    with pytest.raises(DataError, match="refusing"):
        prepare_sft(dj, sp_model, 32, app)
    assert (app / "index.html").exists()


def test_load_prepared_read_only_memmaps(tmp_path, sp_model):
    dj = data_json(tmp_path, {"a.jsonl": (short_records("a", 5), 1)})
    prepare_sft(dj, sp_model, 32, tmp_path / "out")
    d = load_prepared(tmp_path / "out")
    assert d["manifest"]["mode"] == "sft" and d["manifest"]["format"] == "telechat-prepared-v1"
    for name in ("input_ids", "loss_mask", "segment_ids"):
        a = d[name]
        assert isinstance(a, np.memmap) and not a.flags.writeable
        with pytest.raises(ValueError):
            a[0, 0] = 1
    with pytest.raises(DataError, match="manifest.json"):
        load_prepared(tmp_path)


# ---- pre-training ----------------------------------------------------------------------------------------
DOCS = [
    "TeleChat is a bilingual large language model trained on Chinese and English text.",
    "星辰语义大模型是由中国电信人工智能研究院研发训练的大语言模型。",
    "The quick brown fox jumps over the lazy dog 12345 times.",
    "今天天气很好，我们去公园散步吧。你好，世界！",
    "Large language models generate text one token at a time, using a key value cache.",
]


def test_pretrain_stream_and_blocks(tmp_path, sp_model, sp_tokenizer):
    ptd = write_jsonl(tmp_path / "ptd.jsonl", [{"data": t} for t in DOCS[:3]])
    txt = tmp_path / "doc.txt"
    txt.write_text(DOCS[3] + "\n" + DOCS[4] + "\n", encoding="utf-8")  # one document, newlines and all
    L = 16
    m = prepare_pretrain([ptd, txt], sp_model, L, tmp_path / "out", val_fraction=0)
    texts = DOCS[:3] + [DOCS[3] + "\n" + DOCS[4] + "\n"]
    stream = [i for t in texts for i in [*sp_tokenizer.encode(t), END]]
    n = len(stream) // L
    d = load_prepared(tmp_path / "out", "train")
    ids, seg = np.asarray(d["input_ids"]), np.asarray(d["segment_ids"])
    assert ids.shape == seg.shape == (n, L) and ids.dtype == np.int32
    assert ids.reshape(-1).tolist() == stream[:n * L]
    tr = m["splits"]["train"]
    assert tr == {"documents": 4, "tokens": len(stream), "blocks": n, "dropped_tail_tokens": len(stream) - n * L}
    assert m["splits"]["val"]["documents"] == 0 and load_prepared(tmp_path / "out", "val")["input_ids"].shape == (0, L)
    # segment ids: document k of the block, counting from 1 at each block start
    for b in range(n):
        ends_before = np.concatenate([[0], np.cumsum(ids[b] == END)[:-1]])
        assert seg[b].tolist() == (1 + ends_before).tolist()
    assert m["end_id"] == END and m["skipped_total"] == 0


def test_pretrain_text_field(tmp_path, sp_model, sp_tokenizer):
    f = write_jsonl(tmp_path / "c.jsonl", [{"body": t, "data": "not this"} for t in DOCS])
    m = prepare_pretrain([f], sp_model, 8, tmp_path / "out", text_field="body", val_fraction=0)
    stream = [i for t in DOCS for i in [*sp_tokenizer.encode(t), END]]
    flat = np.asarray(load_prepared(tmp_path / "out", "train")["input_ids"]).reshape(-1).tolist()
    assert flat == stream[:len(stream) // 8 * 8] and m["text_field"] == "body"
    # the default field is "data"
    prepare_pretrain([f], sp_model, 8, tmp_path / "dflt", val_fraction=0)
    flat = np.asarray(load_prepared(tmp_path / "dflt", "train")["input_ids"]).reshape(-1).tolist()
    assert flat == [i for _ in DOCS for i in [*sp_tokenizer.encode("not this"), END]][:len(flat)]
    # a field that is absent: every line skipped, which is an error
    with pytest.raises(DataError, match="missing_field"):
        prepare_pretrain([f], sp_model, 8, tmp_path / "none", text_field="title")


def test_pretrain_validation_split(tmp_path, sp_model, sp_tokenizer):
    docs = [f"document {i}: " + DOCS[i % len(DOCS)] for i in range(30)]
    f = write_jsonl(tmp_path / "d.jsonl", [{"data": t} for t in docs])
    L = 16
    m = prepare_pretrain([f], sp_model, L, tmp_path / "out", val_fraction=0.3, seed=1)
    sp = m["splits"]
    assert sp["val"]["documents"] > 0 and sp["train"]["documents"] > 0
    assert sp["train"]["documents"] + sp["val"]["documents"] == 30
    assert sp["val"]["blocks"] > 0
    flats = {s: np.asarray(load_prepared(tmp_path / "out", s)["input_ids"]).reshape(-1).tolist() for s in ("train", "val")}
    for s in flats:
        assert len(flats[s]) == sp[s]["blocks"] * L and sp[s]["tokens"] - len(flats[s]) == sp[s]["dropped_tail_tokens"] < L
    # each split is its documents in order, each + <_end>, only a tail cut off
    pos, members = {"train": 0, "val": 0}, {"train": 0, "val": 0}
    for t in docs:
        e = [*sp_tokenizer.encode(t), END]
        for s in ("train", "val"):
            if flats[s][pos[s]:pos[s] + len(e)] == e:
                pos[s] += len(e)
                members[s] += 1
                break
        else:  # in the dropped tail of a split
            assert any(flats[s][pos[s]:] == e[:len(flats[s]) - pos[s]] for s in flats)
            for s in flats:
                if flats[s][pos[s]:] == e[:len(flats[s]) - pos[s]]:
                    pos[s] = len(flats[s])
                    break
    assert pos == {s: len(flats[s]) for s in flats}
    assert members["train"] <= sp["train"]["documents"] and members["val"] <= sp["val"]["documents"]
    # a validation split that was asked for is never empty
    tiny = prepare_pretrain([f], sp_model, L, tmp_path / "tiny", val_fraction=0.001, seed=1)
    assert tiny["splits"]["val"]["documents"] >= 1 and tiny["splits"]["train"]["documents"] >= 1
    # the split is seeded
    m2 = prepare_pretrain([f], sp_model, L, tmp_path / "again", val_fraction=0.3, seed=1, num_workers=2)
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "again") and m2["splits"] == sp


def test_pretrain_bad_lines_counted(tmp_path, sp_model):
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"data": DOCS[0]},         # 1
        "{oops",                   # 2 invalid_json
        b'{"data": "caf\xe9"}',    # 3 bad_encoding
        {"text": 3},               # 4 missing_field
        {"data": "   "},           # 5 empty_text
        "[1, 2]",                  # 6 missing_field (not an object)
        {"text": DOCS[1]},         # 7 "text" is the fallback field
    ])
    bad_txt = tmp_path / "latin1.txt"
    bad_txt.write_bytes("café".encode("latin-1"))
    m = prepare_pretrain([f, bad_txt], sp_model, 8, tmp_path / "out", val_fraction=0)
    sk = m["skipped"]
    assert {r: v["count"] for r, v in sk.items()} == {"invalid_json": 1, "bad_encoding": 2, "missing_field": 2,
                                                      "empty_text": 1}
    assert sk["invalid_json"]["first"][0].startswith(f"{f}:2")
    assert [x.split(": ")[0] for x in sk["missing_field"]["first"]] == [f"{f}:4", f"{f}:6"]
    assert sk["empty_text"]["first"][0].startswith(f"{f}:5")
    assert any(x.startswith(f"{f}:3") for x in sk["bad_encoding"]["first"])
    assert any(x.startswith(str(bad_txt)) for x in sk["bad_encoding"]["first"])
    assert m["splits"]["train"]["documents"] == 2 and m["skipped_total"] == 6


def test_pretrain_missing_input(tmp_path, sp_model, capsys):
    with pytest.raises(DataError, match="ghost.jsonl"):
        prepare_pretrain([tmp_path / "ghost.jsonl"], sp_model, 8, tmp_path / "out")
    rc, _, err = run_cli(["--mode", "pretrain", "--input", tmp_path / "ghost.jsonl", "--tokenizer", sp_model,
                          "--max-seq-len", 8, "--output", tmp_path / "out"], capsys)
    assert rc == 1 and "ghost.jsonl" in err
    rc, _, err = run_cli(["--mode", "pretrain", "--tokenizer", sp_model, "--max-seq-len", 8,
                          "--output", tmp_path / "out"], capsys)
    assert rc == 1 and "--input" in err


# ---- command line --------------------------------------------------------------------------------------
def test_cli_sft(tmp_path, sp_model, capsys):
    dj = data_json(tmp_path, {"a.jsonl": (short_records("a", 20) + ["{bad"], 1.5)})
    out = tmp_path / "out"
    rc, stdout, err = run_cli(["--data-json", dj, "--tokenizer", sp_model, "--max-seq-len", 48, "--num-samples", 7,
                               "--num-workers", 2, "--seed", 9, "--output", out], capsys)
    assert rc == 0, err
    assert "wrote 7 samples" in stdout and "invalid_json" in stdout
    d = load_prepared(out)
    assert d["input_ids"].shape == (7, 48) and d["manifest"]["seed"] == 9
    assert d["manifest"]["skipped"]["invalid_json"]["count"] >= 1
    # the same through the function: byte-identical
    prepare_sft(dj, sp_model, 48, tmp_path / "fn", num_samples=7, num_workers=1, seed=9)
    assert folder_bytes(out) == folder_bytes(tmp_path / "fn")
    rc, _, err = run_cli(["--tokenizer", sp_model, "--max-seq-len", 48, "--output", tmp_path / "x"], capsys)
    assert rc == 1 and "--data-json" in err


def test_cli_pretrain(tmp_path, sp_model, capsys):
    f = write_jsonl(tmp_path / "p.jsonl", [{"body": t} for t in DOCS * 4])
    txt = tmp_path / "t.txt"
    txt.write_text(DOCS[0], encoding="utf-8")
    out = tmp_path / "out"
    rc, stdout, err = run_cli(["--mode", "pretrain", "--input", f, txt, "--tokenizer", sp_model, "--max-seq-len", 16,
                               "--text-field", "body", "--val-fraction", 0.25, "--output", out], capsys)
    assert rc == 0, err
    assert "train" in stdout and "val" in stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["mode"] == "pretrain" and m["text_field"] == "body" and m["val_fraction"] == 0.25
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 21
    assert m["splits"]["val"]["documents"] >= 1
    for s in ("train", "val"):
        assert np.load(out / s / "input_ids.npy").shape == (m["splits"][s]["blocks"], 16)


# ---- the real data ------------------------------------------------------------------------------------
def test_shared_telechat_data(tmp_path):
    multi = shared_path("data", "sft", "telechat", "multi_turn_example.jsonl")
    demo = shared_path("data", "sft", "telechat2", "sft", "demo_multi.jsonl")
    tok_dir = shared_path("telechat-official", "12B")
    import telechat

    tok = telechat.load_tokenizer(tok_dir)
    dj = tmp_path / "data.json"
    dj.write_text(json.dumps({str(multi): 1, str(demo): 1}))
    m = prepare_sft(dj, tok_dir, 1024, tmp_path / "out", num_samples=50, num_workers=2)
    assert m["num_samples"] == 50 and m["skipped"].get("invalid_json") is None
    assert m["dialogues"] > 1900 and m["skipped_total"] + m["dialogues"] == 2000
    d = load_prepared(tmp_path / "out")
    user, bot, end, system = tok.user_id, tok.bot_id, tok.eos_id, tok.system_id
    assert m["special_ids"] == {"user": user, "bot": bot, "end": end, "system": system}
    corpus = multi.read_text(encoding="utf-8") + demo.read_text(encoding="utf-8")
    for s in range(0, 50, 7):
        ids_row, mask_row, seg_row = (np.asarray(d[k][s]).astype(np.int64) for k in ("input_ids", "loss_mask", "segment_ids"))
        assert (ids_row[seg_row == 0] == tok.pad_id).all() and (mask_row[seg_row == 0] == 0).all()
        ids, mask = ids_row[seg_row == 1].tolist(), mask_row[seg_row == 1].tolist()
        assert tok.id_to_token(ids[0]) in ("<_user>", "<_system>")
        assert tok.decode(ids[:1], skip_special_tokens=False).startswith(("<_user>", "<_system>"))
        assert ids[-1] == end and mask[-1] == 1
        state = "system" if ids[0] == system else None
        n_answers = 0
        for i, m_ in zip(ids, mask):
            if i == system:
                state = "system"
                assert m_ == 0
            elif i == user:
                state = "question"
                assert m_ == 1
            elif i == bot:
                assert state == "question"
                state = "answer"
                answer = []
                assert m_ == 1
            elif i == end:
                assert state == "answer" and m_ == 1
                n_answers += 1
                text = tok.decode(answer).strip()
                assert text[:8] in corpus, text[:40]
                state = "done"
            elif state == "answer":
                assert m_ == 1
                answer.append(i)
            else:
                assert state in ("system", "question") and m_ == 0
        assert n_answers == ids.count(bot) == ids.count(user) >= 1 and state == "done"

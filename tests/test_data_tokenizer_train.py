"""`telechat.data.tokenizer_train`: byte-level BPE with TeleChat's special tokens at fixed ids."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

import telechat
from telechat.chat import chat_format
from telechat.data import tokenizer_train as tt

ZH = """星辰语义大模型是由中国电信人工智能研究院研发训练的大语言模型。
今天天气很好，我们去公园散步吧。你好，世界！北京是中国的首都。
人工智能正在改变我们的生活方式，从语音助手到自动驾驶。
上海、广州和深圳都是中国的大城市，经济发展很快。
这家酒店的房间很干净，服务也很周到，早餐种类丰富，下次还会再来。
外卖送得很快，味道不错，就是有点咸。价格 35 元，性价比还可以。
"""
EN = """TeleChat is a bilingual large language model trained on Chinese and English text.
The quick brown fox jumps over the lazy dog 12345 times.
Large language models generate text one token at a time, using a key value cache.
Numbers like 2024 and 3.14159 are split into single digits.
The hotel room was clean and the staff were friendly; breakfast was good.
    Indented code: def f(x):\treturn x * 2  # with tabs and  double  spaces
"""
CORPUS = (ZH + EN) * 30

ROUND_TRIP = [
    "",
    "你好，世界！星辰语义大模型。",
    "The quick brown fox jumps over the lazy dog.",
    "Python 3.12 发布于 2023年10月2日, costs $0.00 — “quoted” ‘text’…",
    "👍🏽😀🎉 emoji 表情",
    "👨‍👩‍👧‍👦 family (ZWJ) 🏳️‍🌈 🧑🏻‍💻",
    "🇨🇳🇺🇸🇯🇵 flags",
    "𠀀𪚥𰻞𡈽 rare CJK 龘 齉",
    "a  \t\n\n  b",
    "  leading spaces",
    "trailing spaces   ",
    " ",
    "\n",
    "\r\n\r\nwindows\r\n",
    "\u3000全角空格\u3000\u00a0nbsp\u2009thin",
    "e\u0301 vs \u00e9, ｆｕｌｌｗｉｄｔｈ ①② ﬁ",  # would change under NFC/NFKC
    "\x00\x1b[0m control \x7f",
    "<_user partial <_bot > < _end>",
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("tok")
    corpus = _write(d / "corpus.txt", CORPUS)
    summary = tt.train_tokenizer([corpus], d / "out", vocab_size=800)
    return d / "out", summary


@pytest.fixture(scope="module")
def hf(trained):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(trained[0] / "tokenizer.json"))


@pytest.fixture(scope="module")
def auto(trained):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(trained[0]))


# ---- layout -----------------------------------------------------------------------------------------
def test_layout_constants():
    assert tt.SPECIAL_TOKENS == ("<_unk>", "<_start>", "<_end>", "<_pad>", "<_user>", "<_bot>", "<_system>")
    assert [tt.ID_LAYOUT[t] for t in tt.SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5, 6]
    assert tt.ID_LAYOUT["<reserve1>"] == 7 and tt.ID_LAYOUT["<reserve100>"] == 106
    assert len(tt.ALL_SPECIAL_TOKENS) == len(set(tt.ALL_SPECIAL_TOKENS)) == 107
    assert (tt.BYTE_OFFSET, tt.FIRST_MERGE_ID, tt.MIN_VOCAB_SIZE) == (107, 363, 363)


def test_fixed_special_ids_and_byte_alphabet(trained, hf):
    from tokenizers import pre_tokenizers

    out, summary = trained
    assert summary["vocab_size"] == hf.get_vocab_size() == 800
    for token, i in tt.ID_LAYOUT.items():
        assert hf.token_to_id(token) == i
    added = hf.get_added_tokens_decoder()
    assert sorted(added) == list(range(tt.BYTE_OFFSET))
    assert all(t.special and not t.normalized for t in added.values())
    alphabet = [hf.id_to_token(i) for i in range(tt.BYTE_OFFSET, tt.FIRST_MERGE_ID)]
    assert alphabet == sorted(pre_tokenizers.ByteLevel.alphabet())
    assert len(hf.id_to_token(tt.FIRST_MERGE_ID)) == 2  # the first merge: two byte symbols


def test_layout_does_not_depend_on_vocab_size(tmp_path):
    from tokenizers import Tokenizer

    corpus = _write(tmp_path / "c.txt", CORPUS)
    tt.train_tokenizer([corpus], tmp_path / "small", vocab_size=tt.MIN_VOCAB_SIZE + 10)
    small = Tokenizer.from_file(str(tmp_path / "small" / "tokenizer.json"))
    assert small.get_vocab_size() == tt.MIN_VOCAB_SIZE + 10
    assert all(small.token_to_id(t) == i for t, i in tt.ID_LAYOUT.items())


def test_files_and_configs(trained):
    out, _ = trained
    assert sorted(p.name for p in out.iterdir()) == sorted(tt.TOKENIZER_FILES)
    cfg = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"], cfg["unk_token"]) == \
        ("<_start>", "<_end>", "<_pad>", "<_unk>")
    assert cfg["additional_special_tokens"] == ["<_user>", "<_bot>", "<_system>"]
    assert cfg["add_bos_token"] is False and cfg["add_eos_token"] is False
    assert cfg["clean_up_tokenization_spaces"] is False
    assert cfg["model_max_length"] == tt.DEFAULT_MODEL_MAX_LENGTH
    assert "chat_template" not in cfg  # the TeleChat ids format, not a template
    smap = json.loads((out / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert smap == tt.special_tokens_map()
    spec = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    assert spec["normalizer"] is None
    assert [p["type"] for p in spec["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert spec["pre_tokenizer"]["pretokenizers"][0]["individual_digits"] is True
    assert spec["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] is False
    assert spec["decoder"]["type"] == "ByteLevel"


# ---- encoding ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_exact(hf, trained, text):
    ids = hf.encode(text, add_special_tokens=False).ids
    assert hf.decode(ids, skip_special_tokens=False) == text
    assert hf.decode(ids) == text  # no special tokens inside: skipping changes nothing
    tok = telechat.load_tokenizer(trained[0])
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text


def test_round_trip_corpus_lines(hf):
    for line in CORPUS.splitlines(keepends=True)[:20]:
        assert hf.decode(hf.encode(line).ids) == line


def test_digits_split(hf):
    enc = hf.encode("12345")
    assert enc.tokens == ["1", "2", "3", "4", "5"]
    assert len(hf.encode("12345").ids) == 5
    toks = hf.encode("2024年3.14").tokens
    assert [t for t in toks if set(t) & set("0123456789")] == ["2", "0", "2", "4", "3", "1", "4"]
    ids = hf.encode("call 13800138000 now").ids
    assert sum(hf.decode([i]) in "0123456789" for i in ids) == 11


def test_special_tokens_never_split(hf):
    assert hf.encode("<_user>").ids == [4]
    for token, i in tt.ID_LAYOUT.items():
        assert hf.encode(token).ids == [i]
    ids = hf.encode("<_user>你好<_bot>Hello!<_end><reserve7>").ids
    assert ids[0] == 4 and 5 in ids and ids[-2:] == [2, tt.ID_LAYOUT["<reserve7>"]]
    assert hf.decode(ids, skip_special_tokens=True) == "你好Hello!"
    assert hf.decode(ids, skip_special_tokens=False) == "<_user>你好<_bot>Hello!<_end><reserve7>"
    spaced = "x <_user> y"
    ids = hf.encode(spaced).ids
    assert 4 in ids and hf.decode(ids, skip_special_tokens=False) == spaced  # spaces around kept


# ---- loaders ----------------------------------------------------------------------------------------
def test_load_tokenizer_ids_and_chat(trained):
    tok = telechat.load_tokenizer(trained[0])
    assert tok.kind == "hf" and len(tok) == 800
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert (tok.user_id, tok.bot_id, tok.system_id) == (4, 5, 6)
    assert set(range(tt.BYTE_OFFSET)) <= tok.special_ids
    assert chat_format(tok) == "telechat"
    q, a = "今天天气怎么样？", "The weather is fine 😀"
    ids = telechat.build_chat_ids(tok, "再见", history=[{"role": "user", "content": q}, {"role": "bot", "content": a}])
    assert ids == [4, *tok.encode(q), 5, *tok.encode(a), 2, 4, *tok.encode("再见"), 5]
    assert tok.decode(ids) == q + a + "再见"
    sys_ids = telechat.build_chat_ids(tok, "hi", history=[{"role": "system", "content": "be brief"}])
    assert sys_ids[0] == 6 and sys_ids[-1] == 5


def test_autotokenizer_matches_tokenizers(auto, hf):
    assert (auto.unk_token_id, auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (0, 1, 2, 3)
    assert auto.convert_tokens_to_ids(["<_user>", "<_bot>", "<_system>"]) == [4, 5, 6]
    assert {"<_user>", "<_bot>", "<_system>"} <= set(auto.all_special_tokens)
    assert len(auto) == 800
    for text in ROUND_TRIP + ["<_user>你好<_bot>Hi 12345<_end>"]:
        ids = hf.encode(text).ids
        assert auto.encode(text, add_special_tokens=False) == ids
        assert auto(text)["input_ids"] == ids  # no BOS/EOS added
        assert auto.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
        assert auto.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert auto.decode(auto.encode("a  \t\n\n  b ,  . !")) == "a  \t\n\n  b ,  . !"  # no space clean-up


# ---- input reading ----------------------------------------------------------------------------------
def test_jsonl_text_fields_and_gzip(tmp_path):
    ptd = tmp_path / "ptd.jsonl"  # TeleChat-PTD style
    ptd.write_text("".join(json.dumps({"data": line}, ensure_ascii=False) + "\n" for line in CORPUS.splitlines()),
                   encoding="utf-8")
    texts = tmp_path / "texts.jsonl.gz"
    with gzip.open(texts, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "hello 世界", "data": "not this"}) + "\n")
        f.write("not json\n")
        f.write(json.dumps({"other": 1}) + "\n")
        f.write("\n")
        f.write(json.dumps({"content": "fallback content"}) + "\n")
    stats = tt._new_stats()
    got = list(tt.iter_texts([texts], stats=stats))
    assert got == ["hello 世界", "fallback content"]
    assert (stats["lines"], stats["skipped_records"]) == (2, 2)
    custom = _write(tmp_path / "custom.jsonl", json.dumps({"body": "x", "text": "y"}) + "\n")
    assert list(tt.iter_texts([custom], text_field="body")) == ["x"]

    summary = tt.train_tokenizer([ptd, texts], tmp_path / "out", vocab_size=500)
    assert summary["files"] == 2 and summary["skipped_records"] == 2
    assert summary["lines"] == len(CORPUS.splitlines()) + 2
    assert telechat.load_tokenizer(tmp_path / "out").user_id == 4


def test_invalid_utf8_lines_skipped_and_counted(tmp_path):
    data = (CORPUS.encode("utf-8") + b"bad \xff\xfe line\n" + "好".encode("utf-8")[:2] + b"\n"
            + b"\xef\xbb\xbfa BOM inside is text\n" + "最后一行".encode("utf-8")[:-1])  # ends inside a character
    f = tmp_path / "mixed.txt"
    f.write_bytes(data)
    summary = tt.train_tokenizer([f], tmp_path / "out", vocab_size=600)
    assert summary["skipped_invalid_utf8"] == 3
    assert summary["lines"] == len(CORPUS.splitlines()) + 1  # only the BOM line is added
    assert summary["bytes"] == len(data)
    assert summary["vocab_size"] == 600 and summary["seconds"] >= 0


def test_bom_stripped_and_long_lines_read_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(tt, "_PIECE_BYTES", 7)  # pieces that cut 3-byte characters
    line = "中文English混合😀文本" * 5 + "\n"
    f = tmp_path / "long.txt"
    f.write_bytes(b"\xef\xbb\xbf" + (line * 3).encode("utf-8"))
    stats = tt._new_stats()
    assert "".join(tt.iter_texts([f], stats=stats)) == line * 3
    assert stats["skipped_invalid_utf8"] == 0 and stats["bytes"] == f.stat().st_size


def test_complete_utf8_len():
    for text in ["abc", "中", "é", "😀", "a中😀"]:
        b = text.encode("utf-8")
        for cut in range(len(b) + 1):
            n = tt._complete_utf8_len(b[:cut])
            b[:n].decode("utf-8")  # complete
            assert cut - n < 4 and len(b[:n].decode("utf-8")) == len(b[:cut].decode("utf-8", errors="ignore"))


# ---- bad inputs and the output folder ---------------------------------------------------------------
def test_missing_input_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        tt.train_tokenizer([_write(tmp_path / "ok.txt", CORPUS), missing], tmp_path / "out", vocab_size=500)
    with pytest.raises(ValueError, match="nope.txt"):  # also a ValueError, so the CLI reports it cleanly
        tt.train_tokenizer([missing], tmp_path / "out", vocab_size=500)
    with pytest.raises(ValueError, match="no input files"):
        tt.train_tokenizer([], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("vocab_size", [0, 300, tt.MIN_VOCAB_SIZE - 1, "1000", 1000.0])
def test_vocab_size_too_small(tmp_path, vocab_size):
    with pytest.raises(ValueError, match=str(tt.MIN_VOCAB_SIZE)):
        tt.train_tokenizer([_write(tmp_path / "c.txt", CORPUS)], tmp_path / "out", vocab_size=vocab_size)


def test_bad_min_frequency_and_empty_input(tmp_path):
    corpus = _write(tmp_path / "c.txt", CORPUS)
    with pytest.raises(ValueError, match="min_frequency"):
        tt.train_tokenizer([corpus], tmp_path / "out", vocab_size=500, min_frequency=0)
    with pytest.raises(ValueError, match="no text"):
        tt.train_tokenizer([_write(tmp_path / "empty.txt", "")], tmp_path / "out", vocab_size=500)
    assert not (tmp_path / "out").exists()


def test_output_folder_replaced_or_refused(tmp_path):
    corpus = _write(tmp_path / "c.txt", CORPUS)
    out = tmp_path / "out"
    out.mkdir()  # empty: fine
    tt.train_tokenizer([corpus], out, vocab_size=500)
    tt.train_tokenizer([corpus], out, vocab_size=600)  # an earlier tokenizer: replaced
    assert json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"].__len__() == 600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "out"]  # no temporary siblings left

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="config.json"):
        tt.train_tokenizer([corpus], ckpt, vocab_size=500)
    with pytest.raises(ValueError, match="not a folder"):
        tt.train_tokenizer([corpus], corpus, vocab_size=500)
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json"]
    assert corpus.read_text(encoding="utf-8") == CORPUS


@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_output_gets_the_umask_modes_and_killed_runs_are_cleaned(tmp_path, umask, dir_mode, file_mode):
    """The folder is made with mkdir's modes, not mkdtemp's 0700; a killed run's temporary is removed."""
    import os
    import stat
    import subprocess

    from telechat.checkpoint import temp_name

    corpus = _write(tmp_path / "c.txt", CORPUS)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / temp_name("out").replace(f".{os.getpid()}.", f".{dead.pid}.", 1)
    stale.mkdir()
    (stale / "tokenizer.json").write_text("partial")
    old = os.umask(umask)
    try:
        out = tt.train_tokenizer([corpus], tmp_path / "out", vocab_size=500)
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {
        n: file_mode for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "out"]


def test_official_12b_has_the_same_special_names():
    """Our names are the official 12B SentencePiece pieces (ids differ: ours are packed at the front)."""
    from conftest import shared_path

    sp = telechat.load_tokenizer(shared_path("telechat-official", "12B", "tokenizer.model"))
    assert all(sp.token_to_id(t) is not None for t in tt.ALL_SPECIAL_TOKENS)
    assert [sp.token_to_id(t) for t in ("<_unk>", "<_start>", "<_end>", "<_pad>", "<_user>", "<_bot>", "<_system>")] \
        == [0, 1, 2, 3, 20, 21, 22]
    assert sp.token_to_id("<reserve1>") == 23 and sp.token_to_id("<reserve100>") == 122

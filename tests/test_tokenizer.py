"""Tokenizers (spec section 4): SentencePiece (12B/1B), byte-level BPE tokenizer.json (7B), streaming decode."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import telechat
from telechat import Tokenizer, TokenizerError, load_tokenizer
from telechat.tokenizer import StreamDecoder

from conftest import TEXT, shared_path

# Texts the small SentencePiece fixture reproduces exactly (its default nmt_nfkc normalizer maps
# full-width punctuation to ASCII and collapses whitespace runs, so those are left to the real model).
SP_ROUND_TRIP = [
    "今天天气很好我们去公园散步吧",
    "星辰语义大模型是由中国电信人工智能研究院研发训练的大语言模型",
    "The quick brown fox jumps over the lazy dog",
    "Hello world",
    "0123456789 3.14159 2024",
    "😀👍🎉",
    "䶵𠀋",
    "中文 mixed with English 和 12 个数字 😀",
    "Zebra xylophone qwerty",  # letters barely seen in training: byte fallback
]
# Needs byte-fallback pieces in every tokenizer we test (emoji, CJK extension A/B, rare symbols).
STREAM_TEXT = "你好😀世界，䶵𠀋 abc 12 🎉🎉 naïve café ☃ 𝔘𝔫𝔦"


def real12b_folder() -> Path:
    return shared_path("telechat-official", "12B", "tokenizer.model").parent


@pytest.fixture(scope="module")
def real_tok() -> Tokenizer:
    return load_tokenizer(real12b_folder())


@pytest.fixture(scope="module")
def hf_tok(hf_tokenizer_json) -> Tokenizer:
    return load_tokenizer(hf_tokenizer_json)


def stream_pieces(tok: Tokenizer, ids: list[int]) -> list[str]:
    dec = StreamDecoder(tok)
    parts = [dec.push(i) for i in ids]
    parts.append(dec.flush())
    assert dec.text == "".join(parts)
    return parts


# ---- SentencePiece fixture -----------------------------------------------------------------------
def test_sp_fixture_special_ids(sp_tokenizer):
    t = sp_tokenizer
    assert t.kind == "sentencepiece"
    assert (t.unk_id, t.bos_id, t.eos_id, t.pad_id) == (0, 1, 2, 3)
    assert (t.user_id, t.bot_id, t.system_id) == (4, 5, 6)
    assert {0, 1, 2, 3, 4, 5, 6} <= t.special_ids
    assert t.token_to_id("<_user>") == 4 and t.id_to_token(5) == "<_bot>"
    assert t.token_to_id("<definitely-not-a-piece>") is None
    assert t.id_to_token(10**6) is None
    assert len(t) == t.vocab_size == 400
    # No byte piece counts as special (they carry text).
    assert not any(t.sp.is_byte(i) for i in t.special_ids)


def test_sp_fixture_no_bos_eos_added(sp_tokenizer):
    ids = sp_tokenizer.encode("你好")
    assert ids and ids[0] != 1 and ids[-1] != 2
    assert sp_tokenizer("你好") == {"input_ids": ids}


@pytest.mark.parametrize("text", ["你好", "Hello world", "12345", "😀", "TeleChat 星辰"])
def test_sp_fixture_dummy_prefix(sp_tokenizer, text):
    ids = sp_tokenizer.encode(text)
    assert sp_tokenizer.id_to_token(ids[0]).startswith("▁")


@pytest.mark.parametrize("text", SP_ROUND_TRIP)
def test_sp_fixture_round_trip(sp_tokenizer, text):
    ids = sp_tokenizer.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert sp_tokenizer.decode(ids) == text


def test_sp_fixture_uses_byte_fallback(sp_tokenizer):
    ids = sp_tokenizer.encode("䶵𠀋😀")
    assert sum(sp_tokenizer.sp.is_byte(i) for i in ids) >= 11  # 3 + 4 + 4 bytes
    assert 0 not in ids  # never <_unk>


def test_sp_fixture_decode_skips_special(sp_tokenizer):
    t = sp_tokenizer
    hi = t.encode("hi there")
    ids = [1, t.user_id, *hi, t.bot_id, *t.encode("你好"), t.eos_id, t.pad_id, t.system_id, 0]
    # Specials vanish; the second segment's dummy-prefix "▁" is a space mid-text, as in SentencePiece.
    assert t.decode(ids) == "hi there 你好" == t.decode([*hi, *t.encode("你好")])
    assert "<_user>" in t.decode(ids, skip_special_tokens=False)
    # Ids outside the vocabulary (the model may have a larger embedding) are dropped, not an error.
    assert t.decode([*hi, 450, 511]) == "hi there"


# ---- the real 12B tokenizer ----------------------------------------------------------------------
def test_real_12b_ids(real_tok):
    t = real_tok
    assert t.kind == "sentencepiece" and t.vocab_size == 120000 and len(t) == 120000
    assert (t.user_id, t.bot_id, t.system_id) == (20, 21, 22)
    assert (t.eos_id, t.pad_id, t.unk_id, t.bos_id) == (2, 3, 0, 1)
    assert t.id_to_token(20) == "<_user>" and t.id_to_token(21) == "<_bot>" and t.id_to_token(2) == "<_end>"
    assert t.id_to_token(23) == "<reserve1>" and t.id_to_token(122) == "<reserve100>"
    assert t.sp.is_byte(123) and t.sp.is_byte(378) and not t.sp.is_byte(379)
    for k in range(10):
        assert t.id_to_token(4 + k) == str(k)
    assert {0, 1, 2, 3, 20, 21, 22, 23, 122} <= t.special_ids
    assert not (set(range(4, 14)) & t.special_ids)  # digits are text


def test_real_12b_digits_split(real_tok):
    ids = real_tok.encode("0123456789")
    assert ids[-10:] == list(range(4, 14))
    assert real_tok.id_to_token(ids[0]).startswith("▁")
    ids = real_tok.encode("价格是2024元")
    assert [i for i in ids if 4 <= i <= 13] == [6, 4, 6, 8]


def test_real_12b_ids_from_generation_config(tmp_path):
    """load_tokenizer(folder) reads user/bot/eos ids from generation_config.json when present."""
    src = real12b_folder()
    t = load_tokenizer(src)
    gen = json.loads((src / "generation_config.json").read_text())
    assert (t.user_id, t.bot_id, t.eos_id) == (gen["user_token_id"], gen["bot_token_id"], gen["eos_token_id"])
    # Prove the file is read: change the ids and they follow.
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(src / name, tmp_path / name)
    (tmp_path / "generation_config.json").write_text(json.dumps({**gen, "user_token_id": 23, "bot_token_id": 24,
                                                                 "eos_token_id": 25}))
    t2 = load_tokenizer(tmp_path)
    assert (t2.user_id, t2.bot_id, t2.eos_id) == (23, 24, 25)
    assert {23, 24, 25} <= t2.special_ids
    # Without generation_config.json the pieces give the same ids as the official file.
    (tmp_path / "generation_config.json").unlink()
    t3 = load_tokenizer(tmp_path)
    assert (t3.user_id, t3.bot_id, t3.eos_id, t3.pad_id) == (20, 21, 2, 3)


REAL_ROUND_TRIP = [
    "你好，世界！北京是中国的首都。",
    "The quick brown fox jumps over the lazy dog.",
    "1234567890 3.14159",
    "😀👍🎉",
    "䶵𠀋",
    "a  b   c",
    "line1\n\nline2\n",
    "tab\there   and    spaces",
    "def f(x):\n    return x  # 注释\n",
    "星辰语义大模型 TeleChat，由中国电信研发。",
]


@pytest.mark.parametrize("text", REAL_ROUND_TRIP)
def test_real_12b_round_trip(real_tok, text):
    ids = real_tok.encode(text)
    assert real_tok.id_to_token(ids[0]).startswith("▁")
    assert real_tok.decode(ids) == text


def test_real_12b_decode_skips_special(real_tok):
    t = real_tok
    ids = [20, *t.encode("你好"), 21, *t.encode("我是星辰"), 2, 3, 1, 22, 50]  # 50 is <reserve28>
    assert t.decode(ids) == "你好 我是星辰" == t.decode([*t.encode("你好"), *t.encode("我是星辰")])


# ---- tokenizer.json (7B style) -------------------------------------------------------------------
def test_hf_special_ids(hf_tok, hf_tokenizer_json):
    from tokenizers import Tokenizer as HF

    raw = HF.from_file(str(hf_tokenizer_json))
    assert hf_tok.kind == "hf"
    assert hf_tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    assert hf_tok.user_id == raw.token_to_id("<_user>") is not None
    assert hf_tok.bot_id == raw.token_to_id("<_bot>") is not None
    assert hf_tok.eos_id == raw.token_to_id("<_end>") is not None  # tokenizer_config eos_token
    assert hf_tok.bos_id == raw.token_to_id("<_start>") is not None
    assert hf_tok.pad_id == raw.token_to_id("<pad>") == 3  # tokenizer_config pad_token
    assert hf_tok.unk_id == raw.token_to_id("<unk>") == 0
    assert hf_tok.system_id is None
    assert {hf_tok.user_id, hf_tok.bot_id, hf_tok.eos_id, hf_tok.bos_id, 3} <= hf_tok.special_ids


def test_hf_ids_follow_tokenizer_config(hf_tokenizer_json, tmp_path):
    shutil.copyfile(hf_tokenizer_json, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<unk>"}))
    t = load_tokenizer(tmp_path)
    assert t.eos_id == t.token_to_id("</s>") and t.pad_id == 0
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7, "user_token_id": 8}))
    t = load_tokenizer(tmp_path)
    assert t.eos_id == 7 and t.user_id == 8


HF_ROUND_TRIP = SP_ROUND_TRIP + ["a  b   c\n\n\tx ", "  leading and trailing  ", "你好，世界！", TEXT]


@pytest.mark.parametrize("text", HF_ROUND_TRIP)
def test_hf_round_trip(hf_tok, text):
    ids = hf_tok.encode(text)
    assert hf_tok.decode(ids) == text


def test_hf_no_specials_added_and_decode_skips_them(hf_tok):
    ids = hf_tok.encode("hello")
    assert not set(ids) & hf_tok.special_ids
    wrapped = [hf_tok.bos_id, hf_tok.user_id, *ids, hf_tok.bot_id, *hf_tok.encode("世界"), hf_tok.eos_id, 3]
    assert hf_tok.decode(wrapped) == "hello世界"


# ---- StreamDecoder -------------------------------------------------------------------------------
def _check_stream(tok: Tokenizer, text: str):
    ids = tok.encode(text)
    # The text really needs multi-token characters: decoding some single token alone is broken.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    parts = stream_pieces(tok, ids)
    for p in parts:
        assert "\ufffd" not in p
    assert "".join(parts) == tok.decode(ids)
    return parts


def test_stream_decoder_sp_fixture(sp_tokenizer):
    parts = _check_stream(sp_tokenizer, STREAM_TEXT)
    assert sum(1 for p in parts if p) > 5  # it really streams, not one chunk at the end
    _check_stream(sp_tokenizer, "😀")
    _check_stream(sp_tokenizer, "a 😀 b 䶵𠀋 c")


def test_stream_decoder_hf(hf_tok):
    parts = _check_stream(hf_tok, STREAM_TEXT)
    assert sum(1 for p in parts if p) > 5
    _check_stream(hf_tok, "🎉🎉🎉")


def test_stream_decoder_real_12b(real_tok):
    _check_stream(real_tok, STREAM_TEXT + " 𠀋𠀌𠀍")
    _check_stream(real_tok, TEXT + "\n䶵𠀋 ok")


def test_stream_decoder_skips_special_ids(sp_tokenizer):
    t = sp_tokenizer
    ids = [t.user_id, *t.encode("hi 😀"), t.bot_id, *t.encode("ok"), t.eos_id]
    parts = stream_pieces(t, ids)
    assert "".join(parts) == t.decode(ids) == "hi 😀 ok"
    assert all("\ufffd" not in p and "<_" not in p for p in parts)


def test_stream_decoder_incomplete_tail_flushed(sp_tokenizer):
    t = sp_tokenizer
    ids = t.encode("ab😀")[:-2]  # cut inside the emoji's bytes
    dec = StreamDecoder(t)
    out = "".join(dec.push(i) for i in ids)
    assert "\ufffd" not in out and out == "ab"
    tail = dec.flush()
    assert out + tail == t.decode(ids)


# ---- errors --------------------------------------------------------------------------------------
def test_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(TokenizerError, match="nope"):
        load_tokenizer(missing)


def test_folder_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(e.value) and "tokenizer" in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        load_tokenizer(tmp_path / "tokenizer.model")
    with pytest.raises(TokenizerError, match="nothere.model"):
        Tokenizer(tmp_path / "nothere.model")
    with pytest.raises(TokenizerError, match="vocab.txt"):
        Tokenizer(tmp_path / "vocab.txt")


@pytest.mark.parametrize("content", [b"garbage" * 100, b"", bytes(range(256)) * 4])
def test_garbage_sentencepiece_model(tmp_path, content):
    (tmp_path / "tokenizer.model").write_bytes(content)
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.model") in str(e.value)


def test_garbage_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_bad_generation_config_named(sp_model, tmp_path):
    shutil.copyfile(sp_model, tmp_path / "tokenizer.model")
    (tmp_path / "generation_config.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="generation_config.json"):
        load_tokenizer(tmp_path)


# ---- save ----------------------------------------------------------------------------------------
def _same(a: Tokenizer, b: Tokenizer, texts):
    assert a.kind == b.kind and a.vocab_size == b.vocab_size
    assert (a.unk_id, a.bos_id, a.eos_id, a.pad_id, a.user_id, a.bot_id, a.system_id) == \
           (b.unk_id, b.bos_id, b.eos_id, b.pad_id, b.user_id, b.bot_id, b.system_id)
    assert a.special_ids == b.special_ids
    for text in texts:
        assert a.encode(text) == b.encode(text)
        assert b.decode(b.encode(text)) == a.decode(a.encode(text))


def test_save_sentencepiece(sp_tokenizer, sp_model, tmp_path):
    sp_tokenizer.save(tmp_path / "out")
    saved = tmp_path / "out" / "tokenizer.model"
    assert saved.read_bytes() == sp_model.read_bytes()
    _same(sp_tokenizer, load_tokenizer(tmp_path / "out"), SP_ROUND_TRIP)
    sp_tokenizer.save(sp_model.parent)  # saving onto itself is harmless
    assert sp_model.read_bytes() == saved.read_bytes()


def test_save_hf(hf_tok, hf_tokenizer_json, tmp_path):
    hf_tok.save(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == hf_tokenizer_json.read_bytes()
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == "<_end>"
    _same(hf_tok, load_tokenizer(tmp_path), HF_ROUND_TRIP)


def test_save_real_12b(real_tok, tmp_path):
    real_tok.save(tmp_path)
    src = real12b_folder()
    for name in ("tokenizer.model", "tokenizer_config.json", "specail_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (src / name).read_bytes(), name
    _same(real_tok, load_tokenizer(tmp_path), REAL_ROUND_TRIP)


def test_save_writes_tokenizer_config_when_given(sp_model, tmp_path):
    t = Tokenizer(sp_model, tokenizer_config={"add_bos_token": False})
    t.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == {"add_bos_token": False}


def test_top_level_api_exports():
    assert telechat.load_tokenizer is load_tokenizer and telechat.Tokenizer is Tokenizer

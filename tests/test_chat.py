"""Chat format (spec section 4): prompt ids, truncation, system turn, chat()/stream, published calling convention."""
from __future__ import annotations

import sys

import pytest
import torch

import telechat
from telechat import build_chat_ids
from telechat.chat import chat as chat_fn, normalize_history

from conftest import TEXT

U, B, E, S = 4, 5, 2, 6  # <_user>, <_bot>, <_end>, <_system> in the SentencePiece fixture


def enc(tok, text):
    return tok.encode(text)


def turn_ids(tok, q, a):
    return [U, *enc(tok, q), B, *enc(tok, a), E]


# ---- build_chat_ids ------------------------------------------------------------------------------
def test_single_question(sp_tokenizer):
    assert build_chat_ids(sp_tokenizer, "你好") == [U, *enc(sp_tokenizer, "你好"), B]


def test_layout_multi_turn(sp_tokenizer):
    t = sp_tokenizer
    history = [{"role": "user", "content": "q1 你好"}, {"role": "bot", "content": "a1 世界"},
               {"role": "user", "content": "q2"}, {"role": "bot", "content": "a2 😀"}]
    ids = build_chat_ids(t, "q3 最后", history)
    expected = turn_ids(t, "q1 你好", "a1 世界") + turn_ids(t, "q2", "a2 😀") + [U, *enc(t, "q3 最后"), B]
    assert ids == expected
    # Each segment is tokenized alone: not the same as tokenizing the joined text.
    assert ids.count(U) == 3 and ids.count(B) == 3 and ids.count(E) == 2
    assert 1 not in ids  # no BOS
    # The history list is not modified.
    assert len(history) == 4 and history[1]["role"] == "bot"


def test_assistant_role_is_bot(sp_tokenizer):
    h_bot = [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]
    h_assistant = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert build_chat_ids(sp_tokenizer, "x", h_assistant) == build_chat_ids(sp_tokenizer, "x", h_bot)
    assert normalize_history(h_assistant)[1]["role"] == "bot"


def test_history_with_unanswered_question_and_leading_bot(sp_tokenizer):
    t = sp_tokenizer
    ids = build_chat_ids(t, "q2", [{"role": "user", "content": "q1"}])
    assert ids == [U, *enc(t, "q1"), U, *enc(t, "q2"), B]
    ids = build_chat_ids(t, "q", [{"role": "bot", "content": "welcome"}])
    assert ids == [B, *enc(t, "welcome"), E, U, *enc(t, "q"), B]


@pytest.mark.parametrize("history", [
    [{"role": "robot", "content": "x"}],
    [{"role": "User", "content": "x"}],
    [{"role": "user"}],
    [{"content": "x"}],
    ["just a string"],
    [("user", "x")],
    [{"role": "user", "content": "q"}, {"role": "system", "content": "late system"}],
])
def test_bad_history_raises(sp_tokenizer, history):
    with pytest.raises(ValueError):
        build_chat_ids(sp_tokenizer, "q", history)


def test_bad_role_message_names_role(sp_tokenizer):
    with pytest.raises(ValueError, match="robot"):
        build_chat_ids(sp_tokenizer, "q", [{"role": "robot", "content": "x"}])


def test_system_message(sp_tokenizer):
    t = sp_tokenizer
    history = [{"role": "system", "content": "你是一个助手"}, {"role": "user", "content": "q1"},
               {"role": "assistant", "content": "a1"}]
    ids = build_chat_ids(t, "q2", history)
    assert ids == [S, *enc(t, "你是一个助手"), *turn_ids(t, "q1", "a1"), U, *enc(t, "q2"), B]
    ids = build_chat_ids(t, "q", [{"role": "system", "content": "sys"}])
    assert ids == [S, *enc(t, "sys"), U, *enc(t, "q"), B]


def test_system_message_without_system_token(hf_tokenizer_json):
    tok = telechat.load_tokenizer(hf_tokenizer_json)
    assert tok.system_id is None
    with pytest.raises(ValueError, match="system"):
        build_chat_ids(tok, "q", [{"role": "system", "content": "sys"}])


def test_hf_tokenizer_layout(hf_tokenizer_json):
    tok = telechat.load_tokenizer(hf_tokenizer_json)
    ids = build_chat_ids(tok, "q2", [{"role": "user", "content": "q1"}, {"role": "bot", "content": "a1"}])
    assert ids == [tok.user_id, *tok.encode("q1"), tok.bot_id, *tok.encode("a1"), tok.eos_id,
                   tok.user_id, *tok.encode("q2"), tok.bot_id]


# ---- truncation ----------------------------------------------------------------------------------
def _history(n):
    h = []
    for i in range(n):
        h += [{"role": "user", "content": f"问题 {i} question"}, {"role": "bot", "content": f"回答 {i} answer 😀"}]
    return h


def test_long_question_left_truncated(sp_tokenizer):
    t = sp_tokenizer
    q = enc(t, TEXT)
    assert len(q) > 50
    for max_length in (3, 4, 10, 50):
        ids = build_chat_ids(t, TEXT, _history(3), max_length=max_length)
        assert ids == [U, *q[len(q) - (max_length - 2):], B]
        assert len(ids) == max_length


def test_max_length_too_small(sp_tokenizer):
    with pytest.raises(ValueError):
        build_chat_ids(sp_tokenizer, "q", max_length=2)


def test_keeps_newest_whole_turns(sp_tokenizer):
    t = sp_tokenizer
    history = _history(4)
    turns = [turn_ids(t, history[2 * i]["content"], history[2 * i + 1]["content"]) for i in range(4)]
    prompt = [U, *enc(t, "新问题"), B]
    full = build_chat_ids(t, "新问题", history)
    assert full == [x for turn in turns for x in turn] + prompt
    # Exactly the last two turns fit (and one token less than three turns).
    fit2 = len(prompt) + len(turns[3]) + len(turns[2])
    for max_length in (fit2, fit2 + len(turns[1]) - 1):
        ids = build_chat_ids(t, "新问题", history, max_length=max_length)
        assert ids == turns[2] + turns[3] + prompt
    # Just the question.
    assert build_chat_ids(t, "新问题", history, max_length=len(prompt) + len(turns[3]) - 1) == prompt
    # Everything.
    assert build_chat_ids(t, "新问题", history, max_length=len(full)) == full
    assert build_chat_ids(t, "新问题", history, max_length=10**6) == full


def test_turns_kept_are_contiguous(sp_tokenizer):
    """A long middle turn that does not fit stops the scan: older short turns are not kept."""
    t = sp_tokenizer
    history = [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"},
               {"role": "user", "content": TEXT}, {"role": "bot", "content": TEXT},
               {"role": "user", "content": "c"}, {"role": "bot", "content": "d"}]
    prompt = [U, *enc(t, "q"), B]
    newest, oldest = turn_ids(t, "c", "d"), turn_ids(t, "a", "b")
    ids = build_chat_ids(t, "q", history, max_length=len(prompt) + len(newest) + len(oldest) + 5)
    assert ids == newest + prompt


@pytest.mark.parametrize("with_system", [False, True])
def test_truncation_bounds(sp_tokenizer, with_system):
    t = sp_tokenizer
    history = ([{"role": "system", "content": "系统"}] if with_system else []) + _history(5)
    full = build_chat_ids(t, "最后的问题", history)
    prompt = [U, *enc(t, "最后的问题"), B]
    for max_length in range(3, len(full) + 3):
        ids = build_chat_ids(t, "最后的问题", history, max_length=max_length)
        assert len(ids) <= max_length
        assert ids[-1] == B and ids.count(U) >= 1
        if max_length >= len(prompt):
            assert ids[-len(prompt):] == prompt  # the whole question is kept once it fits
            if not with_system:
                assert full[len(full) - len(ids):] == ids  # newest turns: a suffix of the full prompt
        if max_length >= len(full):
            assert ids == full


# ---- chat with the tiny model --------------------------------------------------------------------
def test_chat_returns_answer_and_history(tiny):
    history = []
    answer, h = tiny.chat("你好", history, max_new_tokens=6)
    assert isinstance(answer, str) and answer
    assert h is history
    assert h == [{"role": "user", "content": "你好"}, {"role": "bot", "content": answer}]
    answer2, h2 = tiny.chat("再来", h, max_new_tokens=6)
    assert h2 is history and len(history) == 4
    assert history[2:] == [{"role": "user", "content": "再来"}, {"role": "bot", "content": answer2}]


def test_chat_answer_is_greedy_continuation(tiny):
    """The answer is the decoded greedy continuation of the chat prompt (up to a stop id)."""
    ids = tiny.encode_chat("hello there")
    out = tiny.generate(ids, max_new_tokens=6, eos_token_id=[tiny.tokenizer.eos_id, tiny.tokenizer.user_id])
    new = out[0, len(ids):].tolist()
    stops = {tiny.tokenizer.eos_id, tiny.tokenizer.user_id}
    cut = next((i for i, x in enumerate(new) if x in stops), len(new))
    answer, _ = tiny.chat("hello there", max_new_tokens=6)
    assert answer == tiny.tokenizer.decode(new[:cut])


def test_chat_none_history(tiny):
    answer, h = tiny.chat("hi", None, max_new_tokens=3)
    assert h == [{"role": "user", "content": "hi"}, {"role": "bot", "content": answer}]


def test_stream_matches_non_stream(tiny):
    answer, _ = tiny.chat("你好", [], max_new_tokens=8)
    history = []
    it = tiny.chat("你好", history, stream=True, max_new_tokens=8)
    assert not isinstance(it, tuple)
    first = next(it)
    assert first and history == []  # not updated mid-stream
    rest = list(it)
    assert first + "".join(rest) == answer
    assert history == [{"role": "user", "content": "你好"}, {"role": "bot", "content": answer}]


def test_stream_matches_non_stream_sampled(tiny):
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=0, top_p=1.0, seed=123)
    answer, _ = tiny.chat("abc", [], **kw)
    assert "".join(tiny.chat("abc", [], stream=True, **kw)) == answer
    assert tiny.chat("abc", [], **kw)[0] == answer  # the seed makes it reproducible


@pytest.fixture(scope="module")
def hf_tiny(tiny_dir):
    """The tiny checkpoint through transformers' Auto classes (the folder's own remote code)."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, trust_remote_code=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir, trust_remote_code=True)
    return model, tok


def test_module_keeps_no_chat_state(tiny):
    """Chat and sampling defaults belong to the LLM, not to the nn.Module (issue 16, point 6)."""
    assert not hasattr(tiny.model, "chat") and not hasattr(tiny.model, "generation_config")


def test_published_calling_convention(tiny, hf_tiny):
    """`model.chat(tokenizer, question, history, generation_config)` on the transformers model gives
    what our engine gives (greedy), streamed or not, with and without history."""
    model, tok = hf_tiny
    gc = dict(tiny.generation_config, do_sample=False, repetition_penalty=1.0, max_new_tokens=8)
    expected, hist = tiny.chat("问题", [], do_sample=False, repetition_penalty=1.0, max_new_tokens=8)
    assert expected  # the tiny model says something
    got = model.chat(tok, "问题", [], generation_config=gc)
    assert got == (expected, hist) and got[1][-1] == {"role": "bot", "content": expected}
    assert "".join(model.chat(tok, "问题", [], generation_config=gc, stream=True)) == expected
    expected2, _ = tiny.chat("再来", list(hist), do_sample=False, repetition_penalty=1.0, max_new_tokens=8)
    history = list(hist)
    assert model.chat(tok, "再来", history, generation_config=gc)[0] == expected2 and len(history) == 4
    # the prompt itself, turn by turn, is ours (TeleChat's <_user> q <_bot> a <_end> ...)
    remote = sys.modules[type(model).__module__]
    assert remote._chat_ids(tok, "再来", list(hist)) == tiny.encode_chat("再来", list(hist))


def test_generation_config_argument_overrides(tiny, hf_tiny):
    model, tok = hf_tiny
    gc = dict(tiny.generation_config, do_sample=False, max_new_tokens=2)
    a2, _ = model.chat(tok, "x", [], generation_config=gc)
    a8, _ = model.chat(tok, "x", [], generation_config=gc, max_new_tokens=8)
    assert a2 and a8.startswith(a2) and len(a8) > len(a2)  # greedy: the longer answer goes on from the shorter
    with pytest.raises(TypeError, match="nonsense"):
        model.chat(tok, "q", [], generation_config=gc, nonsense=True)
    with pytest.raises(ValueError, match="penalty"):  # raised in the caller, streamed too (no hang)
        "".join(model.chat(tok, "q", [], generation_config=gc, stream=True, repetition_penalty=-1.0))


def test_answer_never_contains_end(tiny):
    answer, _ = tiny.chat("你好", eos_token_id=-1, max_new_tokens=12)
    assert "<_end>" not in answer and "<_user>" not in answer and "<_bot>" not in answer


def _greedy_first(tiny, question):
    ids = tiny.encode_chat(question)
    return int(tiny.generate(ids, max_new_tokens=1, eos_token_id=-1)[0, -1])


def test_eos_stops_and_is_stripped(tiny):
    normal, _ = tiny.chat("你好", max_new_tokens=5)
    assert normal  # the tiny model does say something
    first = _greedy_first(tiny, "你好")
    history = []
    answer, h = tiny.chat("你好", history, eos_token_id=first, max_new_tokens=5)
    assert answer == ""
    assert h == [{"role": "user", "content": "你好"}, {"role": "bot", "content": ""}]
    assert list(tiny.chat("你好", [], stream=True, eos_token_id=first, max_new_tokens=5)) == []


def test_model_emitting_end_stops(tiny):
    """Make the greedy first token <_end> by swapping two lm_head rows: the answer is empty."""
    first = _greedy_first(tiny, "你好")
    eos = tiny.tokenizer.eos_id
    assert first != eos
    w = tiny.model.lm_head.weight
    with torch.no_grad():
        w[[first, eos]] = w[[eos, first]]
    assert _greedy_first(tiny, "你好") == eos
    assert tiny.chat("你好", max_new_tokens=5)[0] == ""
    # With stopping disabled the model goes on, and <_end> is still not in the text.
    answer, _ = tiny.chat("你好", eos_token_id=-1, max_new_tokens=5)
    assert "<_end>" not in answer


def test_unknown_generation_kwargs(tiny):
    with pytest.raises(TypeError, match="tempreature"):
        tiny.chat("q", tempreature=0.5)
    with pytest.raises(TypeError, match="bogus"):
        tiny.chat("q", stream=True, bogus=1)


def test_chat_needs_tokenizer(tiny):
    with pytest.raises(ValueError, match="tokenizer"):
        chat_fn(tiny.model, None, "q")


# ---- a programmed model: exact answers with byte-fallback characters ------------------------------
def _program(llm, chain):
    """Make the next greedy token a function of the current one: chain[i] -> chain[i + 1].

    Attention and MLP outputs are zeroed, so the last hidden state is the current token's
    embedding; chain tokens get one-hot embeddings and lm_head rows that pick their successor.
    """
    m = llm.model
    assert len(set(chain[:-1])) == len(chain) - 1 and len(chain) < m.config.hidden_size
    with torch.no_grad():
        for block in m.transformer.h:
            for lin in (block.self_attention.dense, block.mlp.down_proj):
                lin.weight.zero_()
                lin.bias.zero_()
        m.transformer.ln_f.weight.fill_(1.0)
        emb, head = m.transformer.word_embeddings.weight, m.lm_head.weight
        head.zero_()
        for i, (tok, nxt) in enumerate(zip(chain, chain[1:])):
            emb[tok] = 0.0
            emb[tok, i] = 1.0
            head[nxt, i] = 10.0


def test_programmed_answer_with_byte_fallback(tiny):
    tok = tiny.tokenizer
    text = "你好😀世界䶵"
    body = tok.encode(text)
    assert any(tok.sp.is_byte(i) for i in body)
    _program(tiny, [tok.bot_id, *body, tok.eos_id])
    history = [{"role": "user", "content": "早"}, {"role": "bot", "content": "早上好"}]
    answer, h = tiny.chat("问", history, max_new_tokens=20)
    assert answer == text
    assert h[-1] == {"role": "bot", "content": text} and len(h) == 4
    parts = list(tiny.chat("问", [], stream=True, max_new_tokens=20))
    assert "".join(parts) == text
    assert all(p and "\ufffd" not in p for p in parts)
    assert len(parts) >= 4  # streamed piece by piece, the emoji and 䶵 each whole
    assert "😀" in parts and "䶵" in parts
    # Cut off inside the emoji: the half character is dropped, streamed or not (no U+FFFD at the end).
    n = len(tok.encode("你好")) + 2
    parts = list(tiny.chat("问", [], stream=True, max_new_tokens=n))
    assert "".join(parts) == "你好" and all(p and "\ufffd" not in p for p in parts)
    answer, h = tiny.chat("问", [], max_new_tokens=n)
    assert answer == "你好" and h[-1]["content"] == "你好"


def test_programmed_end_mid_stream_with_stopping_disabled(tiny):
    tok = tiny.tokenizer
    a, b = tok.encode("你好"), tok.encode("世界")[1:]  # without a second "▁" (chain tokens are distinct)
    assert tok.id_to_token(a[0]) == "▁" and tok.id_to_token(b[0]) == "世"
    _program(tiny, [tok.bot_id, *a, tok.eos_id, *b])
    assert tiny.chat("问", max_new_tokens=20)[0] == "你好"
    answer, _ = tiny.chat("问", eos_token_id=-1, max_new_tokens=len(a) + 1 + len(b))
    assert answer == tok.decode([*a, tok.eos_id, *b]) and "<_end>" not in answer
    assert answer == "你好世界"


def test_programmed_long_history_is_truncated(tiny):
    """A history far longer than the context (max_length 32) still gives the right answer."""
    tok = tiny.tokenizer
    body = tok.encode("你好")
    _program(tiny, [tok.bot_id, *body, tok.eos_id])
    assert tiny.generation_config["max_length"] == 32
    answer, h = tiny.chat("问", _history(20), max_new_tokens=5)
    assert answer == "你好" and len(h) == 42


def test_large_max_new_tokens_does_not_cut_the_question(tiny):
    question = "今天天气很好"
    ids = tiny.encode_chat(question)
    assert len(ids) <= tiny.config.seq_length // 2  # fits once half the context is left for the answer
    seen = {}
    from telechat.engine import Engine

    real = Engine.iter_tokens

    def spy(self, prompts, params, *a, **kw):
        seen["prompt"] = list(prompts[0])
        return real(self, prompts, params, *a, **kw)

    Engine.iter_tokens = spy
    try:
        tiny.chat(question, max_new_tokens=tiny.config.seq_length, eos_token_id=-1)
    finally:
        Engine.iter_tokens = real
    assert seen["prompt"] == ids

"""`telechat data prepare` for any chat model: record formats told apart by their fields (TeleChat,
TeleChat2, alpaca, sharegpt, OpenAI messages), JSON-array files, the model's own chat template
(ChatML) with loss on the assistant turns only, the chat format picked from the tokenizer or forced,
and `--tokenizer default`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from telechat import load_tokenizer
from telechat.chat import encode_conversation, render_chat_template
from telechat.cli import main
from telechat.data import prepare
from telechat.data.formats import encode_template, parse_messages, token_starts
from telechat.data.prepare import (DataError, load_prepared, parse_record, prepare_pretrain, prepare_sft,
                                   read_json_array, read_records)

from conftest import TEXT, shared_path

# SmolLM2-135M-Instruct's template (the default model's): ChatML with a default system prompt.
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
S, E = "<|im_start|>", "<|im_end|>"

SYSTEM = "Be brief."
TURNS = [("What is the capital of China?", "Beijing is the capital."),
         ("And a big city in the south?", "Guangzhou and Shenzhen, 上海 too."),
         ("Count to three.", "1 2 3")]


# ---- fixtures and helpers ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE tokenizer with ChatML's special tokens and template, no TeleChat tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("chatml")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>", S, E],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT] * 20, trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": S, "eos_token": E, "pad_token": E, "unk_token": "<|endoftext|>", "chat_template": CHATML}))
    return d


@pytest.fixture(scope="module")
def chatml(chatml_dir):
    return load_tokenizer(chatml_dir)


def write_jsonl(path: Path, records) -> Path:
    with open(path, "wb") as fh:
        for r in records:
            r = json.dumps(r, ensure_ascii=False) if isinstance(r, (dict, list)) else r
            fh.write((r.encode("utf-8") if isinstance(r, str) else r) + b"\n")
    return path


def data_json(tmp_path: Path, files: dict[str, float]) -> Path:
    p = tmp_path / "data.json"
    p.write_text(json.dumps(files), encoding="utf-8")
    return p


def one_file(tmp_path: Path, records, name: str = "a.jsonl") -> Path:
    write_jsonl(tmp_path / name, records)
    return data_json(tmp_path, {name: 1})


def dialogues(folder: Path) -> list[tuple[list[int], list[int]]]:
    """Every packed dialogue of a prepared folder as (ids, loss mask), sample by sample."""
    d = load_prepared(folder)
    out = []
    for s in range(d["input_ids"].shape[0]):
        seg = np.asarray(d["segment_ids"][s])
        for k in range(1, int(seg.max()) + 1):
            sel = seg == k
            out.append((np.asarray(d["input_ids"][s])[sel].tolist(), np.asarray(d["loss_mask"][s])[sel].tolist()))
    return out


def chatml_by_hand(tok, turns, system=None) -> tuple[list[int], list[int]]:
    """ChatML written out piece by piece: loss on each answer and its <|im_end|>, nothing else
    (not the system prompt, the questions, "<|im_start|>assistant\\n" or the newline after <|im_end|>)."""
    im_start, im_end = tok.token_to_id(S), tok.token_to_id(E)
    ids, mask = [], []

    def add(piece_ids, loss):
        ids.extend(piece_ids)
        mask.extend([loss] * len(piece_ids))

    def header(role):
        add([im_start], 0)
        add(tok.encode(f"{role}\n"), 0)

    header("system")
    add(tok.encode(system or DEFAULT_SYSTEM), 0)
    add([im_end], 0)
    add(tok.encode("\n"), 0)
    for q, a in turns:
        header("user")
        add(tok.encode(q), 0)
        add([im_end], 0)
        add(tok.encode("\n"), 0)
        header("assistant")
        add(tok.encode(a), 1)
        add([im_end], 1)
        add(tok.encode("\n"), 0)
    return ids, mask


def messages_of(turns, system=None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    for q, a in turns:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs


def same_dialogue_in_every_format(turns, system) -> dict[str, dict]:
    """One dialogue written in each record format (TeleChat's own cannot carry a system prompt)."""
    (q, a), history = turns[-1], turns[:-1]
    return {
        "openai": {"messages": messages_of(turns, system)},
        "sharegpt": {"system": system, "conversations": [
            {"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in messages_of(turns)]},
        "alpaca": {"instruction": q, "input": "", "output": a, "system": system, "history": [list(t) for t in history]},
        "telechat2": {"system": system, "dialog": [
            {"role": "user" if m["role"] == "user" else "bot", "content": m["content"]} for m in messages_of(turns)]},
    }


# ---- the chat template: ids and loss mask --------------------------------------------------------
def test_fixture_tokenizer_has_a_template_and_no_telechat_tokens(chatml):
    assert chatml.chat_template == CHATML and chatml.user_id is None and chatml.bot_id is None
    assert chatml.id_to_token(chatml.eos_id) == E


def test_chatml_ids_and_mask_by_hand(tmp_path, chatml_dir, chatml):
    dj = one_file(tmp_path, [{"messages": messages_of(TURNS, SYSTEM)}])
    m = prepare_sft(dj, chatml_dir, 256, tmp_path / "out")
    assert m["chat_format"] == "template" and m["dialogues"] == 1 and m["skipped_total"] == 0
    ids, mask = chatml_by_hand(chatml, TURNS, SYSTEM)
    assert dialogues(tmp_path / "out") == [(ids, mask)]
    d = load_prepared(tmp_path / "out")
    pad = 256 - len(ids)
    assert d["input_ids"][0, :pad].tolist() == [chatml.pad_id] * pad and d["loss_mask"][0, :pad].sum() == 0
    assert m["loss_tokens"] == sum(mask) == sum(len(chatml.encode(a)) + 1 for _, a in TURNS)
    # what gets loss decodes to exactly the answers, each with its end-of-turn token
    spans = chatml.decode([i for i, k in zip(ids, mask) if k], skip_special_tokens=False)
    assert spans == "".join(a + E for _, a in TURNS)


def test_chatml_without_system_gets_the_templates_default_prompt_without_loss(tmp_path, chatml_dir, chatml):
    dj = one_file(tmp_path, [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}])
    prepare_sft(dj, chatml_dir, 128, tmp_path / "out")
    assert dialogues(tmp_path / "out") == [chatml_by_hand(chatml, [("Hi", "Hello")])]


def test_training_prefix_is_the_inference_prompt(chatml):
    """The tokens before each answer are what chat() sends the model for that question."""
    ids, mask, lengths, prefix = encode_template(chatml, SYSTEM, TURNS)
    history = [{"role": "system", "content": SYSTEM}]
    starts = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    assert len(starts) == len(TURNS)
    for (q, a), start in zip(TURNS, starts):
        assert ids[:start].tolist() == encode_conversation(chatml, q, history)
        history += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    assert prefix and sum(lengths) == len(ids) and len(lengths) == 1 + len(TURNS)
    text = render_chat_template(CHATML, messages_of(TURNS, SYSTEM), add_generation_prompt=False)
    assert ids.tolist() == chatml.encode(text)  # tokenized whole, as at inference


def test_every_record_format_gives_the_same_sample(tmp_path, chatml_dir, sp_model):
    recs = same_dialogue_in_every_format(TURNS, SYSTEM)
    for name, rec in recs.items():
        write_jsonl(tmp_path / f"{name}.jsonl", [rec])
    dj = data_json(tmp_path, {f"{name}.jsonl": 1 for name in recs})
    for tok, fmt in ((chatml_dir, "template"), (sp_model, "telechat")):
        m = prepare_sft(dj, tok, 200, tmp_path / fmt)
        assert m["chat_format"] == fmt and m["dialogues"] == len(recs) and m["skipped_total"] == 0
        assert {Path(k).stem: v["formats"] for k, v in m["sources"].items()} == {n: {n: 1} for n in recs}
        got = dialogues(tmp_path / fmt)
        assert all(g == got[0] for g in got), fmt
    # TeleChat's own format (no system prompt), and alpaca's "input" after the instruction
    (q1, a1), (q2, a2) = TURNS[:2]
    assert parse_record(json.dumps({"input": f"<_user>{q1}<_bot>{a1}<_user>{q2}", "output": a2}).encode()) == \
        ("telechat", None, TURNS[:2], ())
    assert parse_record(json.dumps({"instruction": "Translate", "input": "你好", "output": "hello"}).encode()) == \
        ("alpaca", None, [("Translate\n你好", "hello")], ())


def test_openai_text_parts_and_developer_role():
    rec = {"messages": [{"role": "developer", "content": "sys"},
                        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                        {"role": "assistant", "content": "c"}]}
    assert parse_messages(rec, "openai") == ("sys", [("ab", "c")], ())


def test_openai_weight_zero_turns_are_context_only(tmp_path, chatml_dir, chatml, sp_model, sp_tokenizer):
    msgs = messages_of(TURNS, SYSTEM)
    msgs[2]["weight"], msgs[4]["weight"], msgs[6]["weight"] = 0, 0, 1  # the first two answers: no loss
    dj = one_file(tmp_path, [{"messages": msgs}])
    prepare_sft(dj, chatml_dir, 256, tmp_path / "c")
    [(ids, mask)] = dialogues(tmp_path / "c")
    want_ids, want_mask = chatml_by_hand(chatml, TURNS, SYSTEM)
    last = len(chatml_by_hand(chatml, TURNS[:2], SYSTEM)[0])
    assert ids == want_ids and mask == [0] * last + want_mask[last:] and sum(mask) > 0
    prepare_sft(dj, sp_model, 256, tmp_path / "t")
    [(ids, mask)] = dialogues(tmp_path / "t")
    _, _, lengths = prepare.encode_dialogue(sp_tokenizer, SYSTEM, TURNS)
    cut = sum(lengths[:3])  # the system prompt and the first two turns
    assert mask[:cut] == [0] * cut and all(mask[cut:][i] for i in (0, -1))
    # when only context turns fit, the dialogue has nothing to learn: skipped
    with pytest.raises(DataError, match="no turn with loss fits"):
        prepare_sft(dj, chatml_dir, last + 2, tmp_path / "x")


@pytest.mark.parametrize("rec, reason", [
    ({"foo": 1, "bar": "x"}, "unknown_format"),
    ({}, "unknown_format"),
    ({"messages": []}, "missing_field"),
    ({"messages": "hi"}, "missing_field"),
    ({"messages": [{"role": "user", "content": "q"}]}, "unequal_turns"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, "unequal_turns"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a"}]}, "unequal_turns"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]}, "unequal_turns"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}]}, "unsupported_role"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "",
                                                      "tool_calls": [{"id": "1"}]}]}, "unsupported_role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                   {"role": "assistant", "content": "a"}]}, "unsupported_content"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}, "missing_field"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "empty_answer"),
    ({"messages": [{"role": 3, "content": "q"}, {"role": "assistant", "content": "a"}]}, "missing_field"),
    ({"messages": ["q", "a"]}, "missing_field"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"}]},
     "unsupported_role"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "\udc00"}]}, "bad_encoding"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": 5},
     "missing_field"),
    ({"instruction": "q"}, "missing_field"),
    ({"instruction": "q", "output": 3}, "missing_field"),
    ({"instruction": ["q"], "output": "a"}, "missing_field"),
    ({"instruction": "q", "input": 1, "output": "a"}, "missing_field"),
    ({"instruction": "q", "output": "a", "history": [["only one"]]}, "missing_field"),
    ({"instruction": "q", "output": "a", "history": "x"}, "missing_field"),
    ({"instruction": "q", "output": ""}, "empty_answer"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]},
     "missing_field"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}, "no_loss"),
])
def test_bad_records_of_the_new_formats(rec, reason):
    with pytest.raises(ValueError) as e:
        parse_record(json.dumps(rec).encode())
    assert str(e.value).split(":")[0] == reason, str(e.value)


def test_bad_and_unknown_records_are_skipped_with_file_line(tmp_path, chatml_dir):
    recs = [{"messages": messages_of(TURNS[:1])},                                   # 1 good
            {"chosen": "a", "rejected": "b"},                                       # 2 unknown shape (DPO)
            {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}]},  # 3 tool
            {"conversations": [{"from": "human", "value": "q"}]},                  # 4 no answer
            {"instruction": "say hi", "output": "hi"}]                              # 5 good
    f = tmp_path / "a.jsonl"
    m = prepare_sft(one_file(tmp_path, recs), chatml_dir, 128, tmp_path / "out")
    assert m["dialogues"] == 2 and m["skipped_total"] == 3
    assert {r: v["first"][0].split(": ")[0] for r, v in m["skipped"].items()} == \
        {"unknown_format": f"{f}:2", "unsupported_role": f"{f}:3", "unequal_turns": f"{f}:4"}
    assert "'chosen', 'rejected'" in m["skipped"]["unknown_format"]["first"][0]


def test_template_turns_are_cut_at_turn_boundaries(tmp_path, chatml_dir, chatml):
    full, _ = chatml_by_hand(chatml, TURNS, SYSTEM)
    two, two_mask = chatml_by_hand(chatml, TURNS[:2], SYSTEM)
    dj = one_file(tmp_path, [{"messages": messages_of(TURNS, SYSTEM)}])
    m = prepare_sft(dj, chatml_dir, len(full) - 1, tmp_path / "out")
    assert m["truncated_dialogues"] == 1 and dialogues(tmp_path / "out") == [(two, two_mask)]
    # not even the system prompt and the first turn fit: skipped as too_long
    one, _ = chatml_by_hand(chatml, TURNS[:1], SYSTEM)
    with pytest.raises(DataError, match="too_long"):
        prepare_sft(dj, chatml_dir, len(one) - 1, tmp_path / "short")


def test_template_that_cannot_be_split_into_turns_is_a_skip(tmp_path, chatml_dir):
    d = tmp_path / "tok"
    shutil.copytree(chatml_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    # the number of messages goes first: a prefix render is not a prefix of the whole
    cfg["chat_template"] = "{{ messages|length }}" + CHATML
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    dj = one_file(tmp_path, [{"messages": messages_of(TURNS[:1])}])
    with pytest.raises(DataError, match="template_error"):
        prepare_sft(dj, d, 128, tmp_path / "out")
    cfg["chat_template"] = ("{% if messages|length > 2 %}{{ raise_exception('one turn only') }}{% endif %}"
                            + CHATML)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    dj = one_file(tmp_path, [{"messages": messages_of(TURNS[:1])}, {"messages": messages_of(TURNS[:2])}])
    m = prepare_sft(dj, d, 160, tmp_path / "out")
    assert m["dialogues"] == 1 and "one turn only" in m["skipped"]["template_error"]["first"][0]


def test_template_output_identical_for_any_number_of_workers(tmp_path, chatml_dir, monkeypatch):
    monkeypatch.setattr(prepare, "CHUNK", 4)
    recs = [{"messages": messages_of(TURNS[:1 + i % 3], SYSTEM if i % 2 else None)} for i in range(40)] + ["{bad"]
    dj = one_file(tmp_path, recs)
    m1 = prepare_sft(dj, chatml_dir, 256, tmp_path / "w1", num_workers=1, seed=5)
    m2 = prepare_sft(dj, chatml_dir, 256, tmp_path / "w2", num_workers=2, seed=5)
    for k in ("input_ids", "loss_mask", "segment_ids"):
        assert (np.load(tmp_path / "w1" / f"{k}.npy") == np.load(tmp_path / "w2" / f"{k}.npy")).all()
    assert m1["skipped"] == m2["skipped"] and m1["dialogues"] == 40


def test_sentencepiece_template_offsets(tmp_path, sp_model):
    """A SentencePiece tokenizer with a template: tokens located by byte offsets (CJK text here);
    with no special token in an answer, the whole rendered answer gets loss."""
    d = tmp_path / "sp"
    d.mkdir()
    shutil.copy(sp_model, d / "tokenizer.model")
    template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tok = load_tokenizer(d)
    text = "user: 今天天气很好\nassistant: 我们去公园散步吧\n"
    ids, starts = token_starts(tok, text)
    assert ids == tok.encode(text)
    assert all(0 <= a <= b <= len(text) for a, b in zip(starts, list(starts[1:]) + [len(text)]))
    ids, mask, _, _ = encode_template(tok, None, [("今天天气很好", "我们去公园散步吧")])
    got = tok.decode([i for i, k in zip(ids.tolist(), mask.tolist()) if k])
    assert got.strip() == "我们去公园散步吧" and mask[0] == 0 and mask[-1] == 1


# ---- which chat format ---------------------------------------------------------------------------
def test_chat_format_auto_and_forced(tmp_path, chatml_dir, sp_model, sp_tokenizer, capsys):
    dj = one_file(tmp_path, [{"messages": messages_of(TURNS[:1])}])
    assert prepare_sft(dj, sp_model, 256, tmp_path / "t")["chat_format"] == "telechat"
    assert prepare_sft(dj, chatml_dir, 256, tmp_path / "c")["chat_format"] == "template"
    # a TeleChat tokenizer that also has a template: telechat unless the template is asked for
    both = tmp_path / "both"
    both.mkdir()
    shutil.copy(sp_model, both / "tokenizer.model")
    (both / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<_end>"}))
    assert prepare_sft(dj, both, 256, tmp_path / "b1")["chat_format"] == "telechat"
    m = prepare_sft(dj, both, 256, tmp_path / "b2", chat_format="template")
    assert m["chat_format"] == "template" and m["chat_template"].startswith("sha256:")
    assert dialogues(tmp_path / "b2")[0][0] == sp_tokenizer.encode(
        render_chat_template(CHATML, messages_of(TURNS[:1]), add_generation_prompt=False))
    # forcing what the tokenizer cannot do is an error naming it
    with pytest.raises(DataError, match="no chat_template"):
        prepare_sft(dj, sp_model, 256, tmp_path / "x", chat_format="template")
    with pytest.raises(DataError, match="<_user>"):
        prepare_sft(dj, chatml_dir, 256, tmp_path / "x", chat_format="telechat")
    with pytest.raises(DataError, match="chat_format"):
        prepare_sft(dj, chatml_dir, 256, tmp_path / "x", chat_format="chatml")
    assert not (tmp_path / "x").exists()
    rc = main(["data", "prepare", "--data-json", str(dj), "--tokenizer", str(sp_model), "--max-seq-len", "256",
               "--output", str(tmp_path / "x"), "--chat-format", "template"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and "chat_template" in err and len(err.splitlines()) == 1
    rc = main(["data", "prepare", "--data-json", str(dj), "--tokenizer", str(chatml_dir), "--max-seq-len", "256",
               "--output", str(tmp_path / "cli")])
    assert rc == 0 and "(template format)" in capsys.readouterr().out


def test_tokenizer_default_is_the_default_models(tmp_path, chatml_dir, monkeypatch, capsys):
    """"default" goes through default_model.resolve_model (the real import is the slow test below)."""
    import telechat.default_model as dm

    asked = []
    monkeypatch.setattr(dm, "ensure_default_model", lambda progress=True: asked.append(1) or chatml_dir)
    dj = one_file(tmp_path, [{"instruction": "Count to three.", "output": "1 2 3"}])
    assert main(["data", "prepare", "--data-json", str(dj), "--tokenizer", "default", "--max-seq-len", "96",
                 "--output", str(tmp_path / "out")]) == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["chat_format"] == "template" and m["tokenizer"] == str(chatml_dir.resolve()) and asked
    doc = write_jsonl(tmp_path / "doc.jsonl", [{"text": TEXT}])
    m = prepare_pretrain([doc], "default", 8, tmp_path / "pt", val_fraction=0)
    assert m["tokenizer"] == str(chatml_dir.resolve()) and m["end_id"] == load_tokenizer(chatml_dir).eos_id


@pytest.mark.slow
def test_default_model_prepares_chatml(tmp_path, default_llm):
    """The real default model (SmolLM2, imported once): its ChatML, loss on the answers only."""
    tok = default_llm.tokenizer
    dj = one_file(tmp_path, [{"messages": messages_of(TURNS, SYSTEM)}])
    m = prepare_sft(dj, "default", 256, tmp_path / "out")
    assert m["chat_format"] == "template"
    [(ids, mask)] = dialogues(tmp_path / "out")
    assert (ids, mask) == chatml_by_hand(tok, TURNS, SYSTEM)
    assert m["tokenizer_fingerprint"] == prepare.tokenizer_fingerprint(tok)


# ---- JSON-array files ----------------------------------------------------------------------------
ALPACA = [  # three records of LLaMA-Factory's alpaca_en_demo.json
    {"instruction": "Describe a process of making crepes.", "input": "",
     "output": "Mix flour, eggs, milk and a pinch of salt, rest the batter, then cook thin layers in a hot pan."},
    {"instruction": "Transform the following sentence using a synonym: The car sped quickly.", "input": "",
     "output": "The car accelerated rapidly."},
    {"instruction": "Make a persuasive argument to promote recycling.", "input": "",
     "output": "Recycling conserves natural resources, saves energy and reduces the waste sent to landfills."},
]


def test_json_array_file_equals_json_lines(tmp_path, chatml_dir):
    (tmp_path / "a.json").write_text(json.dumps(ALPACA, indent=2), encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", ALPACA)
    ma = prepare_sft(data_json(tmp_path, {"a.json": 1}), chatml_dir, 256, tmp_path / "oa")
    mb = prepare_sft(data_json(tmp_path, {"b.jsonl": 1}), chatml_dir, 256, tmp_path / "ob")
    assert ma["dialogues"] == mb["dialogues"] == 3 and ma["sources"][str(tmp_path / "a.json")]["records"] == 3
    for k in ("input_ids", "loss_mask", "segment_ids"):
        assert (np.load(tmp_path / "oa" / f"{k}.npy") == np.load(tmp_path / "ob" / f"{k}.npy")).all()


def test_json_array_elements_have_their_line_numbers(tmp_path, chatml_dir):
    good = json.dumps(ALPACA[1])
    text = ("\ufeff[\n" + json.dumps(ALPACA[0], indent=2) + ",\n"   # 2: good, over 5 lines
            + '  {"instruction": "q", "output": ""},\n'               # 7: empty answer
            + '  {"x": "a ] } , \\" [ {",\n   "y": 2},\n'              # 8-9: unknown shape, brackets in a string
            + "  3,\n"                                                # 10: not an object
            + '  {"instruction": "' + "y" * 400 + '",\n "output": "z"},\n'  # 11-12: too large
            + "\n  " + good + "\n]\n")                                # 14: good
    f = tmp_path / "a.json"
    f.write_text(text, encoding="utf-8")
    m = prepare_sft(data_json(tmp_path, {"a.json": 1}), chatml_dir, 256, tmp_path / "out", max_line_bytes=300)
    assert m["dialogues"] == 2 and m["sources"][str(f)]["records"] == 6
    assert {r: [x.split(": ")[0] for x in v["first"]] for r, v in m["skipped"].items()} == {
        "empty_answer": [f"{f}:7"], "unknown_format": [f"{f}:8"], "invalid_json": [f"{f}:10"], "too_large": [f"{f}:11"]}


@pytest.mark.parametrize("text, want", [
    ("[]", []),
    ("[\n]\n", []),
    ('[{"a": 1}, {"b": "\\\\"}]', [(1, b'{"a": 1}'), (1, b'{"b": "\\\\"}')]),
    ('[{"a": 1}', [(1, b'{"a": 1}'), (1, "invalid_json")]),
    ('[{"a": "open]\n', [(1, b'{"a": "open]'), (2, "invalid_json")]),
    ('[{"a": 1}}, {"b": 2}]', [(1, "invalid_json")]),
    ('[{"a": 1}]\n{"b": 2}', [(1, b'{"a": 1}'), (2, "invalid_json")]),
    ('[{"a": 1}] trailing', [(1, b'{"a": 1}'), (1, "invalid_json")]),
])
def test_read_json_array_structure(tmp_path, text, want):
    f = tmp_path / "a.json"
    f.write_text(text, encoding="utf-8")
    got = [(n, raw if isinstance(raw, bytes) else raw.split(":")[0]) for n, raw, _ in read_json_array(f, 1000)]
    assert got == want


def test_json_array_read_in_small_chunks_is_the_same(tmp_path, monkeypatch):
    """Elements, strings and escapes cut across read() boundaries come out the same."""
    recs = [{"instruction": f"q{i} \\ \" ] }} ,", "input": "今天" * i, "output": "a" * i} for i in range(40)]
    f = tmp_path / "a.json"
    f.write_text(json.dumps(recs, ensure_ascii=False, indent=1), encoding="utf-8")
    whole = list(read_records(f, 1 << 20))
    assert [json.loads(raw) for _, raw, _ in whole] == recs
    real_open = open

    class Tiny:
        def __init__(self, fh):
            self.fh = fh

        def read(self, n=-1):
            return self.fh.read(min(n, 7))

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.fh.close()

    monkeypatch.setattr("builtins.open", lambda p, mode="r", *a, **k: Tiny(real_open(p, mode, *a, **k))
                        if str(p) == str(f) and "b" in mode else real_open(p, mode, *a, **k))
    assert list(read_json_array(f, 1 << 20)) == whole


def test_json_array_for_pretraining(tmp_path, sp_model):
    f = tmp_path / "docs.json"
    f.write_text(json.dumps([{"text": TEXT}, {"text": TEXT}, {"title": "no text"}]), encoding="utf-8")
    m = prepare_pretrain([f], sp_model, 16, tmp_path / "pt", val_fraction=0)
    assert m["splits"]["train"]["documents"] == 2 and m["skipped"]["missing_field"]["first"][0].startswith(f"{f}:1")


def test_shared_llama_factory_demos(tmp_path, chatml_dir):
    """LLaMA-Factory's alpaca demos, as published (.json arrays): every record used or accounted for."""
    names = ["alpaca_en_demo.json", "alpaca_zh_demo.json", "identity.json", "dpo_en_demo.json"]
    files = {n: shared_path("data", "sft", "llama-factory", n) for n in names}
    m = prepare_sft(data_json(tmp_path, {str(p): 0.05 for p in files.values()}), chatml_dir, 512, tmp_path / "o")
    for n, p in files.items():
        assert m["sources"][str(p)]["records"] == len(json.loads(p.read_text(encoding="utf-8"))), n
    assert set(m["skipped"]) <= {"too_long", "unequal_turns"}  # DPO records: a question, two answers
    assert m["sources"][str(files["dpo_en_demo.json"])]["formats"] == {}  # chosen/rejected: no SFT format


def test_a_tokenizer_valueerror_is_a_tokenizer_error(tmp_path, chatml_dir, monkeypatch):
    """A ValueError from the tokenizer library is reported as tokenizer_error, not as a reason of its own."""
    from telechat.data import formats

    real = formats.token_starts

    def flaky(tok, text):
        if "BOOM" in text:
            raise ValueError("out_type is deprecated. Use something else")
        return real(tok, text)

    monkeypatch.setattr(formats, "token_starts", flaky)
    dj = one_file(tmp_path, [{"instruction": "BOOM", "output": "x"}, {"instruction": "ok", "output": "fine"}])
    m = prepare_sft(dj, chatml_dir, 128, tmp_path / "out")
    assert list(m["skipped"]) == ["tokenizer_error"] and "deprecated" in m["skipped"]["tokenizer_error"]["first"][0]


@pytest.mark.slow
def test_json_array_memory_does_not_grow_with_a_20mb_element(tmp_path, sp_model):
    from test_data_prepare_robust import peak_mb

    small = [{"instruction": f"question {i}", "output": "a short answer"} for i in range(20)]
    huge = {"instruction": "q", "output": TEXT * (20_000_000 // len(TEXT.encode()))}  # ~20 MB, one element
    for name, recs in (("base", small), ("big", small[:10] + [huge] + small[10:])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.json").write_text(json.dumps(recs, ensure_ascii=False, indent=1), encoding="utf-8")
        data_json(tmp_path / name, {"a.json": 1})
    assert (tmp_path / "big" / "a.json").stat().st_size > 20_000_000
    base, _ = peak_mb("sft", tmp_path / "base" / "data.json", sp_model, tmp_path / "o1")
    big, m = peak_mb("sft", tmp_path / "big" / "data.json", sp_model, tmp_path / "o2")
    # the element is scanned past in 1 MiB reads: never held, parsed or tokenized
    assert big - base < 16, f"peak {big:.0f} MB with a 20 MB element vs {base:.0f} MB without"
    f = tmp_path / "big" / "a.json"
    assert {r: v["first"][0].split(": ")[0] for r, v in m["skipped"].items()} == {"too_large": f"{f}:42"}
    assert m["dialogues"] == 20


def test_fuzzed_json_arrays_never_crash_the_reader(tmp_path):
    """Random damage to a JSON-array file (brackets, quotes, backslashes, commas, newlines): the reader
    yields elements or reasons with line numbers inside the file, and every element parses or is a
    ValueError with a reason, never anything else."""
    rng = np.random.default_rng(18)
    base = json.dumps(ALPACA + [{"messages": messages_of(TURNS, SYSTEM)},
                                {"conversations": [{"from": "human", "value": 'a "quoted" \\ [x]'},
                                                   {"from": "gpt", "value": "{b}, c"}]}],
                      ensure_ascii=False, indent=2).encode()
    f = tmp_path / "a.json"
    for trial in range(300):
        b = bytearray(base)
        for _ in range(int(rng.integers(1, 6))):
            i = int(rng.integers(0, len(b)))
            op = int(rng.integers(0, 3))
            if op == 0:
                del b[i]
            else:
                b.insert(i, int(rng.choice(list(b'[]{}",\\\n:'))) if op == 1 else int(rng.integers(0, 256)))
        f.write_bytes(bytes(b))
        lines = b.count(b"\n") + 1
        for n, raw, size in read_records(f, 400):
            assert 1 <= n <= lines, (trial, n)
            if isinstance(raw, bytes):
                try:
                    parse_record(raw)
                except ValueError as e:
                    assert str(e).split(":")[0].replace("_", "").isalpha(), str(e)
            else:
                assert raw is None or raw.startswith("invalid_json: "), raw

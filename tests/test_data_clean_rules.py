"""Cleaning stages one by one (no executor): normalisation, language id, every rule against the
documents it must remove and a clean control set it must keep, PII, sensitive words, config."""
from __future__ import annotations

import random

import pytest

pytest.importorskip("datatrove")
from datatrove.data import Document  # noqa: E402

from telechat.data.clean import synth  # noqa: E402
from telechat.data.clean.config import load_config  # noqa: E402
from telechat.data.clean.normalize import Normalizer  # noqa: E402
from telechat.data.clean.pii import ID_CHECK, ID_WEIGHTS, PIIMasker, valid_id_card  # noqa: E402
from telechat.data.clean.pipeline import plan  # noqa: E402
from telechat.data.prepare import DataError  # noqa: E402
from telechat.data.clean.text import detect_language  # noqa: E402


def _steps(tmp_path, **cfg_override):
    """The filter stage's steps (reader and writer left out), dedup off."""
    override = {"dedup": {"exact": {"enabled": False}, "minhash": {"enabled": False}}}
    for k, v in cfg_override.items():
        override.setdefault(k, {}).update(v)
    cfg = load_config(override)
    stages, _ = plan(cfg, [str(tmp_path / "x.jsonl")], str(tmp_path / "out"), 1, 1, None)
    return stages[0].pipeline[1:-1]


def _run(steps, texts):
    gen = iter([Document(text=t, id=f"doc{i}") for i, t in enumerate(texts)])
    for s in steps:
        gen = s.run(gen, 0, 1)
    return list(gen)


def _removed_by(steps) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for s in steps:
        acc = getattr(s, "account", None)
        if acc is not None:
            for reason in acc.removed:
                out.setdefault(s.key.split("-", 1)[1], set()).add(reason)
    return out


@pytest.fixture(scope="module")
def clean_docs():
    rng = random.Random(0)
    return [synth.document(lang, rng) for _ in range(60) for lang in ("zh", "en")]


def test_clean_control_set_passes_every_rule(tmp_path, clean_docs):
    steps = _steps(tmp_path)
    out = _run(steps, clean_docs)
    assert len(out) == len(clean_docs), _removed_by(steps)
    assert {d.metadata["language"] for d in out} == {"zh", "en"}


@pytest.mark.parametrize("group,stage", [
    ("language", "language"), ("rules_zh", "rules_zh"), ("rules_en", "rules_en"),
    ("boilerplate", "boilerplate"), ("sensitive_words", "sensitive_words"),
])
def test_each_rule_removes_its_documents(tmp_path, clean_docs, group, stage):
    bad = synth.bad_documents(random.Random(1))[group]
    steps = _steps(tmp_path)
    out = _run(steps, bad + clean_docs[:20])
    assert [d.id for d in out] == [f"doc{i}" for i in range(len(bad), len(bad) + 20)]  # every bad one, no good one
    removed = _removed_by(steps)
    assert set(removed) == {stage}, removed


def test_gopher_filters_remove_repetitive_english(tmp_path, clean_docs):
    bad = synth.bad_documents(random.Random(1))["gopher"]
    steps = _steps(tmp_path)
    out = _run(steps, bad + clean_docs[:10])
    assert len(out) == 10
    assert set(_removed_by(steps)) <= {"gopher_quality_en", "gopher_repetition_en"}


def test_specific_zh_reasons(tmp_path):
    steps = _steps(tmp_path)
    bad = synth.bad_documents(random.Random(1))["rules_zh"]
    _run(steps, bad)
    reasons = _removed_by(steps)["rules_zh"]
    assert {"zh_too_short", "zh_low_han_fraction", "zh_dup_line_fraction"} <= reasons
    assert any(r.startswith(("zh_top_", "zh_dup_")) for r in reasons - {"zh_dup_line_fraction"})


def test_switching_a_stage_off_keeps_its_documents(tmp_path):
    bad = synth.bad_documents(random.Random(1))["boilerplate"]
    steps = _steps(tmp_path, boilerplate={"enabled": False}, rules_zh={"enabled": False})
    assert len(_run(steps, bad)) == 1


def test_boilerplate_lines_are_stripped_from_good_documents(tmp_path, clean_docs):
    doc = clean_docs[0] + "\n点击这里查看更多\n版权所有 © 2024 新闻网"
    out = _run(_steps(tmp_path), [doc])
    assert out[0].text == clean_docs[0]


def test_language_identification():
    assert detect_language("用 pip install telechat 安装，然后运行 telechat chat 即可开始对话。")[0] == "zh"
    assert detect_language("The meeting of the board was held in the town hall and it was long.")[0] == "en"
    assert detect_language("Le chat est sur la table, mais le chien dort dans le jardin depuis ce matin.")[0] == "other"
    assert detect_language("今日はとても良い天気ですね。散歩に行きましょう。")[0] == "other"
    assert detect_language("12345 67890 !!! ###")[0] == "other"


def test_normaliser():
    n = Normalizer()
    assert n("我们,你们!真的?好.然后") == "我们，你们！真的？好。然后"
    assert n("Hello，world！ It is ３.１４ and ＡＢＣ") == "Hello, world! It is 3.14 and ABC"
    assert n("温度是x²，约①号") == "温度是x²，约①号"  # NFKC where safe only: superscripts and circled digits stay
    assert n("　　中国人民\r\n\r\n\r\n\r\nok  a   b\x00\u200b") == "中国人民\n\nok a b"
    assert n("\x1b[32m《登鹳雀楼》\x1b[m") == "《登鹳雀楼》"
    assert n("def f():\n    return 1") == "def f():\n    return 1"  # code indentation kept
    assert n("ﬁne ⼈") == "fine 人"
    assert Normalizer(punctuation="keep")("我们,你们") == "我们,你们"
    assert Normalizer(punctuation="halfwidth")("你好，世界。") == "你好,世界."


def _id(base17: str) -> str:
    return base17 + ID_CHECK[sum(int(d) * w for d, w in zip(base17, ID_WEIGHTS)) % 11]


def test_pii_masks_planted_items_and_leaves_lookalikes():
    good = _id("11010519491231002")  # check digit X
    other = _id("44030419850716123")
    wrong = good[:-1] + ("1" if good[-1] != "1" else "2")  # wrong check digit
    bad_date = _id("11010519491332002")  # month 13
    text = (f"请联系 zhang.san@example.com 或 li_si+news@mail.example.org.cn，手机 13800138000、+86 139-1234-5678，"
            f"座机 (010) 6234 5678，身份证 {good}，另 {other}。假号码 {wrong} 与 {bad_date} 不是身份证。"
            f"Call (555) 123-4567 or +44 20 7946 0958. Server 192.168.1.10 and fe80::1ff:fe23:4567:890a. "
            f"Not IPs: 999.1.1.1, v1.2.3.4, 10.0.0.256, std::map, 12:30:45. Order 12345678901, version 3.11.7, "
            f"price 1,234,567, date 2024-01-15.")
    counts: dict = {}
    out = PIIMasker()(text, counts)
    assert counts == {"email": 2, "id_card": 2, "phone": 5, "ip": 2}
    for planted in ("zhang.san@example.com", "13800138000", good, other, "192.168.1.10", "7946 0958", "123-4567"):
        assert planted not in out
    for lookalike in (wrong, bad_date, "999.1.1.1", "v1.2.3.4", "10.0.0.256", "std::map", "12:30:45", "12345678901",
                      "3.11.7", "1,234,567", "2024-01-15"):
        assert lookalike in out
    assert valid_id_card(good) and not valid_id_card(wrong) and not valid_id_card(bad_date)


def test_pii_step_counts_in_report(tmp_path):
    steps = _steps(tmp_path)
    doc = synth.document("en", random.Random(5)) + " Write to someone@example.com today."
    out = _run(steps, [doc])
    assert "<EMAIL>" in out[0].text
    pii = next(s for s in steps if s.key.endswith("pii"))
    assert pii.account.counters == {"masked_email": 1} and pii.account.modified == 1


def test_sensitive_word_list_is_replaceable(tmp_path, clean_docs):
    words = tmp_path / "words.txt"
    words.write_text("# mine\n社区志愿者\nvolunteers\n", encoding="utf-8")
    steps = _steps(tmp_path, sensitive_words={"word_list": str(words), "max_density": 0.0, "min_matches": 1})
    texts = [t for t in clean_docs if "社区志愿者" in t or "volunteers" in t][:4] + ["今天天气很好，我们一起去公园散步，看到了很多美丽的花朵和绿树。"]
    out = _run(steps, texts)
    assert [d.text for d in out] == texts[-1:]
    with pytest.raises(FileNotFoundError):
        _steps(tmp_path, sensitive_words={"word_list": str(tmp_path / "missing.txt")})


def test_config_errors():
    with pytest.raises(DataError, match="unknown key 'rules_zh.min_charz'"):
        load_config({"rules_zh": {"min_charz": 3}})
    with pytest.raises(DataError, match="normalize.nfkc"):
        load_config({"normalize": {"nfkc": "always"}})
    cfg = load_config(None, **{"reader.text_field": "body"})
    assert cfg["reader"]["text_field"] == "body" and cfg["dedup"]["minhash"]["num_buckets"] == 30

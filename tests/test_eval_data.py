"""Eval data: readers of every benchmark format on fixtures written here (and on ../shared when
present), answer extraction, and the scoring arithmetic."""
from __future__ import annotations

import bz2
import csv
import gzip
import itertools
import json
import math
from pathlib import Path

import pytest

from telechat.eval import data as D
from telechat.eval import extract as X
from telechat.eval import metrics as M
from telechat.eval.subjects import categories

from conftest import shared_path


def _csv(path: Path, rows, header=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)


def _jsonl(path: Path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


MMLU_DEV = [[f"Dev question {i}?", "w", "x", "y", "z", "ABCD"[i % 4]] for i in range(5)]


def write_eval_fixtures(root: Path) -> Path:
    """A small --data-dir in every original format the harness reads."""
    root = Path(root)
    # MMLU: two subjects of different sizes (so macro != micro)
    for subj, answers in (("abstract_algebra", "BBAC"), ("anatomy", "BB")):
        _csv(root / "mmlu/dev" / f"{subj}_dev.csv", MMLU_DEV)
        _csv(root / "mmlu/test" / f"{subj}_test.csv",
             [[f"{subj} question {i}, with a comma?", "one", "two", "three", "four", a] for i, a in enumerate(answers)])
    # C-Eval (val has answers, dev has explanations)
    head = ["id", "question", "A", "B", "C", "D", "answer"]
    _csv(root / "ceval/dev/accountant_dev.csv",
         [[i, f"开发题{i}____。", "甲", "乙", "丙", "丁", "ABCD"[i % 4], "解析"] for i in range(5)], head + ["explanation"])
    _csv(root / "ceval/val/accountant_val.csv", [[i, f"验证题{i}____。", "甲", "乙", "丙", "丁", "B"] for i in range(3)], head)
    # CMMLU
    chead = ["", "Question", "A", "B", "C", "D", "Answer"]
    _csv(root / "cmmlu/dev/anatomy.csv", [[i, f"解剖开发{i}", "甲", "乙", "丙", "丁", "ABCD"[i % 4]] for i in range(5)], chead)
    _csv(root / "cmmlu/test/anatomy.csv", [[i, f"解剖题{i}", "甲", "乙", "丙", "丁", "A"] for i in range(3)], chead)
    # HellaSwag: 6 lines per item, bz2
    lines = []
    for i in range(3):
        lines += [f"Activity {i}: A person walks to the door and", str(i % 4), "opens it.", "eats a car.",
                  "flies away quickly.", "sits."]
    (root / "hellaswag").mkdir(parents=True, exist_ok=True)
    (root / "hellaswag/hellaswag_val_full.txt.bz2").write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
    # FewCLUE: CHID, CSL, EPRSTMT
    _jsonl(root / "chid/test_public.json", [
        {"id": 1, "candidates": ["一心一意", "三心二意", "画蛇添足", "守株待兔", "对牛弹琴", "井底之蛙", "亡羊补牢"],
         "content": "他做事总是#idiom#，从不分心。", "answer": 0},
        {"id": 2, "candidates": ["一心一意", "三心二意", "画蛇添足", "守株待兔", "对牛弹琴", "井底之蛙", "亡羊补牢"],
         "content": "#idiom#，为时未晚。", "answer": 6}])
    _jsonl(root / "csl/test_public.json", [
        {"id": 1, "abst": "本文提出一种新的图像分割方法。", "keyword": ["图像分割", "深度学习"], "label": "1"},
        {"id": 2, "abst": "研究了土壤中的氮循环。", "keyword": ["氮循环", "量子计算"], "label": "0"}])
    _jsonl(root / "eprstmt/test_public.json", [
        {"id": 1, "sentence": "质量很好，非常满意", "label": "Positive"},
        {"id": 2, "sentence": "太差了，再也不买", "label": "Negative"}])
    # AGIEval: a Chinese MC file, an English MC file, a cloze file
    _jsonl(root / "agieval/logiqa-zh.jsonl", [
        {"passage": "有三个人。", "question": "谁最高？", "options": ["(A)甲", "(B)乙", "(C)丙", "(D)丁"],
         "label": "C", "answer": None, "other": None}])
    _jsonl(root / "agieval/sat-math.jsonl", [
        {"passage": None, "question": "What is 2+3?", "options": ["(A)4", "(B)5", "(C)6", "(D)7"], "label": "B"},
        {"passage": None, "question": "Which are even?", "options": ["(A)2", "(B)3", "(C)4", "(D)5"],
         "label": ["A", "C"]}])
    _jsonl(root / "agieval/math.jsonl", [{"passage": None, "question": "Compute 6*7.", "options": None,
                                           "label": None, "answer": "42"}])
    # GAOKAO-Bench objective questions
    (root / "gaokao/Objective_Questions").mkdir(parents=True, exist_ok=True)
    (root / "gaokao/Objective_Questions/2010-2022_Math_II_MCQs.json").write_text(json.dumps({
        "keywords": "2010-2022_Math_II_MCQs",
        "example": [
            {"year": "2010", "category": "（新课标）", "question": "1．复数 i^2 等于（　　）\nA．1\tB．-1\tC．i\tD．0",
             "answer": ["B"], "analysis": "", "index": 0, "score": 5},
            {"year": "2011", "category": "（新课标）", "question": "2．1+1=（　　）\nA．1\tB．2\tC．3\tD．4",
             "answer": ["B"], "analysis": "", "index": 1, "score": 5}]}, ensure_ascii=False), encoding="utf-8")
    # MATH: test/<type>/<n>.json and a train split for the examples
    for split, n in (("test", 2), ("train", 4)):
        for i in range(n):
            p = root / f"math/{split}/algebra/{i}.json"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps({"problem": f"What is ${i}+{i}$?", "level": "Level 1", "type": "Algebra",
                                     "solution": f"We add: ${i}+{i}=\\boxed{{{2 * i}}}$."}), encoding="utf-8")
    # GSM8K
    _jsonl(root / "gsm8k/train.jsonl", [{"question": f"Tom has {i} apples and gets 2 more. How many?",
                                         "answer": f"He has {i}+2=<<{i}+2={i + 2}>>{i + 2} apples.\n#### {i + 2}"}
                                        for i in range(5)])
    _jsonl(root / "gsm8k/test.jsonl", [{"question": "Ann has 1,000 coins and spends 1. How many are left?",
                                        "answer": "1000-1=<<1000-1=999>>999\n#### 999"}])
    # BBH: tasks + CoT prompt files
    cot = ("canary line\n-----\nAnswer questions about a boolean expression.\n\n"
           "Q: True and False is\nA: Let's think step by step.\nTrue and False is False. So the answer is False.\n\n"
           "Q: not True is\nA: Let's think step by step.\nnot True is False. So the answer is False.\n\n"
           "Q: True or False is\nA: Let's think step by step.\nTrue or False is True. So the answer is True.")
    (root / "bbh-cot-prompts").mkdir(parents=True, exist_ok=True)
    (root / "bbh-cot-prompts/boolean_expressions.txt").write_text(cot, encoding="utf-8")
    (root / "bbh").mkdir(parents=True, exist_ok=True)
    (root / "bbh/boolean_expressions.json").write_text(json.dumps({"canary": "x", "examples": [
        {"input": "not not True is", "target": "True"}, {"input": "False or False is", "target": "False"}]}))
    (root / "bbh-cot-prompts/date_understanding.txt").write_text("-----\nInfer the date.\n\n" + "\n\n".join(
        f"Q: Pick {x}.\nOptions:\n(A) a\n(B) b\nA: Let's think step by step.\nIt is {x}. So the answer is {x}."
        for x in ("(A)", "(B)", "(A)")), encoding="utf-8")
    (root / "bbh/date_understanding.json").write_text(json.dumps({"examples": [
        {"input": "Pick one.\nOptions:\n(A) x\n(B) y", "target": "(B)"}]}))
    # HumanEval
    (root / "humaneval").mkdir(parents=True, exist_ok=True)
    problems = [
        {"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n",
         "canonical_solution": "    return a + b\n", "entry_point": "add",
         "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"},
        {"task_id": "HumanEval/1", "prompt": "def double(x):\n    \"\"\"Return 2 * x.\"\"\"\n",
         "canonical_solution": "    return 2 * x\n", "entry_point": "double",
         "test": "def check(candidate):\n    assert candidate(4) == 8\n"}]
    with gzip.open(root / "humaneval/HumanEval.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(p) + "\n" for p in problems))
    # WikiText-2 raw
    (root / "wikitext2").mkdir(parents=True, exist_ok=True)
    (root / "wikitext2/wiki.test.raw").write_text(
        " \n = Robert Boulter = \n \n Robert Boulter is an English film , television and theatre actor . \n"
        " \n = = Career = = \n \n He had a guest role in 2000 . \n \n = Valkyria Chronicles III = \n \n"
        " Senjō no Valkyria 3 is a tactical role @-@ playing video game . \n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    return write_eval_fixtures(tmp_path_factory.mktemp("evaldata"))


# ---- readers on fixtures -------------------------------------------------------------------------
def test_mmlu_ceval_cmmlu(fixtures):
    m = D.load_mmlu(fixtures / "mmlu")
    assert sorted(m) == ["abstract_algebra", "anatomy"]
    it = m["abstract_algebra"][0]
    assert it.question == "abstract_algebra question 0, with a comma?" and it.choices == ["one", "two", "three", "four"]
    assert [x.answer for x in m["abstract_algebra"]] == [1, 1, 0, 2]
    c = D.load_ceval(fixtures / "ceval", "val")["accountant"]
    assert len(c) == 3 and c[0].answer == 1 and c[0].id == "accountant/0"
    assert D.load_ceval(fixtures / "ceval", "dev")["accountant"][0].meta["explanation"] == "解析"
    cm = D.load_cmmlu(fixtures / "cmmlu")["anatomy"]
    assert [x.answer for x in cm] == [0, 0, 0] and cm[1].question == "解剖题1"


def test_hellaswag_chid(fixtures):
    h = D.load_hellaswag(fixtures / "hellaswag")
    assert len(h) == 3 and [x.answer for x in h] == [0, 1, 2]
    assert h[0].question == "Activity 0: A person walks to the door and"
    assert h[0].choices[0] == " opens it."
    raw = fixtures / "hs_raw" / "hellaswag_val.jsonl"  # the original release: WikiHow markup removed
    _jsonl(raw, [{"ind": 7, "activity_label": "Home", "ctx": "How to paint. [title] Pick a brush.",
                  "endings": ["Dip it [step] in paint.", "b", "c", "d"], "label": "2"}])
    (j,) = D.load_hellaswag(raw.parent)
    assert (j.id, j.question, j.choices[0], j.answer) == ("7", "Home: How to paint.. Pick a brush.", " Dip it in paint.", 2)
    c = D.load_chid(fixtures / "chid")
    assert c[1].answer == 6 and c[1].question.startswith("#idiom#")


def test_point5_formats(fixtures):
    """CSL, EPRSTMT, AGIEval, GAOKAO-Bench and MATH in their published layouts."""
    csl = D.load_csl(fixtures / "csl")
    assert [x.answer for x in csl] == [1, 0] and csl[1].meta["keywords"] == ["氮循环", "量子计算"]
    ep = D.load_eprstmt(fixtures / "eprstmt")
    assert [x.answer for x in ep] == [1, 0] and ep[0].choices == ["消极", "积极"]
    ag = D.load_agieval(fixtures / "agieval")
    assert sorted(ag) == ["logiqa-zh", "math", "sat-math"]
    assert ag["logiqa-zh"][0].choices == ["甲", "乙", "丙", "丁"] and ag["logiqa-zh"][0].answer == 2
    assert ag["logiqa-zh"][0].meta["passage"] == "有三个人。"
    assert ag["sat-math"][1].answer == [0, 2]  # multi-answer label list
    assert ag["math"][0].choices is None and ag["math"][0].answer == "42"
    gk = D.load_gaokao(fixtures / "gaokao")["2010-2022_Math_II_MCQs"]
    assert [x.answer for x in gk] == [1, 1] and gk[0].choices == ["A", "B", "C", "D"] and gk[0].meta["year"] == "2010"
    mt = D.load_math(fixtures / "math", "test")
    assert list(mt) == ["algebra"] and [x.answer for x in mt["algebra"]] == ["0", "2"]
    assert len(D.load_math(fixtures / "math", "train")["algebra"]) == 4


def test_generation_sets(fixtures):
    g = D.load_gsm8k(fixtures / "gsm8k")
    assert g[0].answer == "999" and "<<" not in g[0].meta["solution"]
    bbh = D.load_bbh(fixtures / "bbh")
    items, prompt = bbh["boolean_expressions"]
    assert len(items) == 2 and "canary" not in prompt
    head, shots = D.split_cot_examples(prompt)
    assert head == "Answer questions about a boolean expression." and len(shots) == 3
    assert shots[0] == ("True and False is", "Let's think step by step.\nTrue and False is False. So the answer is False.")
    he = D.load_humaneval(fixtures / "humaneval")
    assert [x.id for x in he] == ["HumanEval/0", "HumanEval/1"] and he[0].meta["entry_point"] == "add"
    wt = D.load_wikitext(fixtures / "wikitext2")
    assert len(wt) == 2 and wt[0].question.startswith(" = Robert Boulter = ") and "= = Career = =" in wt[0].question


def test_bad_input_names_file_and_field(tmp_path):
    _csv(tmp_path / "mmlu/test/x_test.csv", [["q", "a", "b", "c", "d", "E"]])
    with pytest.raises(D.DataError, match=r"x_test\.csv: row 1: field 'answer' should be one of A, B, C, D, got 'E'"):
        D.load_mmlu(tmp_path / "mmlu")
    _csv(tmp_path / "mmlu2/test/y_test.csv", [["q", "a", "b"]])
    with pytest.raises(D.DataError, match=r"y_test\.csv: row 1: expected 6 columns .* got 3"):
        D.load_mmlu(tmp_path / "mmlu2")
    _jsonl(tmp_path / "eprstmt/test_public.json", [{"id": 1, "sentence": "x", "label": "Neutral"}])
    with pytest.raises(D.DataError, match=r"test_public\.json:1: field 'label' should be Positive or Negative, got 'Neutral'"):
        D.load_eprstmt(tmp_path / "eprstmt")
    _jsonl(tmp_path / "csl/test_public.json", [{"id": 1, "keyword": [], "label": "1"}])
    with pytest.raises(D.DataError, match=r"test_public\.json:1: missing field 'abst'"):
        D.load_csl(tmp_path / "csl")
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k/test.jsonl").write_text('{"question": "q", "answer": "no final"}\n')
    with pytest.raises(D.DataError, match=r"test\.jsonl:1: field 'answer' has no '#### <number>'"):
        D.load_gsm8k(tmp_path / "gsm8k")
    (tmp_path / "gsm8k/test.jsonl").write_text('{"question": "q",\n')
    with pytest.raises(D.DataError, match=r"test\.jsonl:1: not valid JSON"):
        D.load_gsm8k(tmp_path / "gsm8k")
    (tmp_path / "hs.txt").write_text("ctx\n1\na\nb\nc\n")
    with pytest.raises(D.DataError, match=r"hs\.txt: expected 6 lines per item .* got 5 lines"):
        D.load_hellaswag(tmp_path / "hs.txt")
    with pytest.raises(D.DataError, match=r"no MATH test data"):
        D.load_math(tmp_path)
    m = tmp_path / "math/test/algebra/0.json"
    m.parent.mkdir(parents=True)
    m.write_text(json.dumps({"problem": "p", "solution": "no box"}))
    with pytest.raises(D.DataError, match=r"0\.json: field 'solution' has no \\boxed"):
        D.load_math(tmp_path / "math")


# ---- readers on the shared copies ------------------------------------------------------------------
def test_shared_data_counts():
    root = shared_path("data", "eval")
    mmlu = D.load_mmlu(root / "mmlu")
    assert len(mmlu) == 57 and sum(map(len, mmlu.values())) == 14079
    assert all(len(v) == 5 for v in D.load_mmlu(root / "mmlu", "dev").values())
    ceval = D.load_ceval(root / "ceval", "val")
    assert len(ceval) == 52 and all(x.answer is not None for v in ceval.values() for x in v)
    cmmlu = D.load_cmmlu(root / "cmmlu")
    assert len(cmmlu) == 67
    for task in ("mmlu", "ceval", "cmmlu"):
        assert all(categories(task, s) for s in {"mmlu": mmlu, "ceval": ceval, "cmmlu": cmmlu}[task])
    assert len(D.load_hellaswag(root / "hellaswag")) == 10042
    assert len(D.load_chid(root / "chid")) == 2002
    assert len(D.load_gsm8k(root / "gsm8k")) == 1319
    bbh = D.load_bbh(root / "bbh")
    assert len(bbh) == 27 and all(len(D.split_cot_examples(p)[1]) == 3 for _, p in bbh.values())
    assert len(D.load_humaneval(root / "humaneval")) == 164
    pytest.importorskip("pyarrow")
    wt = D.load_wikitext(root / "wikitext2")
    assert len(wt) >= 60 and sum(len(x.question.split()) for x in wt) == 241211


# ---- extraction -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text,lang,want", [
    ("The answer is B.", "en", "B"),
    ("Answer: (C) because ...", "en", "C"),
    ("I think option D is right", "en", "D"),
    ("Actually, B", "en", "B"),  # "Actually" is not the letter A
    ("答案是C", "zh", "C"),
    ("答案：D。", "zh", "D"),
    ("正确答案应该选A，因为", "zh", "A"),
    ("经过分析，只有B是对的", "zh", "B"),
    ("选项C正确", "zh", "C"),
    ("所以D", "zh", "D"),
    ("根据题意，\n故A。", "zh", "A"),
    ("The answer is B", "zh", "B"),  # Chinese prompts fall back to the English phrasings
    ("no letter here", "en", None),
])
def test_extract_choice(text, lang, want):
    assert X.extract_choice(text, 4, lang) == want


def test_extract_choice_respects_option_count():
    assert X.extract_choice("The answer is F", 7) == "F"
    assert X.extract_choice("The answer is F", 4) is None
    assert X.extract_choices("答案：AC") == ["A", "C"]
    assert X.extract_choices("The answer is A, C and D.") == ["A", "C", "D"]


@pytest.mark.parametrize("text,want", [
    ("She has 5 + 3 = 8 apples. The answer is 8.", "8"),
    ("Total is $1,250.00 in all. The answer is $1,250.", "1250"),
    ("so 12 - 5 = 7\n#### 7", "7"),
    ("first 3, then 4, finally 10 apples", "10"),
    ("The answer is -3.5", "-3.5"),
    ("nothing", None),
])
def test_extract_number(text, want):
    assert X.extract_number(text) == want


def test_numbers_bbh_math():
    assert X.numbers_equal("18.0", "18") and not X.numbers_equal("17", "18") and not X.numbers_equal(None, "1")
    assert X.extract_bbh("... So the answer is (B).", True) == "(B)"
    assert X.extract_bbh("step 1: (A) looks wrong. So the answer is (C).", True) == "(C)"
    assert X.extract_bbh("So the answer is valid.", False) == "valid"
    assert X.bbh_equal("] ]", "] ]") and X.bbh_equal("True", "true") and not X.bbh_equal(None, "x")
    assert X.extract_math("so $x=\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert D.last_boxed("\\boxed{a} then \\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert X.normalize_math("\\dfrac12") == X.normalize_math("\\frac{1}{2}")
    assert X.normalize_math("x = 3") == "3" and X.normalize_math("90^\\circ") == "90"
    assert X.normalize_math("\\text{5 }") == "5"


# ---- metrics ----------------------------------------------------------------------------------------
def test_pass_at_k_is_the_unbiased_estimator():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                # by definition: share of the k-subsets of the n samples that contain a passing one
                subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
                want = sum(any(s) for s in subsets) / len(subsets)
                assert M.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
    assert M.pass_at_k(200, 13, 1) == pytest.approx(13 / 200)
    with pytest.raises(ValueError, match="pass@5 needs at least 5 samples"):
        M.pass_at_k(3, 1, 5)


def test_macro_micro_and_categories():
    recs = [{"subject": "abstract_algebra", "correct": c} for c in (1, 0, 0, 0)] + \
           [{"subject": "anatomy", "correct": c} for c in (1, 1)]
    g = M.group_accuracy(recs)
    assert g["macro"] == pytest.approx((0.25 + 1.0) / 2) and g["micro"] == pytest.approx(3 / 6) and g["n"] == 6
    cats = M.category_accuracy(g["subjects"], lambda s: categories("mmlu", s))
    assert cats == {"STEM": {"n": 4, "subjects": 1, "macro": 0.25, "micro": 0.25},
                    "other": {"n": 2, "subjects": 1, "macro": 1.0, "micro": 1.0}}
    assert M.pick([-3.0, -1.0, -1.0]) == 1 and M.pick_normalized([-4.0, -3.0], [4, 1]) == 0
    assert M.perplexity(2 * math.log(3), 2) == pytest.approx(3.0)
    assert categories("cmmlu", "ancient_chinese") == ["Social Science", "China specific"]

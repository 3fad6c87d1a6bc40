"""The benchmarks: where their files live, how a question becomes a prompt, how an answer is scored.

Kinds:
- "mc": multiple choice. loglik mode scores each option's continuation; generate mode asks in
  the chat format (few-shot examples as earlier turns, TeleChat's method) and extracts the letter.
- "gen": free-form answers (GSM8K, BBH, MATH, AGIEval cloze) from few-shot chain-of-thought prompts.
- "code": HumanEval completions executed in the sandbox.
- "ppl": perplexity (WikiText-2).
- "long": long context (perplexity by input length, passkey retrieval; `telechat.eval.long`), which
  read no --data-dir.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from . import data as D
from . import extract as X
from .data import LETTERS, Item
from .subjects import CEVAL_NAMES_ZH, CMMLU_NAMES_ZH, categories

_CJK = re.compile(r"[\u4e00-\u9fff]")


def options_block(choices: list[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def answer_letters(item: Item) -> str:
    return "".join(LETTERS[i] for i in item.answer) if isinstance(item.answer, list) else LETTERS[item.answer]


@dataclass
class Loaded:
    """Items to score per subject, and the few-shot example pool per subject."""
    subjects: dict[str, list[Item]]
    shots: dict[str, list[Item]]
    shots_from: str  # where the examples come from ("dev", "train", "prompt file", "none": the runner
    # then takes the first items of each subject as examples and does not score them)
    text: str | None = None  # longppl: the long text


class Task:
    name = ""
    kind = "mc"
    folder = ""  # under --data-dir
    default_shots = 0
    lang = "en"
    max_new_tokens = 32
    metrics = ("acc",)

    def load(self, root: Path) -> Loaded:
        raise NotImplementedError

    def path(self, root: Path) -> Path:
        p = Path(root) / self.folder
        if not p.exists():
            raise D.DataError(f"{p}: {self.name} data not found (expected the {self.folder}/ folder under --data-dir)")
        return p

    def categories(self, subject: str) -> list[str]:
        return categories(self.name, subject)



# ---- multiple choice ------------------------------------------------------------------------------
class MultipleChoice(Task):
    kind = "mc"
    letter_answers = True  # loglik continuations are option letters (else option texts)

    def header(self, subject: str) -> str:
        return ""

    def query(self, subject: str, item: Item) -> str:
        """The item as it appears before its answer in a loglik prompt."""
        raise NotImplementedError

    def continuations(self, subject: str, item: Item) -> list[str]:
        sep = "" if self.lang == "zh" else " "
        return [sep + LETTERS[i] for i in range(len(item.choices))]

    def shot_text(self, subject: str, item: Item) -> str:
        if isinstance(item.answer, list):
            return self.query(subject, item) + ("" if self.lang == "zh" else " ") + answer_letters(item) + "\n\n"
        return self.query(subject, item) + self.continuations(subject, item)[item.answer] + "\n\n"

    def loglik_prompt(self, subject: str, shots: list[Item], item: Item) -> tuple[str, list[str]]:
        ctx = self.header(subject) + "".join(self.shot_text(subject, s) for s in shots) + self.query(subject, item)
        return ctx, self.continuations(subject, item)

    def chat_user(self, subject: str, item: Item) -> str:
        """The item as a chat question whose reply is an option letter."""
        raise NotImplementedError

    def lang_of(self, item: Item) -> str:
        return self.lang


class MMLU(MultipleChoice):
    name, folder, default_shots = "mmlu", "mmlu", 5

    def load(self, root):
        p = self.path(root)
        return Loaded(D.load_mmlu(p, "test"), D.load_mmlu(p, "dev"), "dev")

    @staticmethod
    def _topic(subject):
        return subject.replace("_", " ")

    def header(self, subject):
        return f"The following are multiple choice questions (with answers) about {self._topic(subject)}.\n\n"

    def query(self, subject, item):
        return f"{item.question.strip()}\n{options_block(item.choices)}\nAnswer:"

    def chat_user(self, subject, item):
        # TeleChat's published MMLU prompt.
        return (f"There is a single choice question about {self._topic(subject)}. Answer the question by "
                f"replying A, B, C or D.\nQuestion: {item.question.strip()}\n{options_block(item.choices)}\nAnswer: ")


class CEval(MultipleChoice):
    name, folder, default_shots, lang = "ceval", "ceval", 5, "zh"

    def load(self, root):
        p = self.path(root)
        return Loaded(D.load_ceval(p, "val"), D.load_ceval(p, "dev"), "dev")

    def header(self, subject):
        return f"以下是中国关于{CEVAL_NAMES_ZH.get(subject, subject)}考试的单项选择题，请选出其中的正确答案。\n\n"

    def query(self, subject, item):
        return f"{item.question.strip()}\n{options_block(item.choices)}\n答案："

    def chat_user(self, subject, item):
        return self.header(subject) + self.query(subject, item)


class CMMLU(MultipleChoice):
    name, folder, default_shots, lang = "cmmlu", "cmmlu", 5, "zh"

    def load(self, root):
        p = self.path(root)
        return Loaded(D.load_cmmlu(p, "test"), D.load_cmmlu(p, "dev"), "dev")

    def header(self, subject):
        return f"以下是关于{CMMLU_NAMES_ZH.get(subject, subject)}的单项选择题，请直接给出正确答案的选项。\n\n"

    def query(self, subject, item):
        return f"题目：{item.question.strip()}\n{options_block(item.choices)}\n答案是："

    def chat_user(self, subject, item):
        return self.header(subject) + self.query(subject, item)


class HellaSwag(MultipleChoice):
    name, folder, default_shots = "hellaswag", "hellaswag", 0
    letter_answers = False
    metrics = ("acc", "acc_norm")

    def load(self, root):
        return Loaded({"hellaswag": D.load_hellaswag(self.path(root))}, {}, "none")

    def query(self, subject, item):
        return item.question

    def continuations(self, subject, item):
        return list(item.choices)

    def chat_user(self, subject, item):
        return (f"Which ending continues the text best? Answer with A, B, C or D.\n{item.question}...\n"
                f"{options_block([c.strip() for c in item.choices])}\nAnswer: ")


class CHID(MultipleChoice):
    name, folder, default_shots, lang = "chid", "chid", 0, "zh"
    letter_answers = False

    def load(self, root):
        return Loaded({"chid": D.load_chid(self.path(root))}, {}, "none")

    def query(self, subject, item):
        return item.question.split("#idiom#", 1)[0]

    def continuations(self, subject, item):
        rest = item.question.split("#idiom#", 1)[1].replace("#idiom#", "")
        return [c + rest for c in item.choices]

    def chat_user(self, subject, item):
        return (f"从下列成语中选出最适合填入#idiom#处的一个。\n{item.question}\n{options_block(item.choices)}\n答案：")


class CSL(MultipleChoice):
    name, folder, default_shots, lang = "csl", "csl", 0, "zh"
    letter_answers = False

    def load(self, root):
        return Loaded({"csl": D.load_csl(self.path(root))}, {}, "none")

    def _body(self, item):
        return f"摘要：{item.question}\n关键词：{'，'.join(item.meta['keywords'])}\n"

    def query(self, subject, item):
        return self._body(item) + "问：这些关键词都是这篇摘要的关键词吗？\n答："

    def continuations(self, subject, item):
        return list(item.choices)

    def chat_user(self, subject, item):
        return self._body(item) + f"这些关键词都是这篇摘要的关键词吗？\n{options_block(item.choices)}\n答案："


class EPRSTMT(MultipleChoice):
    name, folder, default_shots, lang = "eprstmt", "eprstmt", 0, "zh"
    letter_answers = False

    def load(self, root):
        return Loaded({"eprstmt": D.load_eprstmt(self.path(root))}, {}, "none")

    def query(self, subject, item):
        return f"评论：{item.question}\n问：这条评论的情感是积极还是消极？\n答："

    def continuations(self, subject, item):
        return list(item.choices)

    def chat_user(self, subject, item):
        return f"评论：{item.question}\n这条评论的情感是？\n{options_block(item.choices)}\n答案："


class AGIEval(MultipleChoice):
    """Multiple-choice AGIEval subsets (Chinese or English by their text); cloze subsets are free-form
    and scored in generate mode."""
    name, folder, default_shots = "agieval", "agieval", 0
    max_new_tokens = 64

    def load(self, root):
        return Loaded(D.load_agieval(self.path(root)), {}, "none")

    def lang_of(self, item):
        return "zh" if _CJK.search(item.question + (item.meta.get("passage") or "")) else "en"

    def query(self, subject, item):
        passage = (item.meta.get("passage") or "").strip()
        if self.lang_of(item) == "zh":
            return f"{passage + chr(10) if passage else ''}问题：{item.question.strip()}\n{options_block(item.choices)}\n答案："
        return f"{passage + chr(10) if passage else ''}Question: {item.question.strip()}\n{options_block(item.choices)}\nAnswer:"

    def continuations(self, subject, item):
        sep = "" if self.lang_of(item) == "zh" else " "
        return [sep + LETTERS[i] for i in range(len(item.choices))]

    def chat_user(self, subject, item):
        return self.query(subject, item) + ("" if self.lang_of(item) == "zh" else " ")

    def cloze_user(self, item):
        passage = (item.meta.get("passage") or "").strip()
        lead = "问题：" if self.lang_of(item) == "zh" else "Question: "
        tail = "\n答案：" if self.lang_of(item) == "zh" else "\nAnswer: "
        return f"{passage + chr(10) if passage else ''}{lead}{item.question.strip()}{tail}"


class GAOKAO(MultipleChoice):
    """GAOKAO-Bench objective questions (options written inside the question)."""
    name, folder, default_shots, lang = "gaokao", "gaokao", 0, "zh"

    def load(self, root):
        return Loaded(D.load_gaokao(self.path(root)), {}, "none")

    def query(self, subject, item):
        return f"{item.question}\n答案："

    def chat_user(self, subject, item):
        return f"以下是一道高考选择题，请选出正确答案。\n{item.question}\n答案："


# ---- free-form generation -------------------------------------------------------------------------
class Generation(Task):
    kind = "gen"
    max_new_tokens = 256

    def turn(self, subject: str, item: Item) -> tuple[str, str]:
        """(user message, the reference reply) of an example."""
        raise NotImplementedError

    def answer_prefix(self, subject: str) -> str:
        """Text the reply is primed with (it is part of the prompt, and of the scored reply)."""
        return ""

    def plain(self, subject: str, shots: list[Item], item: Item) -> tuple[str, list[str]]:
        """Prompt text and stop strings for models without a chat format."""
        raise NotImplementedError

    def system(self, subject: str) -> str:
        return ""

    def score(self, subject: str, item: Item, reply: str) -> tuple[str | None, bool]:
        raise NotImplementedError


class GSM8K(Generation):
    name, folder, default_shots = "gsm8k", "gsm8k", 4
    metrics = ("exact_match",)

    def load(self, root):
        p = self.path(root)
        pool = D.load_gsm8k(p, "train") if (p / "train.jsonl").exists() else []
        test = D.load_gsm8k(p, "test")
        return Loaded({"gsm8k": test}, {"gsm8k": pool} if pool else {}, "train" if pool else "none")

    def turn(self, subject, item):
        return (f"Question: {item.question}\nLet's think step by step.",
                f"{item.meta['solution']}\nThe answer is {item.answer}.")

    def plain(self, subject, shots, item):
        text = "".join(f"Question: {s.question}\nAnswer: {s.meta['solution']}\nThe answer is {s.answer}.\n\n"
                       for s in shots)
        return text + f"Question: {item.question}\nAnswer:", ["\n\n", "Question:"]

    def score(self, subject, item, reply):
        pred = X.extract_number(reply)
        return pred, X.numbers_equal(pred, item.answer)


class BBH(Generation):
    name, folder, default_shots = "bbh", "bbh", 3
    metrics = ("exact_match",)

    def load(self, root):
        tasks = D.load_bbh(self.path(root))
        subjects, shots = {}, {}
        for t, (items, prompt) in tasks.items():
            head, examples = D.split_cot_examples(prompt)
            shots[t] = [Item(f"{t}/shot{i}", t, q, None, a, {"head": head}) for i, (q, a) in enumerate(examples)]
            for it in items:
                it.meta["head"] = head
            subjects[t] = items
        return Loaded(subjects, shots, "prompt file")

    def turn(self, subject, item):
        head = item.meta.get("head", "")
        return (f"{head}\n\nQ: {item.question}" if head else f"Q: {item.question}"), item.answer

    def answer_prefix(self, subject):
        return "Let's think step by step."

    def plain(self, subject, shots, item):
        head = item.meta.get("head", "")
        text = (head + "\n\n" if head else "") + "".join(f"Q: {s.question}\nA: {s.answer}\n\n" for s in shots)
        return text + f"Q: {item.question}\nA: Let's think step by step.", ["\n\nQ:", "\n\n\n"]

    def score(self, subject, item, reply):
        mc = bool(re.fullmatch(r"\([A-R]\)", item.answer.strip()))
        pred = X.extract_bbh(reply, mc)
        return pred, X.bbh_equal(pred, item.answer)


class MATH(Generation):
    name, folder, default_shots = "math", "math", 4
    max_new_tokens = 512
    metrics = ("exact_match",)

    def load(self, root):
        p = self.path(root)
        test = D.load_math(p, "test")
        try:
            train = D.load_math(p, "train")
        except D.DataError:
            train = {}
        if train:
            pool = [it for s in sorted(train) for it in train[s][:1]] + \
                   [it for s in sorted(train) for it in train[s][1:]]
            return Loaded(test, {s: pool for s in test}, "train")
        return Loaded(test, {}, "none")

    def turn(self, subject, item):
        return f"Problem:\n{item.question}", f"Solution:\n{item.meta.get('solution') or item.answer}"

    def plain(self, subject, shots, item):
        text = "".join(f"Problem:\n{s.question}\n\nSolution:\n{s.meta.get('solution') or s.answer}\n\n\n"
                       for s in shots)
        return text + f"Problem:\n{item.question}\n\nSolution:\n", ["\n\n\nProblem:", "\nProblem:\n"]

    def score(self, subject, item, reply):
        pred = X.extract_math(reply)
        return pred, pred is not None and X.normalize_math(pred) == X.normalize_math(item.answer)


class HumanEval(Task):
    name, folder, kind, default_shots = "humaneval", "humaneval", "code", 0
    max_new_tokens = 384
    metrics = ("pass@1",)
    stop = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]

    def load(self, root):
        return Loaded({"humaneval": D.load_humaneval(self.path(root))}, {}, "none")


class WikiText2(Task):
    name, folder, kind = "wikitext2", "wikitext2", "ppl"
    metrics = ("word_perplexity", "token_perplexity", "bits_per_byte")

    def load(self, root):
        return Loaded({"wikitext2": D.load_wikitext(self.path(root), "test")}, {}, "none")


class LongPPL(Task):
    """Perplexity of the last tokens of prefixes of --long-text, by length and rotary scaling."""
    name, kind = "longppl", "long"
    metrics = ("ppl",)


class Passkey(Task):
    """A 5-digit passkey hidden at several depths of filler text, by length and rotary scaling."""
    name, kind = "passkey", "long"
    metrics = ("accuracy",)


TASKS: dict[str, Task] = {t.name: t for t in (
    MMLU(), CEval(), CMMLU(), HellaSwag(), CHID(), GSM8K(), BBH(), HumanEval(), WikiText2(),
    CSL(), EPRSTMT(), AGIEval(), GAOKAO(), MATH(), LongPPL(), Passkey())}


def get_task(name: str) -> Task:
    t = TASKS.get(name.strip().lower())
    if t is None:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return t

"""Answer extraction from generated text: option letters (English and Chinese phrasings, the
families TeleChat's MMLU and C-Eval scripts use), numbers (GSM8K), BBH answers, MATH boxed answers."""
from __future__ import annotations

import re

from .data import LETTERS, last_boxed


def _letters(n: int) -> str:
    return LETTERS[:n]


# English: "the answer is B", "Answer: (B)", "Option B", ... (case-insensitive), first match wins.
_EN_PATTERNS = [
    r"the answer is\s*\(?([{L}])\b",
    r"answer:\s*\(?([{L}])\b",
    r"option\s*\(?([{L}])\b",
    r"opt\s*\(?([{L}])\b",
]

# Chinese: 答案是B / 答案为B / 答案应该选B / 选择B / 只有B是对的 / B是正确的 / 所以B / ...; the
# ones anchored at the end look at the last line.
_ZH_PATTERNS = [
    r"答案(?:是|为|应该是|应该选|应为|选)?\s*[:：]?\s*\(?([{L}])",
    r"选择\s*([{L}])",
    r"只有选?项?\s*([{L}])\s*是?(?:对|错|不?正确|错误)",
    r"说法(?:不?对|不?正确|错误)的?选?项?的?是\s*([{L}])",
    r"([{L}])\s*(?:是正确的|是正确答案|正确)",
    r"选项\s*([{L}])\s*正确",
    r"所以答?\s*([{L}])",
    r"[\s，,：:。]*(?:故|即|因此|显然|所以)\s*([{L}])[。.]?$",
    r"(?:^|[\s，,：:是为。])([{L}])[。，,.]?$",
]


def extract_choice(text: str, n_choices: int = 4, lang: str = "en") -> str | None:
    """The option letter a generated answer picks, or None.

    lang "en" tries the English phrasings, "zh" the Chinese ones first and then the English;
    if no phrasing matches, the first standalone option letter, then any option letter.
    """
    letters = _letters(n_choices)
    text = text.strip()
    families = ([(p, re.M) for p in _ZH_PATTERNS] if lang == "zh" else []) + \
               [(p, re.I) for p in _EN_PATTERNS]
    for pattern, flags in families:
        m = re.search(pattern.replace("{L}", letters), text, flags)
        if m:
            return m.group(1).upper()
    m = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", text)
    if m:
        return m.group(1)
    m = re.search(rf"[{letters}]", text)
    return m.group(0) if m else None


def extract_choices(text: str, n_choices: int = 4) -> list[str]:
    """All option letters of a multi-answer reply ('答案：AC', 'the answer is A, C'): the letters right
    after an answer phrase, else the standalone letters of the first line."""
    letters = _letters(n_choices)
    m = re.search(rf"(?:答案|answer)(?:\s*(?:是|为|is))?\s*[:：]?\s*((?:\(?[{letters}]\)?(?:\s*(?:,|，|、|和|and)\s*|\s*)?)+)",
                  text, re.I)
    if m:  # letters right after the phrase may touch ("AC")
        return sorted(set(re.findall(rf"[{letters}]", m.group(1))))
    first = text.strip().splitlines()[0] if text.strip() else ""
    return sorted(set(re.findall(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", first)))


_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


def _clean_number(s: str) -> str:
    s = s.replace(",", "").replace("$", "").rstrip(".")
    try:
        v = float(s)
    except ValueError:
        return s
    return str(int(v)) if v == int(v) else repr(v)


def extract_number(text: str) -> str | None:
    """GSM8K: the number after 'the answer is' (else after '####'), else the last number in the text."""
    for pattern in (rf"answer is\s*[:：]?\s*\$?\s*({_NUMBER})", rf"####\s*({_NUMBER})"):
        m = re.search(pattern, text, re.I)
        if m:
            return _clean_number(m.group(1))
    nums = re.findall(_NUMBER, text)
    return _clean_number(nums[-1]) if nums else None


def numbers_equal(pred: str | None, gold: str) -> bool:
    if pred is None:
        return False
    try:
        return abs(float(_clean_number(pred)) - float(_clean_number(gold))) < 1e-6
    except ValueError:
        return _clean_number(pred) == _clean_number(gold)


def extract_bbh(text: str, multiple_choice: bool) -> str | None:
    """BBH CoT: what follows the last 'the answer is' (an '(X)' option for multiple-choice tasks)."""
    i = text.lower().rfind("answer is")
    tail = text[i + len("answer is"):] if i >= 0 else text
    if multiple_choice:
        m = re.search(r"\(([A-R])\)", tail) or (re.search(r"\b([A-R])\b", tail) if i >= 0 else None)
        return f"({m.group(1)})" if m else None
    if i < 0:
        return None
    ans = tail.strip().split("\n")[0].strip()
    return re.sub(r"\.$", "", ans).strip() or None


def bbh_equal(pred: str | None, target: str) -> bool:
    if pred is None:
        return False
    norm = lambda s: " ".join(s.strip().strip(".").split()).lower()  # noqa: E731
    return norm(pred) == norm(target)


def normalize_math(ans: str) -> str:
    """A light MATH answer normalization: spacing, \\left/\\right, \\dfrac, units in \\text{}, degrees, '$'."""
    s = ans.strip().strip("$").strip()
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
    for a, b in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("dfrac", "frac"),
                 ("tfrac", "frac"), ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""), ("%", ""), ("\\$", "")):
        s = s.replace(a, b)
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"^([a-zA-Z]\w*)=", "", s)  # "x=3" -> "3"
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return s


def extract_math(text: str) -> str | None:
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    m = re.search(r"answer is\s*\$?([^$\n]+?)\$?\s*(?:\.|$)", text, re.I | re.M)
    return m.group(1) if m else None

"""Language identification, boilerplate lines, Chinese and English quality rules, sensitive words."""
from __future__ import annotations

import re
from collections import Counter
from importlib import resources
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.filters.gopher_repetition_filter import find_all_duplicate, find_duplicates
from datatrove.utils.text import PUNCTUATION_SET, split_into_words
from datatrove.utils.word_tokenizers import WordTokenizer

from .base import CleanStep
from .text import (DIGIT_RE, HAN_RE, LETTER_RE, MOJIBAKE_RE, SPACE_RE, SYMBOL_RE, UPPER_RE, detect_language, prose,
                   rare_han_share)

DEFAULT_WORD_LIST = "sensitive_words.txt"
_PARA_RE = re.compile(r"\n{2,}")
_LINES_RE = re.compile(r"\n+")


class LanguageStep(CleanStep):
    """Script statistics decide zh / en / other (see text.detect_language); the language and its
    score go to metadata["language"], ["language_score"]."""

    name = "🌐 language"

    def __init__(self, key: str, lcfg: dict, **kw):
        super().__init__(key, **kw)
        self.keep = tuple(lcfg["keep"])
        self.params = {k: lcfg[k] for k in ("zh_min_han_share", "max_kana_share", "en_min_latin_share",
                                            "en_min_stopword_share")}

    def process(self, doc):
        lang, score, why = detect_language(doc.text, **self.params)
        doc.metadata["language"] = lang
        doc.metadata["language_score"] = score
        self.account.count(f"identified_{lang}")
        if lang not in self.keep:
            return f"language_{lang}", why
        return None


class BoilerplateStep(CleanStep):
    """Removes short lines matching boilerplate patterns (navigation, copyright, "点击查看", share
    buttons, ...); removes the document when boilerplate was more than `max_removed_fraction`."""

    name = "🧽 boilerplate"

    def __init__(self, key: str, bcfg: dict, **kw):
        super().__init__(key, **kw)
        self.max_line_chars = bcfg["max_line_chars"]
        self.max_removed_fraction = bcfg["max_removed_fraction"]
        self.patterns = list(bcfg["patterns"])
        self.regex = re.compile("|".join(f"(?:{p})" for p in self.patterns), re.I | re.M) if self.patterns else None

    def process(self, doc):
        if self.regex is None:
            return None
        text = doc.text
        lines = text.split("\n")
        short = [ln.strip() for ln in lines if len(ln) <= self.max_line_chars or len(ln.strip()) <= self.max_line_chars]
        if not any(s and self.regex.search(s) for s in short):  # prose lines are long: this is usually all
            return None
        kept, removed_chars, removed_lines, first = [], 0, 0, None
        for line in lines:
            s = line.strip()
            if s and len(s) <= self.max_line_chars and self.regex.search(s):
                removed_chars += len(line)
                removed_lines += 1
                first = first or s
                continue
            kept.append(line)
        if not removed_lines:
            return None
        self.account.count("lines_removed", removed_lines)
        if removed_chars / max(1, len(text)) > self.max_removed_fraction:
            return "boilerplate", f"{removed_lines} boilerplate lines, {removed_chars / len(text):.0%} of the text, e.g. {first!r}"
        doc.text = "\n".join(kept).strip("\n")
        return None


class RegexWordTokenizer(WordTokenizer):
    """English words, numbers and single punctuation marks, for datatrove's Gopher filters (passed
    as their `language`, datatrove's hook for custom tokenizers). Its spaCy tokenizer gives nearly
    the same words but frees its lexicon after every document, which made it ~90% of the rule
    stages' time here."""

    WORD = re.compile(r"https?://\S+|\w+(?:['’.-]\w+)*|[^\w\s]+")  # "...", "--" and URLs are one token each
    SENT = re.compile(r"[^.!?\n]+(?:[.!?]+|\n|$)")

    def __init__(self):
        super().__init__("en")

    def word_tokenize(self, text: str) -> list[str]:
        return self.WORD.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [s.strip() for s in self.SENT.findall(text) if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in self.SENT.finditer(text) if m.group().strip()]


def gopher_language(tokenizer: str):
    """`language` for datatrove's Gopher filters: "en" (its spaCy tokenizer) or our regex one."""
    return "en" if tokenizer == "spacy" else RegexWordTokenizer()


def _prose_doc(doc):
    view = prose(doc.text)
    return doc if view is doc.text else Document(text=view, id=doc.id, metadata=doc.metadata)


class GopherRepetition(GopherRepetitionFilter):
    """datatrove's Gopher repetition filter on the document's prose (text.prose: code blocks and
    table rules repeat by nature), skipping its duplicated n-gram scans (a Python loop per n) when
    no n-gram of the smallest size repeats, in which case no longer one can: same result."""

    def filter(self, doc):
        doc = _prose_doc(doc)
        if self.dup_n_grams:
            words = split_into_words(doc.text, self.language)
            k = min(n for n, _ in self.dup_n_grams)
            grams = [tuple(words[i:i + k]) for i in range(len(words) - k + 1)]
            if len(set(grams)) == len(grams):
                saved, self.dup_n_grams = self.dup_n_grams, ()
                try:
                    return super().filter(doc)
                finally:
                    self.dup_n_grams = saved
        return super().filter(doc)


class GopherQuality(GopherQualityFilter):
    """datatrove's Gopher quality filter with two changes measured on the evaluation set
    (benchmarks/clean_quality.py): the share of words with a letter counts whitespace-separated
    words, as the Gopher paper defines it (datatrove counts every punctuation token as a word
    without letters, which removed a third of well-formed lists and most documentation); and the
    statistics other than the word and stop-word counts are taken on the prose (text.prose)."""

    def filter(self, doc):
        text = doc.text
        words = split_into_words(text, self.language)
        content = [w for w in words if any(ch not in PUNCTUATION_SET for ch in w)]
        if self.min_doc_words and len(content) < self.min_doc_words:
            return False, "gopher_short_doc"
        if self.max_doc_words and len(content) > self.max_doc_words:
            return False, "gopher_long_doc"
        if self.min_stop_words and len(self.stop_words.intersection(words)) < self.min_stop_words:
            return False, "gopher_enough_stop_words"
        view = prose(text)
        if view is not text:
            words = split_into_words(view, self.language)
            content = [w for w in words if any(ch not in PUNCTUATION_SET for ch in w)] or content
        n_words = max(1, len(words))
        avg = sum(map(len, content)) / max(1, len(content))
        if self.min_avg_word_length and avg < self.min_avg_word_length:
            return False, "gopher_below_avg_threshold"
        if self.max_avg_word_length and avg > self.max_avg_word_length:
            return False, "gopher_above_avg_threshold"
        if self.max_symbol_word_ratio and view.count("#") / n_words > self.max_symbol_word_ratio:
            return False, "gopher_too_many_hashes"
        if self.max_symbol_word_ratio and (view.count("...") + view.count("…")) / n_words > self.max_symbol_word_ratio:
            return False, "gopher_too_many_ellipsis"
        lines = [ln for ln in view.splitlines() if ln.strip()] or [""]
        if self.max_bullet_lines_ratio and \
                sum(ln.lstrip().startswith(("•", "-")) for ln in lines) / len(lines) > self.max_bullet_lines_ratio:
            return False, "gopher_too_many_bullets"
        if self.max_ellipsis_lines_ratio and \
                sum(ln.rstrip().endswith(("...", "…")) for ln in lines) / len(lines) > self.max_ellipsis_lines_ratio:
            return False, "gopher_too_many_end_ellipsis"
        ws = view.split()
        if self.max_non_alpha_words_ratio and ws and \
                sum(any(c.isalpha() for c in w) for w in ws) / len(ws) < self.max_non_alpha_words_ratio:
            return False, "gopher_below_alpha_threshold"
        return True


def top_ngram_chars(seq: str, n: int) -> int:
    """Characters covered by the most frequent character n-gram (Gopher's top n-gram fraction).
    Overlapping occurrences ("哈哈哈" holds "哈哈" twice) cover their characters once."""
    if len(seq) < n:
        return 0
    gram, count = Counter(seq[i:i + n] for i in range(len(seq) - n + 1)).most_common(1)[0]
    if count == 1:
        return n
    covered, end, i = 0, 0, seq.find(gram)
    while i >= 0:
        covered += n - max(0, end - i)
        end = i + n
        i = seq.find(gram, i + 1)
    return covered


def _length_reason(c: dict, n: int, lang: str) -> str | None:
    if c["min_chars"] and n < c["min_chars"]:
        return f"{lang}_too_short ({n} < {c['min_chars']} chars)"
    if c["max_chars"] and n > c["max_chars"]:
        return f"{lang}_too_long ({n} > {c['max_chars']} chars)"
    return None


def _mojibake_reason(c: dict, text: str, lang: str) -> str | None:
    """Characters of mis-decoded text (text.MOJIBAKE_RE) and, for Chinese, rarely used Han
    characters (UTF-8 read as GBK), as fractions."""
    limit = c.get("max_mojibake_fraction")
    if limit is not None:
        bad = sum(map(len, MOJIBAKE_RE.findall(text)))
        if bad and bad / max(1, len(text) - len(SPACE_RE.findall(text))) > limit:
            return f"{lang}_mojibake ({bad / max(1, len(text)):.2f})"
    limit = c.get("max_rare_han_fraction")
    if limit is not None:
        share, han = rare_han_share(text)
        if han >= 20 and share > limit:
            return f"{lang}_mojibake (rare Han {share:.2f})"
    return None


def _shape_reason(c: dict, text: str, visible: int, lang: str) -> str | None:
    """Mean line length, symbol and digit fractions (of the non-space characters)."""
    lines = [ln for ln in text.split("\n") if ln.strip()]
    mean = sum(map(len, lines)) / max(1, len(lines))
    if c["min_mean_line_chars"] and mean < c["min_mean_line_chars"]:
        return f"{lang}_short_lines (mean {mean:.1f} chars)"
    if c["max_mean_line_chars"] and mean > c["max_mean_line_chars"]:
        return f"{lang}_long_lines (mean {mean:.0f} chars)"
    sym = len(SYMBOL_RE.findall(text)) / visible
    if c["max_symbol_fraction"] is not None and sym > c["max_symbol_fraction"]:
        return f"{lang}_symbols ({sym:.2f})"
    dig = len(DIGIT_RE.findall(text)) / visible
    if c["max_digit_fraction"] is not None and dig > c["max_digit_fraction"]:
        return f"{lang}_digits ({dig:.2f})"
    return None


class _LanguageRules(BaseFilter):
    """A rule set configured by its `clean.yaml` section (every key but `enabled`)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.c = {k: v for k, v in cfg.items() if k != "enabled"}


class ChineseRules(_LanguageRules):
    """Rules for Chinese documents. Gopher's repetition statistics on characters (not words: Chinese
    has no spaces, and a word tokenizer's errors would count as repetition)."""

    name = "🀄 rules zh"

    def filter(self, doc):
        c, text = self.c, doc.text
        if reason := _length_reason(c, len(text), "zh"):
            return False, reason
        if reason := _mojibake_reason(c, text, "zh"):
            return False, reason
        text = prose(text)  # statistics of the prose: code and table layout are not Chinese text
        n = len(text)
        visible = n - len(SPACE_RE.findall(text)) or 1
        han = len(HAN_RE.findall(text))
        if c["min_han_fraction"] and han / visible < c["min_han_fraction"]:
            return False, f"zh_low_han_fraction ({han / visible:.2f})"
        if reason := _shape_reason(c, text, visible, "zh"):
            return False, reason
        paras = _PARA_RE.split(text.strip())
        dup, dup_chars = find_duplicates(paras)
        if c["max_dup_para_fraction"] is not None and dup / len(paras) > c["max_dup_para_fraction"]:
            return False, "zh_dup_para_fraction"
        if c["max_dup_para_char_fraction"] is not None and dup_chars / n > c["max_dup_para_char_fraction"]:
            return False, "zh_dup_para_char_fraction"
        lns = _LINES_RE.split(text)
        dup, dup_chars = find_duplicates(lns)
        if c["max_dup_line_fraction"] is not None and dup / len(lns) > c["max_dup_line_fraction"]:
            return False, "zh_dup_line_fraction"
        if c["max_dup_line_char_fraction"] is not None and dup_chars / n > c["max_dup_line_char_fraction"]:
            return False, "zh_dup_line_char_fraction"
        # n-grams over the characters with whitespace removed
        chars = SPACE_RE.sub("", text)
        m = len(chars) or 1
        for k, frac in c["top_ngrams"]:
            top = top_ngram_chars(chars, k)
            if top / m > frac:
                return False, f"zh_top_{k}_gram ({top / m:.2f})"
        dup = c["dup_ngrams"]
        if dup:
            k0 = min(k for k, _ in dup)  # no repeated k0-gram: no repeated longer one either
            grams = [chars[i:i + k0] for i in range(len(chars) - k0 + 1)]
            if len(set(grams)) < len(grams):
                for k, frac in dup:
                    d = find_all_duplicate(chars, k)  # datatrove's Gopher routine, characters as tokens
                    if d / m > frac:
                        return False, f"zh_dup_{k}_gram ({d / m:.2f})"
        return True


class EnglishRules(_LanguageRules):
    """Length, line, symbol, digit and upper-case rules for English (word statistics are left to
    datatrove's Gopher filters after this one)."""

    name = "🔤 rules en"

    def filter(self, doc):
        c, text = self.c, doc.text
        if reason := _length_reason(c, len(text), "en"):
            return False, reason
        if reason := _mojibake_reason(c, text, "en"):
            return False, reason
        text = prose(text)
        n = len(text)
        visible = n - len(SPACE_RE.findall(text)) or 1
        if reason := _shape_reason(c, text, visible, "en"):
            return False, reason
        letters = len(LETTER_RE.findall(text))
        if letters and c["max_uppercase_fraction"] is not None:
            up = len(UPPER_RE.findall(text)) / letters
            if up > c["max_uppercase_fraction"]:
                return False, f"en_uppercase ({up:.2f})"
        return True


def reason_key(reason: str) -> tuple[str, str | None]:
    """"zh_digits (0.41)" -> ("zh_digits", "0.41"): counts group by the rule, the value is detail."""
    name, _, rest = reason.partition(" (")
    return name, rest.rstrip(")") or None


class RuleStep(CleanStep):
    """A rule filter (ours or datatrove's) restricted to some languages."""

    def __init__(self, key: str, inner: BaseFilter, **kw):
        self.name = inner.name  # before PipelineStep.__init__, which names its stats after it
        super().__init__(key, **kw)
        self.inner = inner

    def process(self, doc):
        res = self.inner.filter(doc)
        keep, reason = res if isinstance(res, tuple) else (res, None)
        if keep:
            return None
        return reason_key(reason or self.key)


def load_word_list(path: str | None) -> list[str]:
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: sensitive word list not found")
        text = p.read_text(encoding="utf-8")
    else:
        text = resources.files(__package__).joinpath(DEFAULT_WORD_LIST).read_text(encoding="utf-8")
    words = []
    for line in text.splitlines():
        w = line.split("#", 1)[0].strip()
        if w:
            words.append(w)
    return words


def _trie_regex(words: list[str]) -> str:
    """A regex matching any of `words` (longest first), nested by common prefix so the engine tests
    one branch per character instead of every word at every position."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict) -> str:
        branches = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        optional = "" in node
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if optional:
            body = ("(?:" + body + ")?") if len(branches) == 1 else body + "?"
        return body

    return build(trie)


def compile_words(words: list[str]) -> re.Pattern | None:
    """Case-insensitive match of any word; ASCII words only as whole words ("class" is not "ass")."""
    words = sorted({w.lower() for w in words})
    if not words:
        return None
    parts = []
    ascii_words = [w for w in words if w.isascii()]
    other = [w for w in words if not w.isascii()]
    if ascii_words:
        parts.append(rf"(?<![a-z0-9]){_trie_regex(ascii_words)}(?![a-z0-9])")
    if other:
        parts.append(_trie_regex(other))
    return re.compile("|".join(parts), re.I)


class SensitiveWordStep(CleanStep):
    """Density of words from a replaceable list (matched characters / characters)."""

    name = "⛔ sensitive words"

    def __init__(self, key: str, scfg: dict, **kw):
        super().__init__(key, **kw)
        self.word_list, self.max_density, self.min_matches = scfg["word_list"], scfg["max_density"], scfg["min_matches"]
        self.words = load_word_list(self.word_list)  # read here so a missing file fails before any task
        self.regex = None

    def start(self, rank, world_size):
        self.regex = compile_words(self.words)

    def process(self, doc):
        if self.regex is None:
            return None
        hits = self.regex.findall(doc.text)
        if not hits:
            return None
        self.account.count("docs_with_matches")
        density = sum(map(len, hits)) / max(1, len(doc.text))
        if len(hits) >= (self.min_matches or 1) and density > self.max_density:
            top = ", ".join(w for w, _ in Counter(h.lower() for h in hits).most_common(3))
            return "sensitive_words", f"{len(hits)} matches, density {density:.3f} ({top})"
        return None

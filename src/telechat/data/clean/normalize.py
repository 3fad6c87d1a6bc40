"""Normalisation: Unicode NFKC where it cannot change meaning, control characters, whitespace runs
and a full-width punctuation policy."""
from __future__ import annotations

import re
import unicodedata

from .base import CleanStep
from .text import HAN

# Full-width punctuation and its ASCII twin: the punctuation policy decides between them.
FULLWIDTH_PUNCT = {"，": ",", "。": ".", "！": "!", "？": "?", "；": ";", "：": ":", "（": "(", "）": ")"}
ASCII_TO_FULL = {v: k for k, v in FULLWIDTH_PUNCT.items()}

# Ranges whose NFKC mapping only changes the form, never the meaning: full-width ASCII letters and
# digits, half-width katakana/hangul, compatibility ideographs, Kangxi and CJK radicals (typical of
# PDF extraction), Latin ligatures, and exotic spaces. Not: superscripts, circled or fraction
# digits, units (㎡), ellipsis, which NFKC would flatten ("x²" -> "x2").
_SAFE_RANGES = [(0xFF01, 0xFF5E), (0xFF61, 0xFFDC), (0xF900, 0xFAFF), (0x2F00, 0x2FDF), (0x2E80, 0x2EFF),
                (0xFB00, 0xFB06), (0x2F800, 0x2FA1F)]
_SPACES = "\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u3000"


def _safe_nfkc_table() -> dict[int, str]:
    table: dict[int, str] = {}
    for lo, hi in _SAFE_RANGES:
        for cp in range(lo, hi + 1):
            ch = chr(cp)
            if ch in FULLWIDTH_PUNCT:  # left to the punctuation policy
                continue
            mapped = unicodedata.normalize("NFKC", ch)
            if mapped != ch:
                table[cp] = mapped
    for ch in _SPACES:
        table[ord(ch)] = " "
    return table


SAFE_NFKC = _safe_nfkc_table()
# C0/C1 controls except tab and newline; zero-width and bidi marks; BOM; soft hyphen.
ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # terminal colour codes (e.g. Debian fortunes-zh)
CONTROL_RE = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\u200b\u200c\u200e\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff\u00ad]")
PAGE_BREAK_RE = re.compile("[\x0b\x0c\u2028\u2029]")
INNER_SPACE_RE = re.compile(r"(?<=\S)[ \t]{2,}")
TRAILING_SPACE_RE = re.compile(r"[ \t]+$", re.M)
LEADING_SPACE_CJK_RE = re.compile(f"^[ \\t]+(?=[{HAN}“‘《（【「])", re.M)
MANY_NEWLINES_RE = re.compile(r"\n{3,}")
# ASCII punctuation touching a Han character; '.' only after Han and before Han/space/end (not 3.14).
TO_FULL_RE = re.compile(f"(?<=[{HAN}])[,!?;:]|[,!?;:](?=[{HAN}])|(?<=[{HAN}])\\.(?=[{HAN}]|\\s|$)")
PAREN_TO_FULL_RE = re.compile(f"\\(([^()\\n]*[{HAN}][^()\\n]*)\\)")
# Full-width punctuation between Latin letters/digits (no Han on either side); parentheses around Latin.
TO_HALF_RE = re.compile("(?<=[A-Za-z0-9)\"'])[，。！？；：](?=[ \\t]*[A-Za-z(\"'])")
PAREN_TO_HALF_RE = re.compile(f"（([^（）\\n{HAN}]*)）")


def _to_full(m: re.Match) -> str:
    return ASCII_TO_FULL[m.group(0)]


def _to_half(m: re.Match) -> str:
    s = FULLWIDTH_PUNCT[m.group(0)]
    end = m.end()
    text = m.string
    # "Hello，world" -> "Hello, world": a space after , . ! ? ; : when a word follows directly
    if s in ",.!?;:" and end < len(text) and text[end].isalnum():
        return s + " "
    return s


class Normalizer:
    """Pure text normalisation (the step below wraps it)."""

    def __init__(self, nfkc: str = "safe", remove_control: bool = True, collapse_whitespace: bool = True,
                 punctuation: str = "contextual", traditional_to_simplified: bool = False):
        self.nfkc, self.remove_control, self.collapse = nfkc, remove_control, collapse_whitespace
        self.punctuation, self.t2s = punctuation, traditional_to_simplified
        self._opencc = None

    def converter(self):
        if self._opencc is None:
            try:
                from opencc import OpenCC
            except ImportError:
                raise ImportError("normalize.traditional_to_simplified needs OpenCC: "
                                  "pip install opencc-python-reimplemented (or opencc)") from None
            try:
                self._opencc = OpenCC("t2s")
            except Exception:  # the C++ `opencc` package names its configs with .json
                self._opencc = OpenCC("t2s.json")
        return self._opencc

    def __call__(self, text: str, counts: dict | None = None) -> str:
        counts = counts if counts is not None else {}
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if self.remove_control:
            text, n = ANSI_RE.subn("", text)
            text, m = CONTROL_RE.subn("", text)
            n += m
            counts["control_chars_removed"] = counts.get("control_chars_removed", 0) + n
            text = PAGE_BREAK_RE.sub("\n", text)
        if self.nfkc == "full":
            new = unicodedata.normalize("NFKC", text)
        elif self.nfkc == "safe":
            new = text.translate(SAFE_NFKC)
            if not unicodedata.is_normalized("NFC", new):
                new = unicodedata.normalize("NFC", new)
        else:
            new = text
        if new != text:
            counts["nfkc_changed_docs"] = counts.get("nfkc_changed_docs", 0) + 1
        text = new
        if self.t2s:
            new = self.converter().convert(text)
            if new != text:
                counts["t2s_changed_docs"] = counts.get("t2s_changed_docs", 0) + 1
            text = new
        if self.punctuation == "contextual":
            text, a = TO_FULL_RE.subn(_to_full, text)
            text, b = PAREN_TO_FULL_RE.subn(r"（\1）", text)
            text, c = TO_HALF_RE.subn(_to_half, text)
            text, d = PAREN_TO_HALF_RE.subn(r"(\1)", text)
            counts["punctuation_converted"] = counts.get("punctuation_converted", 0) + a + b + c + d
        elif self.punctuation == "halfwidth":
            text, a = re.subn("[，。！？；：（）]", lambda m: FULLWIDTH_PUNCT[m.group(0)], text)
            counts["punctuation_converted"] = counts.get("punctuation_converted", 0) + a
        if self.collapse:
            text = INNER_SPACE_RE.sub(" ", text)  # leading indentation (code) is kept
            text = TRAILING_SPACE_RE.sub("", text)
            text = LEADING_SPACE_CJK_RE.sub("", text)  # Chinese paragraph indentation ("　　")
            text = MANY_NEWLINES_RE.sub("\n\n", text)
            text = text.strip("\n ")
        return text


class NormalizeStep(CleanStep):
    name = "✂️ normalise"

    def __init__(self, key: str, ncfg: dict, **kw):
        super().__init__(key, **kw)
        self.normalizer = Normalizer(**{k: v for k, v in ncfg.items() if k != "enabled"})

    def start(self, rank, world_size):
        if self.normalizer.t2s:
            self.normalizer.converter()  # fail early, once

    def process(self, doc):
        counts: dict = {}
        doc.text = self.normalizer(doc.text, counts)
        for k, v in counts.items():
            self.account.count(k, v)
        return None


"""Character classes and script statistics shared by the cleaning stages (compiled once per process)."""
from __future__ import annotations

import re

import regex

HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef\U00030000-\U0003134f"
HAN_RE = re.compile(f"[{HAN}]")
KANA_RE = re.compile("[\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9f]")
HANGUL_RE = re.compile("[\uac00-\ud7af\u1100-\u11ff\u3130-\u318f]")
LATIN_WORD_RE = re.compile(r"[A-Za-z\u00c0-\u024f]+(?:['’][A-Za-z]+)?")
# words of any other alphabetic script (Cyrillic, Greek, Arabic, Hebrew, Indic, Thai, ...)
OTHER_WORD_RE = regex.compile(r"[\p{L}&&[^\p{Latin}\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]]+", regex.V1)
DIGIT_RE = re.compile(r"\d")
SPACE_RE = re.compile(r"\s")
UPPER_RE = re.compile(r"[A-Z]")
LETTER_RE = re.compile(r"[A-Za-z]")
# symbols: Unicode category S (math, currency, modifiers, emoji and other pictographs) and ASCII noise
SYMBOL_RE = regex.compile(r"[\p{S}#*|~_\\@\[\]{}<>^]")

# English function words: their share among Latin words separates English from other Latin-script
# languages and from code or lists of names.
EN_STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
once only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours yourself yourselves
""".split())


def script_units(text: str) -> dict:
    """Counts of Han characters, kana, hangul, Latin words and other-script words."""
    latin = LATIN_WORD_RE.findall(text)
    return {
        "han": len(HAN_RE.findall(text)),
        "kana": len(KANA_RE.findall(text)),
        "hangul": len(HANGUL_RE.findall(text)),
        "latin_words": latin,
        "other_words": len(OTHER_WORD_RE.findall(text)),
    }


def detect_language(text: str, zh_min_han_share: float = 0.5, max_kana_share: float = 0.05,
                    en_min_latin_share: float = 0.8, en_min_stopword_share: float = 0.12,
                    sample_chars: int = 20000) -> tuple[str, float, str]:
    """(language, score, why): "zh", "en" or "other", from script statistics of the first
    `sample_chars` characters. A Han character and a word of another script count as one unit
    each, so "用 pip install 安装" is Chinese while an English page quoting a Chinese name is not."""
    s = text[:sample_chars]
    u = script_units(s)
    latin = u["latin_words"]
    han, kana, hangul = u["han"], u["kana"], u["hangul"]
    units = han + kana + hangul + len(latin) + u["other_words"]
    if units == 0:
        return "other", 0.0, "no letters"
    if kana > max_kana_share * (han + kana) and kana >= 3:
        return "other", kana / units, f"kana share {kana / (han + kana):.2f} (Japanese)"
    han_share = han / units
    if han_share >= zh_min_han_share:
        return "zh", round(han_share, 4), f"Han share {han_share:.2f}"
    latin_share = len(latin) / units
    if latin_share >= en_min_latin_share and latin:
        stop = sum(1 for w in latin if w.lower() in EN_STOPWORDS) / len(latin)
        if stop >= en_min_stopword_share:
            return "en", round(min(1.0, latin_share * stop / 0.4), 4), f"Latin share {latin_share:.2f}, stop words {stop:.2f}"
        return "other", round(stop, 4), f"Latin words, stop-word share {stop:.2f} < {en_min_stopword_share}"
    return "other", round(max(han_share, latin_share), 4), \
        f"Han share {han_share:.2f}, Latin share {latin_share:.2f}, other scripts {u['other_words'] / units:.2f}"


def han_share_quick(text: str, sample_chars: int = 4000) -> float:
    """Han characters / non-space characters of the first `sample_chars` (for choosing shingles)."""
    s = text[:sample_chars]
    n = len(s) - len(SPACE_RE.findall(s))
    return len(HAN_RE.findall(s)) / n if n else 0.0


# ---- the prose of a document, for the statistics of the rules ----------------------------------------
# Markdown that SFT answers and documentation use (fenced code, tables, headings, bullets, emphasis)
# is layout, not content: code repeats lines and symbols, a table's rules are dashes and bars.
_FENCE_RE = re.compile(r"^[ \t]*(```|~~~)[^\n]*\n.*?(?:^[ \t]*\1[ \t]*$|\Z)", re.M | re.S)
_TABLE_RULE_RE = re.compile(r"^[ \t]*\|?(?:[ \t]*:?-{2,}:?[ \t]*\|)+[ \t]*(?::?-{2,}:?[ \t]*)?$", re.M)
_TABLE_ROW_RE = re.compile(r"^[ \t]*\|(.*)\|[ \t]*$", re.M)
_MARKUP_RE = re.compile(r"^[ \t]*(?:#{1,6}[ \t]+|[-*+•][ \t]+|>[ \t]?)|\*\*|__|`", re.M)
# TeX formulas, inline code, and reStructuredText directives, field lines and section underlines
_MATH_RE = re.compile(r"\$\$.+?\$\$|\\\[.+?\\\]|\\\(.+?\\\)|(?<![\w$])\$[^$\n]{1,200}\$(?![\w$])", re.S)
_INLINE_CODE_RE = re.compile(r"`[^`\n]+`")
_ROLE_RE = re.compile(r":[\w.+-]+(?::[\w.+-]+)*:`~?([^`<\n]+?)\s*(?:<[^>\n]*>)?`")  # :c:func:`PyDict_New` -> PyDict_New
_EMPHASIS_RE = re.compile(r"(?<![\w*])\*([^\s*][^*\n]*?)\*(?![\w*])")
_REST_RE = re.compile(r"^[ \t]*(?:\.\. [^\n]*|:[\w -]+:(?:[ \t][^\n]*)?|([=\-#~^*+\"'`:.])\1{2,}[ \t]*)$", re.M)
_MARKUP_CHARS = frozenset("`|#*-_>•~$\\.=")


def prose(text: str) -> str:
    """`text` without fenced and inline code, TeX formulas, reStructuredText directives and
    section underlines, table rules and bars, heading/bullet/quote markers and emphasis; the
    text itself when that leaves nothing."""
    if not _MARKUP_CHARS.intersection(text):
        return text
    t = _FENCE_RE.sub("", text)
    t = _MATH_RE.sub(" ", t)
    t = _ROLE_RE.sub(r"\1", t)
    t = _INLINE_CODE_RE.sub(" ", t)
    t = _EMPHASIS_RE.sub(r"\1", t)
    t = _REST_RE.sub("", t)
    t = _TABLE_RULE_RE.sub("", t)
    t = _TABLE_ROW_RE.sub(lambda m: m.group(1).replace("|", " "), t)
    t = _MARKUP_RE.sub("", t)
    return t if t.strip() else text


# ---- mojibake -----------------------------------------------------------------------------------------
# U+FFFD, "锟斤拷"/"烫烫烫"/"屯屯屯" (GBK bytes that went through U+FFFD or uninitialised memory), and
# UTF-8 read as cp1252/latin-1 ("â€™", "Ã©"): a lead byte's character before a continuation byte's.
MOJIBAKE_RE = re.compile("\ufffd+|(?:锟斤拷)+|烫{2,}|屯{2,}|[ÂÃÅâäåæçèéêëðïî][\u0080-\u00bf€‚ƒ„…†‡ˆ‰Š‹ŒŽ‘’“”•–—˜™š›œžŸ]")
_COMMON_HAN: dict[str, bool] = {}


def common_han(ch: str) -> bool:
    """Is `ch` one of the frequently used characters (GB2312 level 1, or Big5's frequent set)? UTF-8
    read as GBK turns text into a stream of rarely used characters (中文 -> 涓枃)."""
    v = _COMMON_HAN.get(ch)
    if v is None:
        v = False
        try:
            v = 0xB0 <= ch.encode("gb2312")[0] <= 0xD7
        except UnicodeEncodeError:
            pass
        if not v:
            try:
                b = ch.encode("big5")
                v = 0xA440 <= (b[0] << 8 | b[1]) <= 0xC67E
            except UnicodeEncodeError:
                pass
        _COMMON_HAN[ch] = v
    return v


def rare_han_share(text: str) -> tuple[float, int]:
    """(share of Han characters outside the frequent sets, Han characters)."""
    han = HAN_RE.findall(text)
    if not han:
        return 0.0, 0
    return sum(1 for c in han if not common_han(c)) / len(han), len(han)

"""Exact and MinHash-LSH deduplication on datatrove's dedup stages, with Chinese-aware shingles.

Exact: the hash of the normalised text (lower case, no punctuation, whitespace or diacritics).
MinHash: character n-grams (or jieba word n-grams) for Chinese, where words are not separated by
spaces and datatrove's default English word shingles would see one "word" per sentence; character
(or word) n-grams for English.
"""
from __future__ import annotations

import numpy as np
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
from datatrove.utils.hashing import HashConfig
from datatrove.utils.text import TextNormConfig, simplify_text

from .text import han_share_quick

EXACT_NORM = TextNormConfig(norm_numbers=False)  # pages differing only in numbers are not the same text


def exact_key(doc) -> bytes:
    # bytes: xxhash >= 4.1 refuses str, which datatrove 0.10 would pass it
    return simplify_text(doc.text, EXACT_NORM).replace(" ", "").encode("utf-8")


def exact_config() -> ExactDedupConfig:
    return ExactDedupConfig(content_getter=exact_key, hash_config=HashConfig(precision=64))


def minhash_config(mcfg: dict) -> MinhashConfig:
    return MinhashConfig(n_grams=mcfg["en_ngram"], num_buckets=mcfg["num_buckets"],
                         hashes_per_bucket=mcfg["hashes_per_bucket"], seed=mcfg["seed"],
                         hash_config=HashConfig(precision=64))


def lsh_threshold(num_buckets: int, hashes_per_bucket: int) -> float:
    """The Jaccard similarity where LSH's detection curve 1 - (1 - s^r)^b is steepest: (1/b)^(1/r)."""
    return (1 / num_buckets) ** (1 / hashes_per_bucket)


class ChineseAwareMinhashSignature(MinhashDedupSignature):
    """datatrove's MinHash stage 1 with per-document shingles: a text whose characters are mostly
    Han gets character (or jieba word) n-grams, anything else character (or word) n-grams."""

    name = "🎯 MinHash signatures (zh-aware)"

    def __init__(self, output_folder: str, mcfg: dict):
        from .rules import RegexWordTokenizer  # our shingles do not use it; this keeps spaCy optional

        super().__init__(output_folder, config=minhash_config(mcfg), language=RegexWordTokenizer())
        self.zh_shingles, self.zh_ngram, self.en_ngram = mcfg["zh_shingles"], mcfg["zh_ngram"], mcfg["en_ngram"]
        self.en_shingles = mcfg.get("en_shingles", "word")

    def shingle_strings(self, text: str) -> list[str]:
        s = simplify_text(text, self.config.norm_config)
        if han_share_quick(text) >= 0.3:
            if self.zh_shingles == "jieba":
                import jieba

                words = [w for w in jieba.lcut(s) if w.strip()]
                k = self.zh_ngram
                return [" ".join(words[i:i + k]) for i in range(max(1, len(words) - k + 1))] if words else []
            chars = s.replace(" ", "")
            k = self.zh_ngram
            return [chars[i:i + k] for i in range(max(1, len(chars) - k + 1))] if chars else []
        k = self.en_ngram
        if self.en_shingles == "char":  # a misspelt word then breaks k shingles, not the k word n-grams around it
            text = " ".join(s.split())
            return [text[i:i + k] for i in range(max(1, len(text) - k + 1))] if text else []
        words = s.split()
        return [" ".join(words[i:i + k]) for i in range(max(1, len(words) - k + 1))] if words else []

    def get_shingles(self, text: str) -> np.ndarray:
        h = self._hash_func
        grams = set(self.shingle_strings(text))
        return np.fromiter((h(g.encode("utf-8")) for g in grams), dtype=np.uint64, count=len(grams)).reshape((-1, 1))

"""Exact and MinHash-LSH deduplication on datatrove's dedup stages, with Chinese-aware shingles.

Exact: the hash of the normalised text (lower case, no punctuation, whitespace or diacritics).
MinHash: character n-grams (or jieba word n-grams) for Chinese, where words are not separated by
spaces and datatrove's default English word shingles would see one "word" per sentence; word (or,
with en_shingles: char, character) n-grams for English.
"""
from __future__ import annotations

import numpy as np
from datatrove.pipeline.base import PipelineStep
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
    Han gets character (or jieba word) n-grams, anything else word (or character) n-grams."""

    name = "🎯 MinHash signatures (zh-aware)"

    def __init__(self, output_folder: str, mcfg: dict):
        from .rules import RegexWordTokenizer  # our shingles do not use it; this keeps spaCy optional

        super().__init__(output_folder, config=minhash_config(mcfg), language=RegexWordTokenizer())
        self.zh_shingles, self.zh_ngram, self.en_ngram = mcfg["zh_shingles"], mcfg["zh_ngram"], mcfg["en_ngram"]
        self.en_shingles = mcfg.get("en_shingles", "word")
        self.keep_full = mcfg.get("verify_jaccard") is not None  # whole signatures for MinhashVerify
        self._full, self._rank, self._doc = None, 0, -1

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        def counted(docs):
            for i, doc in enumerate(docs):
                self._doc = i  # datatrove's doc_idx for the signature computed next
                yield doc

        self._rank = rank
        try:
            return super().run(counted(data) if data is not None else data, rank, world_size)
        finally:
            if self._full is not None:
                self._full.close()
                self._full = None

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        sig = super().get_signature(shingles)
        if self.keep_full:
            if self._full is None:
                self._full = self.output_folder.open(full_signature_file(self._rank), mode="wb")
            self._full.write(np.uint32(self._doc).tobytes() + np.asarray(sig, dtype="<u8").tobytes())
        return sig

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


def full_signature_file(rank: int) -> str:
    return f"full/{rank:05d}.sig"


class MinhashVerify(PipelineStep):
    """Between datatrove's bucket and cluster stages: keep a candidate pair of the LSH bands only if the
    whole signatures of its two documents agree on at least `min_jaccard` of their hashes (an estimate
    of their Jaccard similarity). A band's few hashes also collide now and then for texts that merely
    share a topic (long speeches under character shingles); those pairs are dropped here."""

    name = "🔎 MinHash pair check"
    type = "🫂 - DEDUPS"

    def __init__(self, sigs_folder: str, buckets_folder: str, output_folder: str, hashes: int, min_jaccard: float):
        from datatrove.io import get_datafolder

        super().__init__()
        self.sigs, self.buckets = get_datafolder(sigs_folder), get_datafolder(buckets_folder)
        self.output = get_datafolder(output_folder)  # the cluster stage reads the checked pairs from here
        self.record = np.dtype([("doc", "<u4"), ("sig", "<u8", (hashes,))])  # as get_signature writes them
        self.min_jaccard = min_jaccard

    @staticmethod
    def _read(folder, name: str) -> bytes:
        with folder.open(name, "rb") as f:
            return f.read()

    @staticmethod
    def _groups(p: np.ndarray) -> list[list[tuple[int, int]]]:
        """datatrove writes a band's run of equal signatures A, B, C as the chain A-B, B-C: the runs again."""
        groups: list[list[tuple[int, int]]] = []
        for f1, d1, f2, d2 in p.tolist():
            if groups and groups[-1][-1] == (f1, d1):
                groups[-1].append((f2, d2))
            else:
                groups.append([(f1, d1), (f2, d2)])
        return groups

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from datatrove.pipeline.dedup.minhash import SENTINEL

        with self.track_time():
            files = self.buckets.list_files(glob_pattern="*.dups")
            pairs = {name: np.frombuffer(self._read(self.buckets, name), dtype="<u4").reshape(-1, 4) for name in files}
            needed: dict[int, set[int]] = {}
            for p in pairs.values():
                real = p[p[:, 0] != SENTINEL]
                for f, d in np.concatenate([real[:, :2], real[:, 2:]]).tolist():
                    needed.setdefault(f, set()).add(d)
            full: dict[tuple[int, int], np.ndarray] = {}
            for f, docs in needed.items():  # one task's signatures at a time, keeping the paired documents'
                rows = np.frombuffer(self._read(self.sigs, full_signature_file(f)), dtype=self.record)
                at = np.searchsorted(rows["doc"], sorted(docs))  # written in document order
                full.update({(f, d): rows["sig"][i].copy() for d, i in zip(sorted(docs), at.tolist())})
            for name, p in pairs.items():
                index, real = p[p[:, 0] == SENTINEL], p[p[:, 0] != SENTINEL]
                edges = []
                for group in self._groups(real):  # each member joins the first earlier member it resembles
                    for j in range(1, len(group)):
                        match = next((group[i] for i in range(j) if
                                      np.mean(full[group[i]] == full[group[j]]) >= self.min_jaccard), None)
                        if match is not None:
                            edges.append((*match, *group[j]))
                kept = np.concatenate([index, np.array(edges, dtype="<u4").reshape(-1, 4)])
                self.stat_update("candidate_pairs", value=len(real))
                self.stat_update("pairs_kept", value=len(edges))
                with self.output.open(name, "wb") as out:
                    out.write(np.ascontiguousarray(kept, dtype="<u4").tobytes())

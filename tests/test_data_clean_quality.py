"""Quality scoring: the fastText-style classifier (trained here) and reference-LM perplexity with
CCNet-style buckets, with thresholds and with keep fractions decided over the whole corpus."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

pytest.importorskip("datatrove")

from telechat.data.clean import run_clean, synth  # noqa: E402
from telechat.data.clean.quality import FastTextClassifier, PerplexityScorer, train_classifier  # noqa: E402

NO_DEDUP = {"dedup": {"exact": {"enabled": False}, "minhash": {"enabled": False}}}


def _word_salad(text: str, rng: random.Random) -> str:
    """The same words in random order: the classic low-quality page a unigram filter cannot see."""
    if any("\u4e00" <= c <= "\u9fff" for c in text):
        chars = [c for c in text if not c.isspace()]
        rng.shuffle(chars)
        return "".join(chars)
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


def _write(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"data": t}, ensure_ascii=False) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("quality")
    rng = random.Random(0)
    good = [synth.document(lang, rng) for _ in range(150) for lang in ("zh", "en")]
    bad = [_word_salad(synth.document(lang, rng), rng) for _ in range(150) for lang in ("zh", "en")]
    _write(d / "train" / "good.jsonl", good[:200])
    _write(d / "train" / "bad.jsonl", bad[:200])
    _write(d / "test" / "mixed.jsonl", good[200:] + bad[200:])
    return d, good[200:], bad[200:]


def test_classifier_learns_word_order(corpus, tmp_path):
    d, good, bad = corpus
    stats = train_classifier([str(d / "train" / "good.jsonl")], [str(d / "train" / "bad.jsonl")],
                             str(tmp_path / "clf.npz"), buckets=1 << 16)
    assert stats["documents"] == {"positive": 200, "negative": 200}
    assert stats["holdout_accuracy"] >= 0.9
    clf = FastTextClassifier.load(str(tmp_path / "clf.npz"))
    pg, pb = clf.predict(good), clf.predict(bad)
    assert ((pg >= 0.5).mean() + (pb < 0.5).mean()) / 2 >= 0.9
    with pytest.raises(ValueError):  # not a classifier file
        np.savez(tmp_path / "x.npz", meta=np.frombuffer(b'{"format": "other"}', dtype=np.uint8))
        FastTextClassifier.load(str(tmp_path / "x.npz"))


def test_classifier_in_the_pipeline(corpus, tmp_path):
    d, good, bad = corpus
    cfg = dict(NO_DEDUP, quality={"classifier": {"enabled": True, "threshold": 0.5, "model": str(tmp_path / "m.npz"),
                                                 "train": {"positive": [str(d / "train" / "good.jsonl")],
                                                           "negative": [str(d / "train" / "bad.jsonl")],
                                                           "buckets": 65536}}},
               output={"fields": ["quality_score"]}, rules_zh={"enabled": False}, gopher_quality_en={"enabled": False},
               gopher_repetition_en={"enabled": False}, rules_en={"enabled": False})
    rep = run_clean(str(d / "test" / "mixed.jsonl"), tmp_path / "out", cfg)
    kept = {r["data"] for r in map(json.loads, open(tmp_path / "out" / "00000.jsonl", encoding="utf-8"))}
    normalised_good = sum(1 for t in good if t in kept)
    assert normalised_good >= 0.9 * len(good) and len(kept) - normalised_good <= 0.1 * len(bad)
    assert rep["quality"]["classifier_training"]["holdout_accuracy"] >= 0.9
    clf_stage = next(s for s in rep["stages"] if s["name"] == "quality classifier")
    assert "low_quality_score" in clf_stage["removed"]


def test_classifier_keep_fraction(corpus, tmp_path):
    d, good, bad = corpus
    model = tmp_path / "m.npz"
    train_classifier([str(d / "train" / "good.jsonl")], [str(d / "train" / "bad.jsonl")], str(model),
                     buckets=65536)
    cfg = dict(NO_DEDUP, quality={"classifier": {"enabled": True, "model": str(model), "keep_fraction": 0.5}},
               output={"fields": ["language", "quality_score"]}, rules_zh={"enabled": False},
               gopher_quality_en={"enabled": False}, gopher_repetition_en={"enabled": False}, rules_en={"enabled": False})
    rep = run_clean(str(d / "test" / "mixed.jsonl"), tmp_path / "out", cfg, workers=2)
    out = [json.loads(line) for line in open(tmp_path / "out" / "00000.jsonl", encoding="utf-8")]
    out += [json.loads(line) for p in sorted((tmp_path / "out").glob("0000[1-9].jsonl")) for line in open(p, encoding="utf-8")]
    by_lang = {lang: sum(1 for r in out if r["language"] == lang) for lang in ("zh", "en")}
    assert all(45 <= n <= 55 for n in by_lang.values()), by_lang  # half of each language's 100
    cut = rep["quality"]["cutoffs"]["classifier"]
    assert set(cut) == {"zh", "en"}
    assert all(r["quality_score"] >= cut[r["language"]] for r in out)
    assert [s["stage"] for s in rep["run"]["stages"]][-2] == "select"


def test_perplexity_buckets_with_a_telechat_model(tiny_dir, tmp_path):
    rng = random.Random(1)
    texts = [synth.document("en", rng) for _ in range(30)]
    _write(tmp_path / "in.jsonl", texts)
    cfg = dict(NO_DEDUP, quality={"perplexity": {"enabled": True, "model": str(tiny_dir), "max_tokens": 48,
                                                 "batch_size": 8, "keep_buckets": ["head", "middle"]}},
               output={"fields": ["perplexity", "perplexity_bucket"]})
    rep = run_clean(str(tmp_path / "in.jsonl"), tmp_path / "out", cfg)
    out = [json.loads(line) for line in open(tmp_path / "out" / "00000.jsonl", encoding="utf-8")]
    assert 18 <= len(out) <= 22  # the tail third is removed
    cut = rep["quality"]["cutoffs"]["perplexity"]["en"]
    assert cut[0] < cut[1]
    assert all(r["perplexity"] <= cut[1] and r["perplexity_bucket"] in ("head", "middle") for r in out)
    assert {r["perplexity_bucket"] for r in out} == {"head", "middle"}
    # the same model scores the same text the same way, fixed cut-offs decide in the scoring stage
    scorer = PerplexityScorer(str(tiny_dir), max_tokens=48, batch_size=4)
    ppl = scorer([texts[0], texts[0], ""])
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-5) and ppl[2] is None
    fixed = dict(cfg, quality={"perplexity": dict(cfg["quality"]["perplexity"], cutoffs={"en": [0.0, ppl[0] * 2]})})
    rep2 = run_clean(str(tmp_path / "in.jsonl"), tmp_path / "out2", fixed)
    assert [s["stage"] for s in rep2["run"]["stages"]] == ["filter", "report"]


@pytest.mark.slow
def test_default_model_prefers_natural_text():
    """SmolLM2 (the default model) finds English prose more likely than the same words shuffled."""
    rng = random.Random(0)
    texts = [synth.document("en", rng) for _ in range(3)]
    salad = [_word_salad(t, rng) for t in texts]
    scorer = PerplexityScorer("default", max_tokens=64, batch_size=6)
    ppl = scorer(texts + salad)
    assert max(ppl[:3]) < min(ppl[3:])

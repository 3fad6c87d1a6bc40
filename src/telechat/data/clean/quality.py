"""Quality scoring: perplexity under a reference language model (CCNet-style head/middle/tail
buckets per language) and a fastText-style classifier (hashed n-gram embeddings averaged into a
linear softmax), each with a fixed threshold or a keep fraction computed over the whole corpus."""
from __future__ import annotations

import json
import math
import os
import random
import re

import numpy as np

from .base import CleanStep
from .text import HAN

BUCKETS = ("head", "middle", "tail")


# ---- score samples (for keep fractions and automatic cut-offs) ---------------------------------------
class Reservoir:
    """Uniform samples of scores per language (bounded memory whatever the corpus size)."""

    def __init__(self, size: int, seed: int):
        self.size, self.rng = size, random.Random(seed)
        self.samples: dict[str, list[float]] = {}
        self.seen: dict[str, int] = {}

    def add(self, lang: str, value: float) -> None:
        s = self.samples.setdefault(lang, [])
        n = self.seen[lang] = self.seen.get(lang, 0) + 1
        if len(s) < self.size:
            s.append(value)
        else:
            j = self.rng.randrange(n)
            if j < self.size:
                s[j] = value


def write_scores(folder: str, kind: str, rank: int, res: Reservoir) -> None:
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{kind}-{rank:05d}.tmp")
    with open(tmp, "w") as f:
        json.dump({"samples": res.samples, "seen": res.seen}, f)
    os.replace(tmp, os.path.join(folder, f"{kind}-{rank:05d}.json"))


def read_scores(folder: str, kind: str) -> dict[str, np.ndarray]:
    """Scores per language from every task, each task's sample weighted by what it saw."""
    values: dict[str, list] = {}
    weights: dict[str, list] = {}
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.startswith(kind + "-") and name.endswith(".json"):
                with open(os.path.join(folder, name)) as f:
                    d = json.load(f)
                for lang, s in d["samples"].items():
                    if s:
                        values.setdefault(lang, []).extend(s)
                        weights.setdefault(lang, []).extend([d["seen"][lang] / len(s)] * len(s))
    return {k: (np.asarray(v, dtype=np.float64), np.asarray(weights[k])) for k, v in values.items()}


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values)
    v, w = values[order], weights[order]
    cum = np.cumsum(w) / w.sum()
    return float(v[min(len(v) - 1, int(np.searchsorted(cum, q)))])


# ---- perplexity ------------------------------------------------------------------------------------
class PerplexityScorer:
    """Per-document perplexity of the first `max_tokens` tokens under any `telechat.load`able model."""

    def __init__(self, model: str = "default", device: str = "cpu", dtype: str | None = "float32",
                 max_tokens: int = 256, batch_size: int = 8, threads: int | None = None):
        self.model_name, self.device, self.dtype = model, device, dtype
        self.max_tokens, self.batch_size, self.threads = max_tokens, batch_size, threads
        self.llm = None

    def load(self):
        if self.llm is None:
            import torch

            import telechat

            if self.threads:
                torch.set_num_threads(self.threads)
            self.llm = telechat.load(self.model_name, device=self.device, dtype=self.dtype)
            self.llm.model.eval()
            if self.llm.tokenizer is None:
                raise ValueError(f"{self.model_name}: the perplexity model needs a tokenizer")
        return self.llm

    def __call__(self, texts: list[str]) -> list[float | None]:
        import torch

        llm = self.load()
        tok = llm.tokenizer
        seqs = []
        for t in texts:
            ids = tok.encode(t[: self.max_tokens * 8])[: self.max_tokens]
            if tok.bos_id is not None:  # so the first real token is scored too
                ids = [tok.bos_id] + ids[: self.max_tokens - 1]
            seqs.append(ids)
        out: list[float | None] = [None] * len(texts)
        order = [i for i in sorted(range(len(seqs)), key=lambda i: len(seqs[i])) if len(seqs[i]) >= 2]
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            T = max(len(seqs[i]) for i in idx)
            x = torch.zeros(len(idx), T, dtype=torch.long)
            for r, i in enumerate(idx):
                x[r, :len(seqs[i])] = torch.tensor(seqs[i])
            with torch.inference_mode():  # right padding: causal attention never looks at it
                logits = llm.model(x.to(llm.device))
                for r, i in enumerate(idx):
                    n = len(seqs[i])
                    lp = torch.log_softmax(logits[r, : n - 1].float(), dim=-1)
                    nll = -lp.gather(1, x[r, 1:n, None].to(lp.device)).mean().item()
                    out[i] = float(math.exp(min(nll, 50.0)))
        return out


def ppl_bucket(ppl: float, cut: tuple[float, float]) -> str:
    return "head" if ppl <= cut[0] else "middle" if ppl <= cut[1] else "tail"


class PerplexityStep(CleanStep):
    """Scores documents (metadata "perplexity"); with fixed cut-offs it also buckets and filters
    here, otherwise it samples scores for `QualitySelectStep`."""

    name = "📉 perplexity"

    def __init__(self, key: str, pcfg: dict, scores_dir: str, sample_size: int, decide_here: bool, **kw):
        super().__init__(key, **kw)
        self.cfg = dict(pcfg)
        self.batch_size = int(pcfg["batch_size"])
        self.scores_dir, self.sample_size, self.decide_here = scores_dir, sample_size, decide_here
        self.scorer = None

    def start(self, rank, world_size):
        self.scorer = PerplexityScorer(self.cfg["model"], self.cfg["device"], self.cfg["dtype"],
                                       self.cfg["max_tokens"], self.batch_size, self.cfg["threads"])
        self.reservoir = Reservoir(self.sample_size, seed=rank)

    def process_batch(self, docs):
        scores = self.scorer([d.text for d in docs])
        res = []
        for d, p in zip(docs, scores):
            if p is None:
                self.account.count("unscored_too_short")
                res.append(None)
                continue
            d.metadata["perplexity"] = round(p, 3)
            lang = d.metadata.get("language", "any")
            self.reservoir.add(lang, p)
            res.append(decide_perplexity(d, self.cfg, self.cfg["cutoffs"]) if self.decide_here else None)
        return res

    def finish(self, rank, world_size):
        write_scores(self.scores_dir, "perplexity", rank, self.reservoir)


def decide_perplexity(doc, cfg: dict, cutoffs: dict | None):
    ppl = doc.metadata.get("perplexity")
    if ppl is None:
        return None
    if cfg["max_perplexity"] is not None and ppl > cfg["max_perplexity"]:
        return "perplexity_above_max", f"{ppl:.1f} > {cfg['max_perplexity']}"
    lang = doc.metadata.get("language", "any")
    if cutoffs and lang in cutoffs:
        b = ppl_bucket(ppl, tuple(cutoffs[lang]))
        doc.metadata["perplexity_bucket"] = b
        if b not in cfg["keep_buckets"]:
            return f"perplexity_{b}", f"{ppl:.1f} ({lang} cut-offs {cutoffs[lang][0]:.1f}/{cutoffs[lang][1]:.1f})"
    return None


# ---- fastText-style classifier ---------------------------------------------------------------------------
TOKEN_RE = re.compile(f"[{HAN}]|[A-Za-z]+|[0-9]+|[^\\s0-9A-Za-z{HAN}]")


class FastTextClassifier:
    """fastText's supervised model: the mean of hashed unigram and n-gram embeddings (Han characters
    and Latin words are tokens) fed to a linear softmax, trained by SGD. Plain numpy."""

    labels = ("low", "high")

    def __init__(self, dim: int = 16, buckets: int = 1 << 19, word_ngrams: int = 2, max_tokens: int = 2000):
        self.dim, self.buckets, self.word_ngrams, self.max_tokens = dim, buckets, word_ngrams, max_tokens
        rng = np.random.default_rng(0)
        self.emb = (rng.uniform(-1, 1, (buckets, dim)) / dim).astype(np.float32)
        self.w = np.zeros((2, dim), np.float32)
        self.b = np.zeros(2, np.float32)

    def features(self, text: str) -> np.ndarray:
        import xxhash

        toks = [t.lower() if t.isascii() else t for t in TOKEN_RE.findall(text[: self.max_tokens * 8])][: self.max_tokens]
        toks = ["<num>" if t.isdigit() else t for t in toks]
        grams = list(toks)
        for n in range(2, self.word_ngrams + 1):
            grams += [" ".join(toks[i:i + n]) for i in range(len(toks) - n + 1)]
        if not grams:
            grams = ["<empty>"]
        return np.fromiter((xxhash.xxh64_intdigest(g.encode("utf-8")) % self.buckets for g in grams), dtype=np.int64, count=len(grams))

    def predict(self, texts: list[str]) -> np.ndarray:
        """P(high quality) per text."""
        out = np.empty(len(texts), np.float64)
        for i, t in enumerate(texts):
            h = self.emb[self.features(t)].mean(0)
            z = self.w @ h + self.b
            z = z - z.max()
            p = np.exp(z)
            out[i] = p[1] / p.sum()
        return out

    def fit(self, texts: list[str], labels: list[int], epochs: int = 10, lr: float = 1.0, seed: int = 0,
            batch_size: int = 4) -> list[float]:
        """fastText's training: SGD on the softmax cross-entropy, the learning rate decaying linearly
        to zero; the gradient of each example's mean embedding is spread over its n-gram rows."""
        rng = np.random.default_rng(seed)
        feats = [self.features(t) for t in texts]
        y = np.asarray(labels, dtype=np.int64)
        steps = epochs * len(feats)
        done, losses = 0, []
        for _ in range(epochs):
            total = 0.0
            order = rng.permutation(len(feats))
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                rate = lr * max(0.0, 1.0 - done / steps)
                done += len(idx)
                h = np.stack([self.emb[feats[i]].mean(0) for i in idx])  # [B, dim]
                z = h @ self.w.T + self.b
                z -= z.max(1, keepdims=True)
                p = np.exp(z)
                p /= p.sum(1, keepdims=True)
                total -= float(np.log(p[np.arange(len(idx)), y[idx]] + 1e-12).sum())
                g = p
                g[np.arange(len(idx)), y[idx]] -= 1.0  # d loss / d logits
                gh = g @ self.w  # [B, dim]
                self.w -= rate * (g.T @ h)
                self.b -= rate * g.sum(0)
                for r, i in enumerate(idx):
                    f = feats[i]
                    np.add.at(self.emb, f, (-rate / len(f)) * gh[r])
            losses.append(total / max(1, len(feats)))
        return losses

    def save(self, path: str) -> None:
        """Only the embedding rows training moved are stored (float16), so files stay small."""
        rng = np.random.default_rng(0)
        init = (rng.uniform(-1, 1, (self.buckets, self.dim)) / self.dim).astype(np.float32)
        rows = np.nonzero(np.any(self.emb != init, axis=1))[0]
        meta = {"format": "telechat-fasttext-v1", "dim": self.dim, "buckets": self.buckets,
                "word_ngrams": self.word_ngrams, "max_tokens": self.max_tokens, "labels": list(self.labels)}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            np.savez_compressed(f, rows=rows.astype(np.int64), values=self.emb[rows].astype(np.float16), w=self.w,
                                b=self.b, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))

    @classmethod
    def load(cls, path: str) -> "FastTextClassifier":
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta.get("format") != "telechat-fasttext-v1":
                raise ValueError(f"{path}: not a telechat classifier file")
            clf = cls(meta["dim"], meta["buckets"], meta["word_ngrams"], meta["max_tokens"])
            clf.emb[z["rows"]] = z["values"].astype(np.float32)
            clf.w, clf.b = z["w"], z["b"]
        return clf


class ClassifierStep(CleanStep):
    """metadata["quality_score"] = P(high); removes below `threshold` here, or samples scores for a
    keep fraction decided by `QualitySelectStep`."""

    name = "🏷 quality classifier"
    batch_size = 64

    def __init__(self, key: str, ccfg: dict, model_path: str, scores_dir: str, sample_size: int, decide_here: bool, **kw):
        super().__init__(key, **kw)
        self.threshold, self.model_path = ccfg["threshold"], model_path
        self.scores_dir, self.sample_size, self.decide_here = scores_dir, sample_size, decide_here
        self.clf = None

    def start(self, rank, world_size):
        self.clf = FastTextClassifier.load(self.model_path)
        self.reservoir = Reservoir(self.sample_size, seed=rank + 7919)

    def process_batch(self, docs):
        scores = self.clf.predict([d.text for d in docs])
        res = []
        for d, s in zip(docs, scores):
            d.metadata["quality_score"] = round(float(s), 4)
            self.reservoir.add(d.metadata.get("language", "any"), float(s))
            if self.decide_here and s < self.threshold:
                res.append(("low_quality_score", f"{s:.3f} < {self.threshold}"))
            else:
                res.append(None)
        return res

    def finish(self, rank, world_size):
        write_scores(self.scores_dir, "classifier", rank, self.reservoir)


class QualitySelectStep(CleanStep):
    """After scoring: CCNet buckets from the corpus's own perplexity quantiles and/or the classifier's
    keep fraction, both per language; the cut-offs are computed from every task's score sample."""

    name = "⚖️ quality selection"

    def __init__(self, key: str, qcfg: dict, scores_dir: str, **kw):
        super().__init__(key, **kw)
        self.q, self.scores_dir = qcfg, scores_dir
        self.ppl_cutoffs: dict | None = None
        self.clf_cutoffs: dict | None = None

    def cutoffs(self) -> dict:
        out = {}
        ppl = self.q["perplexity"]
        if ppl["enabled"]:
            if ppl["cutoffs"]:
                out["perplexity"] = {k: list(v) for k, v in ppl["cutoffs"].items()}
            else:
                qs = ppl["bucket_quantiles"]
                out["perplexity"] = {lang: [weighted_quantile(v, w, qs[0]), weighted_quantile(v, w, qs[1])]
                                     for lang, (v, w) in read_scores(self.scores_dir, "perplexity").items()}
        clf = self.q["classifier"]
        if clf["enabled"]:
            if clf["keep_fraction"] is not None:
                out["classifier"] = {lang: weighted_quantile(v, w, 1 - clf["keep_fraction"])
                                     for lang, (v, w) in read_scores(self.scores_dir, "classifier").items()}
            else:
                out["classifier"] = {"any": clf["threshold"]}
        return out

    def start(self, rank, world_size):
        c = self.cutoffs()
        self.ppl_cutoffs, self.clf_cutoffs = c.get("perplexity"), c.get("classifier")

    def process(self, doc):
        if self.ppl_cutoffs is not None:
            res = decide_perplexity(doc, self.q["perplexity"], self.ppl_cutoffs)
            if res:
                return res
        if self.clf_cutoffs is not None and "quality_score" in doc.metadata:
            lang = doc.metadata.get("language", "any")
            thr = self.clf_cutoffs.get(lang, self.clf_cutoffs.get("any"))
            s = doc.metadata["quality_score"]
            if thr is not None and s < thr:
                return "low_quality_score", f"{s:.3f} < {thr:.3f} ({lang})"
        return None

    def finish(self, rank, world_size):
        if rank == 0 and self.report_dir:
            with open(os.path.join(self.report_dir, "quality_cutoffs.json"), "w") as f:
                json.dump({"perplexity": self.ppl_cutoffs, "classifier": self.clf_cutoffs}, f, indent=1)


# ---- training the classifier from files ---------------------------------------------------------------
def train_classifier(positive: list[str], negative: list[str], output: str, rcfg: dict | None = None,
                     normalize_cfg: dict | None = None, max_docs_per_class: int = 50000, epochs: int = 10,
                     dim: int = 16, buckets: int = 1 << 19, lr: float = 1.0, seed: int = 0,
                     holdout: float = 0.1) -> dict:
    """Train and save a classifier from good (`positive`) and poor (`negative`) files or globs in any
    format the cleaner reads; returns training statistics (held-out accuracy included)."""
    from .config import default_config
    from .io import TeleChatReader
    from .normalize import Normalizer
    from .pipeline import expand_inputs

    rcfg = dict(rcfg or default_config()["reader"])
    norm = Normalizer(**{k: v for k, v in (normalize_cfg or default_config()["normalize"]).items() if k != "enabled"})
    texts, labels = [], []
    counts = {}
    for label, sources in ((1, positive), (0, negative)):
        files = expand_inputs(sources)
        rng = random.Random(seed + label)
        reader = TeleChatReader(files, os.path.commonpath([os.path.dirname(f) for f in files]), rcfg)
        docs: list[str] = []
        n = 0
        for d in reader.run():
            t = norm(d.text)
            if not t.strip():
                continue
            n += 1
            if len(docs) < max_docs_per_class:
                docs.append(t)
            else:  # reservoir sampling: a uniform sample of a source of any size
                j = rng.randrange(n)
                if j < max_docs_per_class:
                    docs[j] = t
        if not docs:
            raise ValueError(f"no {'positive' if label else 'negative'} training documents in {sources}")
        counts["positive" if label else "negative"] = len(docs)
        texts += docs
        labels += [label] * len(docs)
    order = np.random.default_rng(seed).permutation(len(texts))
    n_hold = int(len(texts) * holdout) if len(texts) >= 20 else 0
    hold, train = order[:n_hold], order[n_hold:]
    clf = FastTextClassifier(dim=dim, buckets=buckets)
    losses = clf.fit([texts[i] for i in train], [labels[i] for i in train], epochs=epochs, lr=lr, seed=seed)
    stats = {"documents": counts, "epochs": epochs, "final_loss": round(losses[-1], 4)}
    if n_hold:
        p = clf.predict([texts[i] for i in hold])
        y = np.array([labels[i] for i in hold])
        stats["holdout_documents"] = int(n_hold)
        stats["holdout_accuracy"] = round(float(((p >= 0.5) == (y == 1)).mean()), 4)
    clf.save(output)
    stats["model"] = output
    return stats

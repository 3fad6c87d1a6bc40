"""Accounting for pipeline steps: documents and characters in/out, removal reasons with examples.

Every stage of the cleaning pipeline is a datatrove `PipelineStep`. Ours derive from `CleanStep`;
datatrove's own filters (rules.RuleStep) and dedup stages (`StreamStep`) are wrapped so the report
covers them too. Each step writes its tally for its task (rank) to
`REPORT_DIR/parts/KEY/RANK.json` when its input is exhausted; the report stage merges them.
"""
from __future__ import annotations

import json
import os
from collections import deque

import orjson

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.batching import batched


class Account:
    """One step's tally for one task."""

    def __init__(self, examples: int = 3, excerpt_chars: int = 160):
        self.max_examples, self.excerpt_chars = examples, excerpt_chars
        self.docs_in = self.docs_out = self.chars_in = self.chars_out = self.modified = 0
        self.removed: dict[str, dict] = {}
        self.counters: dict[str, int] = {}

    def excerpt(self, text: str) -> str:
        t = " ".join(text.split())
        return t if len(t) <= self.excerpt_chars else t[:self.excerpt_chars] + "…"

    def drop(self, reason: str, where: str, text: str = "", detail: str | None = None) -> None:
        r = self.removed.setdefault(reason, {"count": 0, "chars": 0, "examples": []})
        r["count"] += 1
        r["chars"] += len(text)
        if len(r["examples"]) < self.max_examples:
            ex = {"where": where, "text": self.excerpt(text)}
            if detail:
                ex["detail"] = detail
            r["examples"].append(ex)

    def count(self, key: str, n: int = 1) -> None:
        if n:
            self.counters[key] = self.counters.get(key, 0) + n

    def to_dict(self) -> dict:
        return {"docs_in": self.docs_in, "docs_out": self.docs_out, "chars_in": self.chars_in,
                "chars_out": self.chars_out, "modified": self.modified, "removed": self.removed,
                "counters": self.counters}


def write_part(report_dir: str | None, key: str, rank: int, data: dict) -> None:
    if not report_dir:
        return
    folder = os.path.join(report_dir, "parts", key)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{rank:05d}.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    os.replace(tmp, os.path.join(folder, f"{rank:05d}.json"))


def where(doc: Document) -> str:
    return str(doc.id)


class RemovedSink:
    """The removed-documents sidecar of one step in one task: REMOVED_DIR/KEY-RANK.jsonl, one
    record per removed document (io.removed_record). A rerun of the task starts the file again."""

    def __init__(self, folder: str | None, key: str, rank: int):
        self.path = os.path.join(folder, f"{key}-{rank:05d}.jsonl") if folder else None
        self.fh = None
        if self.path and os.path.exists(self.path):
            os.remove(self.path)

    def add(self, doc: Document, stage: str, reason: str, detail: str | None, text: str | None = None) -> None:
        if not self.path:
            return
        from .io import removed_record

        if self.fh is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.fh = open(self.path, "wb")
        rec = removed_record(doc, stage, reason, detail)
        if text is not None:
            rec["data"] = text
        self.fh.write(orjson.dumps(rec) + b"\n")

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


class CleanStep(PipelineStep):
    """A step with a report entry. Subclasses implement `process(doc)` (or `process_batch(docs)`):
    return None to keep the (possibly modified) document, or a reason (or (reason, detail)) to
    remove it. `languages` limits a step to documents whose metadata["language"] is listed."""

    type = "🧹 - CLEAN"
    batch_size = 1

    def __init__(self, key: str, report_dir: str | None = None, examples: int = 3, excerpt_chars: int = 160,
                 languages: tuple[str, ...] | None = None, removed_dir: str | None = None):
        super().__init__()
        self.key, self.report_dir, self.removed_dir = key, report_dir, removed_dir
        self.examples, self.excerpt_chars = examples, excerpt_chars
        self.languages = tuple(languages) if languages else None
        self.account: Account | None = None

    # -- to implement ---------------------------------------------------------------------------
    def process(self, doc: Document):
        return None

    def process_batch(self, docs: list[Document]) -> list:
        return [self.process(d) for d in docs]

    def start(self, rank: int, world_size: int) -> None:
        """Called once per task before the first document (load models and files here, not in
        __init__: the step is pickled to the workers)."""

    def finish(self, rank: int, world_size: int) -> None:
        """Called once per task after the last document."""

    # -- machinery ------------------------------------------------------------------------------
    def applies(self, doc: Document) -> bool:
        return self.languages is None or doc.metadata.get("language") in self.languages

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        acc = self.account = Account(self.examples, self.excerpt_chars)
        sink = RemovedSink(self.removed_dir, self.key, rank)
        self.start(rank, world_size)
        for batch in batched(data or (), self.batch_size):
            todo = [d for d in batch if self.applies(d)]
            before = {id(d): (len(d.text), d.text) for d in todo}
            with self.track_time("batch" if self.batch_size > 1 else None):
                results = dict(zip(map(id, todo), self.process_batch(todo))) if todo else {}
            for doc in batch:
                acc.docs_in += 1
                n, original = before.get(id(doc), (len(doc.text), None))
                acc.chars_in += n
                res = results.get(id(doc))
                if res is None and not doc.text.strip():
                    res = ("empty_after_" + self.key.split("-", 1)[-1], None)
                if res is not None:
                    reason, detail = res if isinstance(res, tuple) else (res, None)
                    acc.drop(reason, where(doc), original if original is not None else doc.text, detail)
                    sink.add(doc, self.key.split("-", 1)[-1], reason, detail, original)
                    self.stat_update("dropped", f"dropped_{reason}")
                    continue
                if original is not None and doc.text is not original and doc.text != original:
                    acc.modified += 1
                acc.docs_out += 1
                acc.chars_out += len(doc.text)
                self.stat_update("forwarded")
                yield doc
        self.finish(rank, world_size)
        sink.close()
        write_part(self.report_dir, self.key, rank, acc.to_dict())


class StreamStep(PipelineStep):
    """Any order-preserving datatrove step that drops documents (e.g. the dedup filters): the
    documents that went in but did not come out were removed, for `reason`."""

    type = "🧹 - CLEAN"

    def __init__(self, key: str, inner: PipelineStep, reason: str, report_dir: str | None = None,
                 examples: int = 3, excerpt_chars: int = 160, detail_key: str | None = None,
                 removed_dir: str | None = None):
        self.name = getattr(inner, "name", key)  # before PipelineStep.__init__ names the stats
        super().__init__()
        self.key, self.inner, self.reason, self.report_dir = key, inner, reason, report_dir
        self.removed_dir = removed_dir
        self.examples, self.excerpt_chars, self.detail_key = examples, excerpt_chars, detail_key

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        acc = Account(self.examples, self.excerpt_chars)
        sink = RemovedSink(self.removed_dir, self.key, rank)
        pending: deque = deque()

        def tap():
            for d in data or ():
                acc.docs_in += 1
                acc.chars_in += len(d.text)
                pending.append(d)
                yield d

        def dropped(d):
            detail = f"{self.detail_key}={d.metadata.get(self.detail_key)}" if self.detail_key else None
            acc.drop(self.reason, where(d), d.text, detail)
            sink.add(d, self.key.split("-", 1)[-1], self.reason, detail)

        for out in self.inner.run(tap(), rank, world_size):
            while pending and pending[0] is not out:
                dropped(pending.popleft())
            if pending:
                pending.popleft()
            acc.docs_out += 1
            acc.chars_out += len(out.text)
            yield out
        while pending:
            dropped(pending.popleft())
        self.stats = self.inner.stats
        sink.close()
        write_part(self.report_dir, self.key, rank, acc.to_dict())

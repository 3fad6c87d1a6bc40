"""Reading raw input (PTD jsonl, jsonl/parquet with a chosen field, plain text; plain, .gz, .zst,
.bz2, .xz) into datatrove Documents, and writing intermediate and final (PTD jsonl) shards.

Bad input never stops a run: malformed JSON, invalid UTF-8, missing fields, empty or oversized
documents and unreadable (e.g. truncated .gz) files are counted per reason with file:line
examples, and per file, in the reader's report entry.
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
from pathlib import Path

import orjson
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.readers.base import BaseReader
from datatrove.pipeline.writers.jsonl import JsonlWriter

from .base import Account, write_part

TEXT_FIELDS = ("data", "text", "content")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSION_SUFFIXES = (".gz", ".zst", ".zstd", ".bz2", ".xz")
MAX_PROBLEM_LINES = 10  # line numbers kept per file and reason


def open_binary(path: str):
    """A binary file object, decompressed by suffix."""
    raw = open(path, "rb")
    p = path.lower()
    if p.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if p.endswith((".zst", ".zstd")):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    if p.endswith(".bz2"):
        return bz2.BZ2File(raw)
    if p.endswith(".xz"):
        return lzma.LZMAFile(raw)
    return raw


def file_format(path: str) -> str:
    p = path.lower()
    for s in COMPRESSION_SUFFIXES:
        if p.endswith(s):
            p = p[: -len(s)]
            break
    if p.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if p.endswith(".parquet"):
        return "parquet"
    return "text"


def read_lines(fh, limit: int):
    """(line number, bytes without the newline | None when longer than `limit` bytes)."""
    n = 0
    while True:
        piece = fh.readline(limit + 1)
        if not piece:
            return
        n += 1
        if len(piece) > limit and not (len(piece) == limit + 1 and piece.endswith(b"\n")):
            while piece and not piece.endswith(b"\n"):  # drain the rest of the line, a MiB at a time
                piece = fh.readline(1 << 20)
            yield n, None
        else:
            yield n, piece.rstrip(b"\r\n")


class TeleChatReader(BaseReader):
    """Reads `files` (absolute paths; `root` is cut from the names in ids and reports). With
    `shard_by_record`, every task reads every file and keeps records i % world_size == rank
    (balanced when there are fewer files than tasks); otherwise file i goes to task i % world_size."""

    name = "📖 TeleChat raw text"

    def __init__(self, files: list[str], root: str, rcfg: dict, key: str = "00-read", report_dir: str | None = None,
                 examples: int = 3, excerpt_chars: int = 160, shard_by_record: bool = False,
                 removed_dir: str | None = None):  # unreadable records are listed by line in the report
        super().__init__()
        self.files, self.root, self.rcfg = list(files), root, dict(rcfg)
        self.key, self.report_dir = key, report_dir
        self.examples, self.excerpt_chars = examples, excerpt_chars
        self.shard_by_record = shard_by_record

    def rel(self, path: str) -> str:
        try:
            return os.path.relpath(path, self.root)
        except ValueError:
            return path

    # -- bookkeeping ------------------------------------------------------------------------------
    def _problem(self, reason: str, rel: str, line, detail: str = "", text: str = "") -> None:
        where = f"{rel}:{line}" if line is not None else rel
        self.acc.drop(reason, where, text, detail or None)
        f = self.per_file.setdefault(rel, {"records": 0, "docs": 0, "problems": {}})
        p = f["problems"].setdefault(reason, {"count": 0, "lines": []})
        p["count"] += 1
        if line is not None and len(p["lines"]) < MAX_PROBLEM_LINES:
            p["lines"].append(line)

    def _doc(self, text: str, rel: str, line, ident: str, extra: dict | None = None):
        """The Document for a decoded text, after the empty/length checks (or None). `extra`: the
        record's other fields (its id, source, metadata), kept as metadata["record"] and written
        back next to the text (output.keep_input_fields)."""
        self.acc.chars_in += len(text)
        if not text.strip():
            self._problem("empty_document", rel, line)
            return None
        limit = self.rcfg["max_doc_chars"]
        if limit and len(text) > limit:
            if self.rcfg["on_long_doc"] == "skip":
                self._problem("too_long", rel, line, f"{len(text)} chars > {limit}", text)
                return None
            cut = text.rfind("\n", 0, limit + 1)  # at the last line break that fits, else mid-line
            text = text[: cut if cut > 0 else limit]
            self.acc.count("truncated")
            self.per_file[rel].setdefault("truncated", 0)
            self.per_file[rel]["truncated"] += 1
        self.acc.docs_out += 1
        self.acc.chars_out += len(text)
        self.per_file[rel]["docs"] += 1
        meta = {"file": rel, "line": line}
        if extra:
            meta["record"] = extra
        return Document(text=text, id=ident, metadata=meta)

    def _decode(self, raw: bytes, rel: str, line):
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if self.rcfg["on_bad_utf8"] == "replace":
                self.acc.count("invalid_utf8_replaced")
                return raw.decode("utf-8", errors="replace")
            self._problem("invalid_utf8", rel, line, f"{e.reason} at byte {e.start}")
            return None

    # -- formats ----------------------------------------------------------------------------------
    def _owned(self) -> bool:
        """Is the next record this task's? (record sharding; counts every record seen)"""
        i = self.record_index
        self.record_index += 1
        return not self.shard_by_record or i % self.world_size == self.rank

    def _jsonl(self, path: str, rel: str):
        field = self.rcfg["text_field"]
        fields = (field,) if field else TEXT_FIELDS
        with open_binary(path) as fh:
            for n, raw in read_lines(fh, self.rcfg["max_line_bytes"]):
                if raw is not None and not raw.strip():
                    continue
                if not self._owned():
                    continue
                self.acc.docs_in += 1
                self.per_file[rel]["records"] += 1
                if raw is None:
                    self._problem("line_too_long", rel, n, f"> {self.rcfg['max_line_bytes']} bytes")
                    continue
                line = self._decode(raw, rel, n)  # counts invalid_utf8 (or replaces)
                if line is None:
                    continue
                try:
                    rec = orjson.loads(line)
                except orjson.JSONDecodeError as e:
                    self._problem("invalid_json", rel, n, str(e), line)
                    continue
                if not isinstance(rec, dict):
                    self._problem("invalid_json", rel, n, f"expected an object, got {type(rec).__name__}")
                    continue
                key = next((k for k in fields if isinstance(rec.get(k), str)), None)
                if key is None:
                    self._problem("missing_field", rel, n, f"no string field {' / '.join(fields)}")
                    continue
                extra = {k: v for k, v in rec.items() if k != key}  # id and metadata go back to the output
                doc = self._doc(rec[key], rel, n, f"{rel}:{n}", extra)
                if doc is not None:
                    yield doc

    def _parquet(self, path: str, rel: str):
        import pyarrow.parquet as pq

        field = self.rcfg["text_field"]
        with open(path, "rb") as raw:
            pf = pq.ParquetFile(raw)
            names = pf.schema_arrow.names
            col = field if field else next((k for k in TEXT_FIELDS if k in names), None)
            if col not in names:
                if not self.shard_by_record or self.file_index % self.world_size == self.rank:
                    self._problem("missing_field", rel, None, f"no column {col or ' / '.join(TEXT_FIELDS)} in {names}")
                return
            row = 0
            for batch in pf.iter_batches(batch_size=1024):
                for rec in batch.to_pylist():
                    row += 1
                    if not self._owned():
                        continue
                    self.acc.docs_in += 1
                    self.per_file[rel]["records"] += 1
                    value = rec.pop(col)
                    if not isinstance(value, str):
                        self._problem("missing_field", rel, row, f"{col} is {type(value).__name__}")
                        continue
                    doc = self._doc(value, rel, row, f"{rel}:{row}", {k: json_value(v) for k, v in rec.items()})
                    if doc is not None:
                        yield doc

    def _text(self, path: str, rel: str):
        unit = self.rcfg["text_unit"]
        cap = (self.rcfg["max_doc_chars"] or (1 << 40)) * 4 + 4  # bytes worth keeping per document
        limit = min(self.rcfg["max_line_bytes"], cap)
        if unit == "file":
            if not self._owned():
                return
            self.acc.docs_in += 1
            self.per_file[rel]["records"] += 1
            parts, size = [], 0
            with open_binary(path) as fh:
                for n, raw in read_lines(fh, limit):
                    if raw is None:
                        self._problem("line_too_long", rel, n, f"> {limit} bytes")
                    elif size <= cap:  # past that the document is cut anyway: read on, keep nothing
                        text = self._decode(raw, rel, n)
                        if text is not None:
                            parts.append(text)
                            size += len(raw) + 1
            doc = self._doc("\n".join(parts), rel, None, rel)
            if doc is not None:
                yield doc
            return
        # line / paragraph units: a record is a non-blank line or a blank-line separated block
        block: list[str] = []
        start, mine, size = None, False, 0
        with open_binary(path) as fh:
            for n, raw in read_lines(fh, limit):
                if raw is not None and not raw.strip():
                    if unit == "paragraph" and start is not None:
                        doc = self._doc("\n".join(block), rel, start, f"{rel}:{start}") if mine and block else None
                        block, start, size = [], None, 0
                        if doc is not None:
                            yield doc
                    continue
                if start is None:
                    start, mine = n, self._owned()
                    if mine:
                        self.acc.docs_in += 1
                        self.per_file[rel]["records"] += 1
                if mine:
                    if raw is None:
                        self._problem("line_too_long", rel, n, f"> {limit} bytes")
                    elif size <= cap:
                        text = self._decode(raw, rel, n)
                        if text is not None:
                            block.append(text)
                            size += len(raw) + 1
                if unit == "line":
                    doc = self._doc(block[0], rel, start, f"{rel}:{start}") if mine and block else None
                    block, start, size = [], None, 0
                    if doc is not None:
                        yield doc
        if start is not None and mine and block:
            doc = self._doc("\n".join(block), rel, start, f"{rel}:{start}")
            if doc is not None:
                yield doc

    # -- datatrove entry point --------------------------------------------------------------------
    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        self.rank, self.world_size = rank, world_size
        self.acc = Account(self.examples, self.excerpt_chars)
        self.per_file: dict[str, dict] = {}
        self.record_index = 0
        files = self.files if self.shard_by_record else self.files[rank::world_size]
        for self.file_index, path in enumerate(files):
            rel = self.rel(path)
            mine = not self.shard_by_record or self.file_index % world_size == rank
            self.per_file.setdefault(rel, {"records": 0, "docs": 0, "problems": {}})
            if mine:
                self.acc.count("files")
            fmt = file_format(path)
            reader = {"jsonl": self._jsonl, "parquet": self._parquet, "text": self._text}[fmt]
            try:
                for doc in reader(path, rel):
                    self.stat_update("documents")
                    yield doc
            except (OSError, EOFError, ValueError, lzma.LZMAError) as e:  # truncated/corrupt archives, bad parquet
                if mine:
                    self._problem("unreadable_file", rel, None, f"stopped at {type(e).__name__}: {e}")
            except Exception as e:  # noqa: BLE001 - e.g. zstd.ZstdError, pyarrow errors: one bad file must not stop the run
                if mine:
                    self._problem("unreadable_file", rel, None, f"stopped at {type(e).__name__}: {e}")
        part = self.acc.to_dict()
        part["files"] = {k: v for k, v in self.per_file.items() if v["records"] or v["problems"] or v.get("truncated")}
        write_part(self.report_dir, self.key, rank, part)


class RankReader(BaseReader):
    """Reads back this task's intermediate shard `FOLDER/RANK.jsonl` (written by `ShardWriter`), in
    order: the dedup stages address documents by their index in it."""

    name = "📖 intermediate shard"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        path = os.path.join(self.folder, f"{rank:05d}.jsonl")
        if not os.path.exists(path):  # the task had no documents left
            return
        with open(path, "rb") as f:
            for line in f:
                d = orjson.loads(line)
                yield Document(text=d["text"], id=d["id"], metadata=d.get("metadata") or {})


def _intermediate_adapter(self, doc: Document) -> dict:
    return {"text": doc.text, "id": doc.id, "metadata": doc.metadata}


class ShardWriter(JsonlWriter):
    """JsonlWriter for one shard per task; a rerun of a task first removes what an interrupted run
    of it left (a task with no documents must not leave an old shard behind)."""

    name = "🐿 Jsonl shard"

    def __init__(self, folder: str, compression: str | None = None, adapter=None):
        suffix = {None: "", "gzip": ".gz", "zstd": ".zst"}[compression]
        super().__init__(folder, output_filename="${rank}.jsonl" + suffix, compression=compression,
                         adapter=adapter or _intermediate_adapter)
        self.folder_path, self.suffix = folder, suffix

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        stale = Path(self.folder_path) / f"{rank:05d}.jsonl{self.suffix}"
        if stale.exists():
            stale.unlink()
        yield from super().run(data, rank, world_size)


def json_value(v):
    """A parquet cell as JSON can hold it (bytes, dates and decimals as text)."""
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, dict):
        return {str(k): json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_value(x) for x in v]
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    return str(v)


def ptd_adapter(fields: tuple[str, ...], keep_input_fields: bool = True):
    """TeleChat-PTD records: {"data": text}, the input record's other fields (its id and metadata;
    `keep_input_fields`), then the chosen pipeline fields (language, quality_score, ...; "id" is
    where the document was read, FILE:LINE) where the record has no field of that name."""

    def adapter(self, doc: Document) -> dict:
        rec = {"data": doc.text}
        record = doc.metadata.get("record") or {}
        if keep_input_fields:
            rec.update((k, v) for k, v in record.items() if k != "data")
        for k in fields:
            if k in rec:
                continue
            if k == "id":
                rec["id"] = doc.id
            elif k in doc.metadata and k != "record":
                rec[k] = doc.metadata[k]
            elif k in record:
                rec[k] = record[k]
        return rec

    return adapter


def removed_record(doc: Document, stage: str, reason: str, detail: str | None) -> dict:
    """A removed document for the sidecar: its text, where it was read, why it was removed, and
    the input record's other fields."""
    rec = {"data": doc.text, "location": doc.id, "stage": stage, "reason": reason}
    if detail:
        rec["detail"] = detail
    for k, v in (doc.metadata.get("record") or {}).items():
        rec.setdefault(k, v)
    return rec

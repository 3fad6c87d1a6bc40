"""SFT samples (TeleChat's recipe, spec section 6) and pre-training token blocks, as memory-mappable arrays.

SFT: `data.json` maps dialogue files (JSON lines, or .json arrays) to weights; records may be in
any format of formats.RECORD_FORMATS, told apart per record. With TeleChat's chat format each kept
dialogue becomes `[<_system> system] ([<_user>] q [<_bot>] a [<_end>])*` with loss on `<_user>` and
on each `<_bot>`..`<_end>` span; with the tokenizer's own chat template (formats.encode_template)
it is rendered by the template, with loss on the assistant turns. Whole dialogues are packed
greedily into `max_seq_len` and left-padded. The manifest counts each source's record formats.
Pre-training: documents + `<_end>`, concatenated and cut into fixed-length blocks.

Workers only parse and tokenize (the costly part); selection, order and packing happen in the
parent, so the output is byte-identical whatever the number of workers.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..tokenizer import Tokenizer, load_tokenizer
from .formats import (CHAT_FORMATS, detect_format, encode_template, parse_alpaca, parse_messages, template_sha256,
                      unknown_format)

FORMAT = "telechat-prepared-v1"
MAX_EXAMPLES = 5  # file:line examples kept per skip reason
CHUNK = 64  # records per worker task (small: the workers finish together)
TASK_BYTES = 4 << 20  # ... and at most this much text per task, so in-flight text stays bounded
WINDOW = 4  # tasks in flight per worker
# Default line caps (--max-line-bytes). SFT: a record must fit in max_seq_len tokens, and no
# tokenizer needs anywhere near 256 bytes of JSON per token (a JSON-escaped CJK character is 6).
# Pre-training documents are cut into blocks, so a long one is legitimate, up to a fixed cap.
SFT_BYTES_PER_TOKEN = 256
SFT_MIN_LINE_BYTES = 1 << 20
PRETRAIN_MAX_LINE_BYTES = 64 << 20
PIECE_CHARS = 1 << 16  # long documents are tokenized in pieces of about this many characters
_SURROGATE = re.compile("[\ud800-\udfff]")
_REASON = re.compile("[a-z_]+")  # "reason: detail" of our own ValueErrors; others are the tokenizer's

_TOKENIZER: Tokenizer | None = None  # per worker process


class DataError(ValueError):
    """Bad data.json, input files or tokenizer (the message names the file and what is wrong)."""


# ---- reading ---------------------------------------------------------------------------------
def read_data_json(path: str | Path) -> list[tuple[Path, float]]:
    """[(file, weight)] from `{"path": weight}`; relative paths are relative to data.json's folder."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data.json not found")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(spec, dict) or not spec:
        raise DataError(f"{path}: expected an object {{\"file.jsonl\": weight, ...}}, got {type(spec).__name__}")
    out = []
    for name, weight in spec.items():
        f = Path(name) if Path(name).is_absolute() else path.parent / name
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0 or not math.isfinite(weight):
            raise DataError(f"{path}: weight of {name!r} must be a number >= 0, got {weight!r}")
        if not f.is_file():
            raise DataError(f"{path}: data file {f} does not exist")
        out.append((f, float(weight)))
    return out


def default_max_line_bytes(mode: str, max_seq_len: int) -> int:
    """The line cap used when none is given: see SFT_BYTES_PER_TOKEN and PRETRAIN_MAX_LINE_BYTES."""
    if mode == "sft":
        return max(SFT_MIN_LINE_BYTES, SFT_BYTES_PER_TOKEN * max_seq_len)
    return PRETRAIN_MAX_LINE_BYTES


def read_lines(path: str | Path, max_bytes: int):
    """(line number, raw bytes without the newline, or None when the line is longer than max_bytes,
    length in bytes) of a file; blank lines skipped. An oversized line is read past in small
    pieces, never held whole, so memory does not grow with the longest line."""
    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    with fh:
        n = 0
        while True:
            try:
                raw = fh.readline(max_bytes + 2)  # + room for "\r\n"
            except OSError as e:
                raise DataError(f"{path}: cannot read after line {n} ({e.strerror or e})") from None
            if not raw:
                return
            n += 1
            size = len(raw)
            if not raw.endswith(b"\n") and size == max_bytes + 2:  # longer still: stream past the rest
                raw = None
                while True:
                    piece = fh.readline(1 << 20)
                    size += len(piece)
                    if not piece or piece.endswith(b"\n"):
                        size -= len(piece) - len(piece.rstrip(b"\r\n"))
                        break
                yield n, None, size
                continue
            held = [raw.rstrip(b"\r\n")]
            del raw
            size = len(held[0])
            if size > max_bytes:
                yield n, None, size
            elif held[0].strip():
                yield n, held.pop(), size  # this suspended frame keeps no reference to the line


def is_json_array(path: str | Path) -> bool:
    """A .json file whose first non-blank byte is "[" (LLaMA-Factory's datasets); other files are JSON lines."""
    if Path(path).suffix != ".json":
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096).lstrip(b" \t\r\n\xef\xbb\xbf")  # a UTF-8 BOM too
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    return head[:1] == b"["


_JSON_MARKS = re.compile(rb'["\\\[\]{},\n]')


def read_json_array(path: str | Path, max_bytes: int):
    """(line number, raw bytes | None | "reason: detail", length in bytes) of each element of a
    file holding one JSON array, the line being where the element starts. Like read_lines, it
    streams: an element over max_bytes is read past without being held (None), so memory does not
    grow with the file or the largest element. Brackets, commas and strings are tracked by a scan
    over the bytes; the elements themselves are parsed later, like lines."""
    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    depth, in_str, skip, line, closed = 0, False, -1, 1, False  # skip: a byte escaped by a backslash
    held, size, start = bytearray(), 0, None  # the current element: bytes (None once over the cap), line

    def add(seg: bytes) -> None:
        nonlocal held, size, start
        if start is None:
            rest = seg.lstrip()
            if rest:
                start = line - rest.count(b"\n")  # `line` is the line at the end of seg
        size += len(seg)
        if held is not None:
            if size <= max_bytes:
                held += seg
            else:
                held = None

    def finish():
        nonlocal held, size, start
        out = None if start is None else (start, None if held is None else bytes(held).strip(), size)
        held, size, start = bytearray(), 0, None
        return out

    with fh:
        while True:
            try:
                chunk = fh.read(1 << 20)
            except OSError as e:
                raise DataError(f"{path}: cannot read after line {line} ({e.strerror or e})") from None
            if not chunk:
                break
            pos = 0  # chunk[pos:] is not yet added to the current element
            for m in _JSON_MARKS.finditer(chunk):
                i = m.start()
                c = chunk[i]
                if i == skip:
                    continue
                if c == 0x0A:
                    line += 1
                elif in_str:
                    if c == 0x5C:
                        skip = i + 1
                    elif c == 0x22:
                        in_str = False
                elif c == 0x22:
                    in_str = True
                elif c in b"[{":
                    if depth == 0:
                        if closed or c != 0x5B:
                            yield line, "invalid_json: more than one JSON value in the file", 0
                            return
                        pos = i + 1
                    depth += 1
                elif c in b"]}":
                    depth -= 1
                    if depth == 0:
                        if c != 0x5D:
                            yield line, "invalid_json: unbalanced brackets", 0
                            return
                        add(chunk[pos:i])  # the array's "]": its last element ends here
                        out = finish()
                        if out:
                            yield out
                        closed, pos = True, i + 1
                elif c == 0x2C and depth == 1:  # a "," between elements
                    add(chunk[pos:i])
                    out = finish()
                    if out:
                        yield out
                    pos = i + 1
            skip = skip - len(chunk) if skip >= len(chunk) else -1
            if depth > 0:
                add(chunk[pos:])
            elif closed and chunk[pos:].strip():
                yield line, "invalid_json: data after the JSON array's closing ]", 0
                return
    if not closed:
        out = finish()
        if out:
            yield out  # parsed later: reported as bad JSON, with its line
        yield line, "invalid_json: the file ends inside the JSON array (no closing ])", 0


def read_records(path: str | Path, max_bytes: int):
    """read_json_array for a .json file holding an array, else read_lines."""
    return read_json_array(path, max_bytes) if is_json_array(path) else read_lines(path, max_bytes)


def _too_large(size: int, max_bytes: int, what: str = "line") -> str:
    return f"too_large: {what} of {size:,} bytes is over the limit of {max_bytes:,} (--max-line-bytes)"


def copies(weight: float, rng: np.random.Generator) -> int:
    """The spec's weighting: w < 1 keeps a record with probability w; w >= 1 keeps floor(w) copies
    and one more with probability frac(w)."""
    whole, frac = int(weight), weight - int(weight)
    return whole + (1 if frac > 0 and rng.random() < frac else 0)


# ---- one record -> ids and loss mask (runs in workers) ------------------------------------------
def parse_dialogue(raw: bytes) -> tuple[str | None, list[tuple[str, str]]]:
    """(system, [(question, answer), ...]) of one JSON line, or ValueError("reason: detail")."""
    return parse_record(raw)[1:3]


def parse_record(raw: bytes) -> tuple[str, str | None, list[tuple[str, str]], tuple[int, ...]]:
    """(record format, system, turns, turns without loss) of one JSON record in any of
    formats.RECORD_FORMATS, told apart by its fields; ValueError("reason: detail") for a bad or
    unknown one. Only OpenAI records can hold turns without loss (`"weight": 0`)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"bad_encoding: not UTF-8 ({e.reason} at byte {e.start})") from None
    rec = _json(text)
    if not isinstance(rec, dict):
        raise ValueError(f"invalid_json: expected an object, got {type(rec).__name__}")
    fmt = detect_format(rec)
    if fmt is None:
        raise unknown_format(rec)
    quiet: tuple[int, ...] = ()
    if fmt == "telechat":
        return fmt, None, _parse_telechat(rec), quiet
    if fmt == "alpaca":
        system, turns = parse_alpaca(rec)
    elif fmt in ("sharegpt", "openai"):
        system, turns, quiet = parse_messages(rec, fmt)
    else:
        system, turns = _parse_telechat2(rec)
    if system:
        _no_surrogates(system, "the system prompt")
    turns = _checked(turns)
    if len(quiet) == len(turns):
        raise ValueError("no_loss: every assistant message has weight 0")
    return fmt, system, turns, quiet


def _parse_telechat2(rec: dict) -> tuple[str | None, list[tuple[str, str]]]:
    system, dialog = rec.get("system"), rec["dialog"]
    if system is not None and not isinstance(system, str):
        raise ValueError("missing_field: 'system' must be a string")
    if not isinstance(dialog, list) or not dialog:
        raise ValueError("missing_field: 'dialog' must be a non-empty list")
    turns = []
    for i in range(0, len(dialog), 2):
        pair = dialog[i:i + 2]
        roles = [m.get("role") if isinstance(m, dict) else None for m in pair]
        if roles != ["user", "bot"][:len(pair)] or len(pair) < 2:
            raise ValueError(f"unequal_turns: dialog must alternate user/bot and end with bot (at {i}: {roles})")
        if not all(isinstance(m.get("content"), str) for m in pair):
            raise ValueError(f"missing_field: dialog[{i}] content must be a string")
        turns.append((pair[0]["content"], pair[1]["content"]))
    return system or None, turns


def _parse_telechat(rec: dict) -> list[tuple[str, str]]:
    if "input" not in rec or "output" not in rec:
        missing = [k for k in ("input", "output") if k not in rec]
        raise ValueError(f"missing_field: no {' and no '.join(repr(k) for k in missing)}")
    inp, out = rec["input"], rec["output"]
    if not isinstance(inp, str) or not isinstance(out, str):
        raise ValueError("missing_field: 'input' and 'output' must be strings")
    if inp.count("<_user>") != inp.count("<_bot>") + 1 and not (inp.count("<_user>") == 0 == inp.count("<_bot>")):
        raise ValueError(f"unequal_markers: {inp.count('<_user>')} <_user> and {inp.count('<_bot>')} <_bot> in input")
    if "<_user>" not in inp:
        return _checked([(inp, out)])
    if not inp.startswith("<_user>"):
        raise ValueError("unequal_markers: input must start with <_user>")
    turns = []
    for chunk in inp.split("<_user>")[1:]:
        q, _, a = chunk.partition("<_bot>")
        turns.append([q, a])
    turns[-1][1] = out
    return _checked([tuple(t) for t in turns])


def _json(text: str):
    """json.loads, with every way a line can fail as ValueError("invalid_json: ...")."""
    try:
        return json.loads(text)
    except RecursionError:  # e.g. 100,000 nested brackets
        raise ValueError("invalid_json: nested too deeply") from None
    except ValueError as e:  # malformed, or an integer over Python's 4300-digit limit
        raise ValueError(f"invalid_json: {e}") from None


def _no_surrogates(text: str, where: str) -> None:
    """JSON can carry lone UTF-16 surrogates ("\\ud800") that no tokenizer can encode."""
    m = _SURROGATE.search(text)
    if m:
        raise ValueError(f"bad_encoding: lone surrogate U+{ord(m.group()):04X} in {where} at character {m.start()}")


def _checked(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    for i, (q, a) in enumerate(turns):
        if not a.strip():
            raise ValueError(f"empty_answer: turn {i + 1} has an empty answer")
        _no_surrogates(q, f"turn {i + 1}'s question")
        _no_surrogates(a, f"turn {i + 1}'s answer")
    return turns


def encode_dialogue(tok: Tokenizer, system: str | None, turns: list[tuple[str, str]], quiet=()
                    ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(ids int32, loss mask uint8, part lengths): the system prefix (if any) and each turn are
    parts, so a dialogue can be cut at a turn boundary. Turns numbered in `quiet` get no loss."""
    ids: list[int] = []
    lengths: list[int] = []
    answers: list[tuple[int, int]] = []  # [<_bot> .. <_end>] spans
    if system:
        ids += [tok.system_id, *tok.encode(system)]
        lengths.append(len(ids))
    for q, a in turns:
        start = len(ids)
        ids.append(tok.user_id)
        ids += tok.encode(q)
        bot = len(ids)
        ids.append(tok.bot_id)
        ids += tok.encode(a)
        ids.append(tok.eos_id)
        answers.append((start, bot))
        lengths.append(len(ids) - start)
    mask = np.zeros(len(ids), np.uint8)
    for t, ((user, bot), n) in enumerate(zip(answers, lengths[len(lengths) - len(answers):])):
        if t in quiet:
            continue
        mask[user] = 1
        mask[bot:user + n] = 1
    return np.asarray(ids, np.int32), mask, lengths


def _sft_worker(chat_format: str, task):
    """[(meta, (ids, loss mask, part lengths, has a prefix part, record format) | "reason: detail")]
    for a chunk of (meta, raw line | "reason: detail") items, in `chat_format` ("telechat": the
    control tokens, "template": the tokenizer's chat template). One bad record never stops the others."""
    out = []
    for meta, raw in task:
        if isinstance(raw, str):  # already judged by the reader
            out.append((meta, raw))
            continue
        try:
            fmt, system, turns, quiet = parse_record(raw)
            if chat_format == "template":
                ids, mask, lengths, prefix = encode_template(_TOKENIZER, system, turns, quiet)
            else:
                if system and _TOKENIZER.system_id is None:
                    raise ValueError("no_system_token: the record has a system prompt and the tokenizer no <_system>")
                ids, mask, lengths = encode_dialogue(_TOKENIZER, system, turns, quiet)
                prefix = bool(system)
        except ValueError as e:
            reason = str(e).partition(": ")[0]
            out.append((meta, str(e) if _REASON.fullmatch(reason) else f"tokenizer_error: {type(e).__name__}: {e}"))
            continue
        except Exception as e:  # a tokenizer or template failing on odd text: that record only
            out.append((meta, f"tokenizer_error: {type(e).__name__}: {e}"))
            continue
        out.append((meta, (ids, mask, lengths, prefix, fmt)))
    return out


def _encode_pieces(tok: Tokenizer, text: str, end_id: int | None) -> list[np.ndarray]:
    """tok.encode(text) (+ end_id) as int32 arrays, a long text in pieces of about PIECE_CHARS cut
    before a space (where SentencePiece and byte-level BPE split words anyway), so the tokenizer's
    own working memory stays small whatever the document's length."""
    parts, start = [], 0
    while start < len(text):
        end = start + PIECE_CHARS
        if end < len(text):
            cut = text.rfind(" ", start + PIECE_CHARS // 2, end)
            if cut > start:
                while cut > start + 1 and text[cut - 1] == " ":  # keep a run of spaces whole
                    cut -= 1
                end = cut
        parts.append(np.asarray(tok.encode(text[start:end]), np.int32))
        start = end
    if end_id is not None:
        parts.append(np.asarray([end_id], np.int32))
    return parts


def encode_long(tok: Tokenizer, text: str, end_id: int | None = None) -> np.ndarray:
    """tok.encode(text) (+ end_id) as one int32 array, a long text tokenized in pieces."""
    parts = _encode_pieces(tok, text, end_id)
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def _text_worker(task):
    """[(where, [int32 pieces of ids + <_end>] | "reason: detail")] for a chunk of (where, text)."""
    out = []
    for where, text in task:
        try:
            out.append((where, _encode_pieces(_TOKENIZER, text, _TOKENIZER.eos_id)))
        except Exception as e:  # a tokenizer failing on odd text: that document only
            out.append((where, f"tokenizer_error: {type(e).__name__}: {e}"))
    return out


def _init_worker(tok_path: str | None) -> None:
    global _TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if tok_path is not None:  # spawned; a forked worker has the parent's tokenizer already
        _TOKENIZER = load_tokenizer(tok_path)


def _tasks(items, size_of):
    """Lists of up to CHUNK items and about TASK_BYTES of text, from an iterable, lazily."""
    task, nbytes = [], 0
    for item in items:
        task.append(item)
        nbytes += size_of(item)
        if len(task) >= CHUNK or nbytes >= TASK_BYTES:
            yield task
            task, nbytes = [], 0
    if task:
        yield task


def _map(fn, tasks, tokenizer: Tokenizer, tok_path: str, workers: int):
    """fn over an iterable of tasks, results in order; in-process for one worker, else a fork pool
    of `workers` processes fed a few tasks at a time (the reader never runs far ahead)."""
    global _TOKENIZER
    _TOKENIZER = tokenizer
    tasks = iter(tasks)
    if workers <= 1:
        yield from map(fn, tasks)
        return
    fork = "fork" in multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if fork else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(None if fork else tok_path,)) as pool:
        while True:
            window = list(itertools.islice(tasks, workers * WINDOW))
            if not window:
                return
            yield from pool.imap(fn, window)


# ---- SFT ---------------------------------------------------------------------------------------
@dataclass
class _Skips:
    counts: dict
    examples: dict

    @classmethod
    def new(cls):
        return cls({}, {})

    def add(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(f"{where}: {detail}" if detail else where)

    def as_dict(self) -> dict:
        return {r: {"count": n, "first": self.examples.get(r, [])} for r, n in sorted(self.counts.items())}


def _check_tokenizer(tok: Tokenizer, path, needed: tuple[str, ...]) -> None:
    missing = [n for n in needed if getattr(tok, n) is None]
    if missing:
        names = {"user_id": "<_user>", "bot_id": "<_bot>", "eos_id": "<_end>", "pad_id": "<_pad>",
                 "system_id": "<_system>"}
        raise DataError(f"{path}: the tokenizer has no {', '.join(names[m] for m in missing)} token; "
                        "TeleChat data needs <_user>, <_bot>, <_end> and a pad token")


def _line_cap(max_line_bytes: int | None, mode: str, max_seq_len: int) -> int:
    if max_line_bytes is None:
        return default_max_line_bytes(mode, max_seq_len)
    if isinstance(max_line_bytes, bool) or not isinstance(max_line_bytes, int) or max_line_bytes < 1:
        raise DataError(f"max_line_bytes must be an integer >= 1, got {max_line_bytes!r}")
    return max_line_bytes


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """"sha256:..." of the tokenizer's id -> token table: equal for two tokenizers that turn text
    into the same ids' meaning, whatever file they were loaded from."""
    if tok.sp is not None:
        tokens = tok.sp.id_to_piece(list(range(tok.vocab_size)))
    else:
        tokens = [tok.id_to_token(i) for i in range(tok.vocab_size)]
    h = hashlib.sha256()
    for i, t in enumerate(tokens):
        h.update(f"{i}\t{'' if t is None else t}\n".encode("utf-8", "surrogatepass"))
    return "sha256:" + h.hexdigest()


def tokenizer_manifest(tok: Tokenizer, path: str | Path) -> dict:
    """The manifest's record of the tokenizer: where it was, its vocabulary size, a fingerprint
    of its vocabulary and the sha256 of its file."""
    h = hashlib.sha256()
    with open(tok.path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return {"tokenizer": str(Path(path).resolve()), "tokenizer_file": str(Path(tok.path).resolve()),
            "tokenizer_vocab_size": tok.vocab_size, "tokenizer_fingerprint": tokenizer_fingerprint(tok),
            "tokenizer_sha256": h.hexdigest()}


def prepare_sft(data_json: str | Path, tokenizer: str | Path, max_seq_len: int, output: str | Path,
                num_samples: int | None = None, num_workers: int = 1, seed: int = 0,
                max_line_bytes: int | None = None, chat_format: str | None = None) -> dict:
    """Pack weighted dialogues into `num_samples` left-padded samples (all of them once if None).

    Records may be in any of formats.RECORD_FORMATS (told apart per record by its fields), in
    JSON-lines files or .json files holding one array. `chat_format` "telechat" lays dialogues out
    with TeleChat's control tokens, "template" with the tokenizer's own chat template (loss on the
    assistant turns only); None picks "telechat" when the tokenizer has <_user> and <_bot>, else
    "template" when it has a chat template. `tokenizer` "default" is the default model's.

    Writes input_ids.npy [N, L] int32, loss_mask.npy [N, L] uint8, segment_ids.npy [N, L] uint16
    (0 = padding, k = the k-th dialogue of the sample, for per-dialogue attention) and manifest.json.
    Lines over `max_line_bytes` (default: default_max_line_bytes("sft", max_seq_len)) are skipped
    as too_large without being read into memory.
    """
    if max_seq_len < 4:
        raise DataError(f"max_seq_len must be >= 4, got {max_seq_len}")
    if num_samples is not None and num_samples < 1:
        raise DataError(f"num_samples must be >= 1, got {num_samples}")
    if chat_format is not None and chat_format not in CHAT_FORMATS:
        raise DataError(f"chat_format must be one of {', '.join(CHAT_FORMATS)}, got {chat_format!r}")
    cap = _line_cap(max_line_bytes, "sft", max_seq_len)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # workers are the parallelism
    sources = read_data_json(data_json)
    tokenizer = resolve_tokenizer(tokenizer)
    tok = load_tokenizer(tokenizer)
    chat_format = sft_chat_format(tok, tokenizer, chat_format)
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id if tok.eos_id is not None else 0
    t0 = time.perf_counter()
    skips, per_file = _Skips.new(), {}

    def selected():
        """((file:line, copies), raw line | "too_large: ...") of the records the weights select,
        in the parent (a seeded stream per source file), read lazily."""
        for fi, (f, w) in enumerate(sources):
            rng = np.random.default_rng([seed, fi])
            stats = per_file.setdefault(str(f), {"weight": w, "records": 0, "selected": 0, "formats": {}})
            for n, raw, size in read_records(f, cap):
                stats["records"] += 1
                k = copies(w, rng)
                stats["selected"] += k
                if k:  # each record is tokenized once, however many copies it gets
                    yield (f"{f}:{n}", k), raw if raw is not None else _too_large(size, cap)

    tasks = _tasks(selected(), lambda item: len(item[1]))
    dialogues, truncated, records = [], 0, 0
    worker = functools.partial(_sft_worker, chat_format)
    for results in _map(worker, tasks, tok, str(tokenizer), num_workers):
        for (where, k), res in results:
            records += 1
            if isinstance(res, str):  # counted once per record, however many copies it was given
                reason, _, detail = res.partition(": ")
                skips.add(reason, where, detail)
                continue
            ids, mask, lengths, has_system, fmt = res
            formats = per_file[where.rpartition(":")[0]]["formats"]
            formats[fmt] = formats.get(fmt, 0) + 1
            keep, length = 0, 0
            for n_part in lengths:  # whole parts (system prefix, turns) while they fit
                if length + n_part > max_seq_len:
                    break
                keep, length = keep + 1, length + n_part
            if keep <= int(has_system):
                skips.add("too_long", where, f"the first turn does not fit in max_seq_len {max_seq_len}")
                continue
            if not mask[:length].any():  # only turns with "weight": 0 fit
                skips.add("too_long", where, f"no turn with loss fits in max_seq_len {max_seq_len}")
                continue
            if keep < len(lengths):
                truncated += k
                ids, mask = ids[:length].copy(), mask[:length].copy()  # not a view pinning the whole record
            dialogues.extend([(ids, mask)] * k)
    if not records:
        raise DataError(f"{data_json}: no records selected (empty files or zero weights)")
    if not dialogues:
        raise DataError(f"{data_json}: every record was skipped: {json.dumps(skips.as_dict(), ensure_ascii=False)}")

    samples, epochs = _pack(dialogues, max_seq_len, num_samples, seed)
    N = len(samples)
    ids = np.full((N, max_seq_len), pad_id, np.int32)
    mask = np.zeros((N, max_seq_len), np.uint8)
    seg = np.zeros((N, max_seq_len), np.uint16)
    for s, members in enumerate(samples):
        pos = max_seq_len - sum(len(dialogues[d][0]) for d in members)  # left padding
        for k, d in enumerate(members, 1):
            a, m = dialogues[d]
            ids[s, pos:pos + len(a)], mask[s, pos:pos + len(a)], seg[s, pos:pos + len(a)] = a, m, k
            pos += len(a)
    manifest = {
        "format": FORMAT, "mode": "sft", "max_seq_len": max_seq_len, "seed": seed,
        "num_samples": N, "epochs": epochs, "pad_id": pad_id, "chat_format": chat_format,
        **({"chat_template": template_sha256(tok.chat_template)} if chat_format == "template" else {}),
        "special_ids": {"user": tok.user_id, "bot": tok.bot_id, "end": tok.eos_id, "system": tok.system_id},
        **tokenizer_manifest(tok, tokenizer), "max_line_bytes": cap, "sources": per_file,
        "dialogues": len(dialogues), "truncated_dialogues": truncated, "warnings": [],
        "skipped": skips.as_dict(), "skipped_total": sum(skips.counts.values()),
        "tokens": int((seg > 0).sum()), "loss_tokens": int(mask.sum()), "padding_tokens": int((seg == 0).sum()),
        "fill": round(float((seg > 0).mean()), 4),
        "arrays": {"input_ids": "int32", "loss_mask": "uint8", "segment_ids": "uint16"},
    }
    _write(Path(output), {"input_ids": ids, "loss_mask": mask, "segment_ids": seg}, manifest)
    manifest["seconds"] = time.perf_counter() - t0
    return manifest


def resolve_tokenizer(tokenizer: str | Path) -> str | Path:
    """A tokenizer folder or file; "default" is the default model's folder (imported on first use)."""
    if str(tokenizer) == "default":
        from ..default_model import resolve_model

        return resolve_model("default")
    return tokenizer


def sft_chat_format(tok: Tokenizer, path, chat_format: str | None = None) -> str:
    """The chat format SFT data gets with this tokenizer (see prepare_sft), checking that it can."""
    telechat_ok = tok.user_id is not None and tok.bot_id is not None
    if chat_format is None:
        chat_format = "telechat" if telechat_ok or not tok.chat_template else "template"
    if chat_format == "template":
        if not tok.chat_template:
            raise DataError(f"{path}: the tokenizer has no chat_template (tokenizer_config.json), so "
                            "--chat-format template cannot be used")
        return chat_format
    missing = [n for n, i in (("<_user>", tok.user_id), ("<_bot>", tok.bot_id), ("<_end>", tok.eos_id),
                              ("pad", tok.pad_id)) if i is None]
    if missing:
        raise DataError(f"{path}: the tokenizer has no {', '.join(missing)} token{'s' if len(missing) > 1 else ''} "
                        "and no chat_template: TeleChat data needs <_user>, <_bot>, <_end> and a pad token, other "
                        "chat models a chat_template in tokenizer_config.json")
    return chat_format


def _pack(dialogues: list, max_seq_len: int, num_samples: int | None, seed: int) -> tuple[list[list[int]], int]:
    """Greedy packing of whole dialogues in a seeded order; passes over the data again (reshuffled)
    until `num_samples` samples exist."""
    samples: list[list[int]] = []
    epoch = 0
    while True:
        order = np.random.default_rng([seed, 1_000_003, epoch]).permutation(len(dialogues))
        current, length = [], 0
        for d in order.tolist():
            n = len(dialogues[d][0])
            if current and length + n > max_seq_len:
                samples.append(current)
                current, length = [], 0
                if num_samples is not None and len(samples) == num_samples:
                    return samples, epoch + 1
            current.append(d)
            length += n
        if current:
            samples.append(current)
        epoch += 1
        if num_samples is None or len(samples) >= num_samples:
            return samples[:num_samples] if num_samples else samples, epoch


# ---- pre-training --------------------------------------------------------------------------------
def _documents(files: list[Path], text_field: str | None, skips: _Skips, cap: int):
    """(file:line or file, text) of each usable document; the others are counted in `skips`."""
    fields = [text_field] if text_field else ["data", "text", "content"]
    for f in files:
        if f.suffix in (".jsonl", ".json"):
            for n, raw, size in read_records(f, cap):
                where = f"{f}:{n}"
                if raw is None:
                    skips.add("too_large", where, _too_large(size, cap).partition(": ")[2])
                    continue
                if isinstance(raw, str):  # a JSON array's structure is broken here
                    reason, _, detail = raw.partition(": ")
                    skips.add(reason, where, detail)
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    skips.add("bad_encoding", where, f"{e.reason} at byte {e.start}")
                    continue
                raw = None  # only one copy of a long line at a time
                try:
                    rec = _json(text)
                except ValueError as e:
                    skips.add("invalid_json", where, str(e).partition(": ")[2])
                    continue
                finally:
                    text = None
                text = next((rec[k] for k in fields if isinstance(rec, dict) and isinstance(rec.get(k), str)), None)
                if text is None:
                    skips.add("missing_field", where, f"no string field {' / '.join(fields)}")
                elif not text.strip():
                    skips.add("empty_text", where)
                else:
                    try:
                        _no_surrogates(text, "the text")
                    except ValueError as e:
                        skips.add("bad_encoding", where, str(e).partition(": ")[2])
                        continue
                    yield where, text
        else:
            try:
                size = f.stat().st_size
                if size > cap:
                    skips.add("too_large", str(f), _too_large(size, cap, "file").partition(": ")[2])
                    continue
                data = f.read_bytes()
            except OSError as e:
                raise DataError(f"{f}: cannot read ({e.strerror or e})") from None
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                skips.add("bad_encoding", str(f), f"{e.reason} at byte {e.start}")
                continue
            del data
            if text.strip():
                yield str(f), text
            else:
                skips.add("empty_text", str(f))


def _check_inputs(files) -> list[Path]:
    files = [Path(f) for f in files]
    for f in files:
        if not f.is_file():
            raise DataError(f"{f}: input file does not exist" if not f.exists() else f"{f}: input is not a file")
    return files


def read_documents(files: list[str | Path], text_field: str | None, skips: _Skips,
                   max_line_bytes: int | None = None):
    """Documents of .jsonl files (the `text_field`, default "data" then "text") and plain-text files
    (one document per file); lines or files over `max_line_bytes` are skipped as too_large."""
    cap = _line_cap(max_line_bytes, "pretrain", 0)
    for _, text in _documents(_check_inputs(files), text_field, skips, cap):
        yield text


def prepare_pretrain(inputs: list[str | Path], tokenizer: str | Path, max_seq_len: int, output: str | Path,
                     text_field: str | None = None, val_fraction: float = 0.01, num_workers: int = 1,
                     seed: int = 0, max_line_bytes: int | None = None) -> dict:
    """Documents + <_end> as fixed-length blocks: train/ and val/ (a seeded document split), each with
    input_ids.npy [N, L] int32 and segment_ids.npy [N, L] uint16 (document k of the block).

    The training split always gets at least one block (documents move over from validation if
    needed); data too small for one block is an error. An empty validation split that was asked
    for, or one larger than the training split, is a warning (manifest "warnings"): the data can
    still be trained on, but without a useful validation loss."""
    if max_seq_len < 2:
        raise DataError(f"max_seq_len must be >= 2, got {max_seq_len}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    cap = _line_cap(max_line_bytes, "pretrain", max_seq_len)
    files = _check_inputs(inputs)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = resolve_tokenizer(tokenizer)
    tok = load_tokenizer(tokenizer)
    _check_tokenizer(tok, tokenizer, ("eos_id",))
    t0 = time.perf_counter()
    skips = _Skips.new()
    tasks = _tasks(_documents(files, text_field, skips, cap), lambda item: len(item[1]))
    encoded, lengths = [], []  # token ids only (in pieces, as tokenized): the texts are not kept
    for results in _map(_text_worker, tasks, tok, str(tokenizer), num_workers):
        for where, res in results:
            if isinstance(res, str):
                reason, _, detail = res.partition(": ")
                skips.add(reason, where, detail)
            else:
                encoded.append(res)
                lengths.append(sum(len(p) for p in res))
    results = res = None  # encoded holds the only reference: blocks free pieces as they copy them
    names = ", ".join(map(str, inputs))
    if not encoded:
        raise DataError(f"no documents in {names}: {json.dumps(skips.as_dict(), ensure_ascii=False)}")
    lengths = np.array(lengths, np.int64)
    if lengths.sum() < max_seq_len:
        raise DataError(f"{names}: {len(encoded)} documents make {int(lengths.sum())} tokens (each with <_end>), "
                        f"fewer than max_seq_len {max_seq_len}: not enough for one block; add data or lower "
                        "--max-seq-len")
    is_val = np.random.default_rng([seed, 7]).random(len(encoded)) < val_fraction
    if val_fraction > 0 and len(encoded) > 1 and not is_val.any():
        is_val[-1] = True  # a validation split was asked for: at least one document
    if is_val.all():
        is_val[0] = False
    warnings, moved = [], 0
    train_tokens = int(lengths[~is_val].sum())
    if train_tokens < max_seq_len:  # training needs one block: take the longest val documents
        val_idx = np.nonzero(is_val)[0]
        for i in val_idx[np.argsort(-lengths[val_idx], kind="stable")]:
            is_val[i] = False
            moved += 1
            train_tokens += int(lengths[i])
            if train_tokens >= max_seq_len:
                break
        warnings.append(f"moved {moved} documents from validation to training, which had fewer than "
                        f"max_seq_len {max_seq_len} tokens (not one block)")
    splits, manifest_splits = {}, {}
    for name, sel in (("train", ~is_val), ("val", is_val)):
        idx = np.nonzero(sel)[0]
        tokens = int(lengths[idx].sum())
        n = tokens // max_seq_len
        # np.empty pages become resident only as they are written, and each piece is freed once copied
        flat = np.empty(n * max_seq_len, np.int32)
        seg = np.empty(n * max_seq_len, np.uint16)  # document k of the block, from 1
        pos, first = 0, 0  # first: the split's document number that the current block starts with
        for k, i in enumerate(idx):
            pieces, encoded[i] = encoded[i][::-1], None  # each document is in one split
            take = min(int(lengths[i]), len(flat) - pos)
            if take <= 0:
                continue
            block_end = (pos // max_seq_len + 1) * max_seq_len
            if pos % max_seq_len == 0:
                first = k
            seg[pos:min(block_end, pos + take)] = k - first + 1
            if pos + take > block_end:  # runs on into blocks that it starts
                seg[block_end:pos + take] = 1
                first = k
            end = pos + take
            while pieces and pos < end:
                piece = pieces.pop()
                m = min(len(piece), end - pos)
                flat[pos:pos + m] = piece[:m]
                pos += m
            del pieces
        splits[name] = {"input_ids": flat.reshape(n, max_seq_len), "segment_ids": seg.reshape(n, max_seq_len)}
        manifest_splits[name] = {"documents": len(idx), "tokens": tokens, "blocks": n,
                                 "dropped_tail_tokens": tokens - n * max_seq_len}
    tr, va = manifest_splits["train"], manifest_splits["val"]
    if val_fraction > 0 and va["blocks"] == 0:
        warnings.append(f"the validation split is empty: --val-fraction {val_fraction} gave {va['documents']} "
                        f"documents with {va['tokens']} tokens, fewer than max_seq_len {max_seq_len}; training "
                        "will report no validation loss (add data, raise --val-fraction or lower --max-seq-len)")
    if va["blocks"] > tr["blocks"]:
        warnings.append(f"the validation split ({va['blocks']} blocks) is larger than the training split "
                        f"({tr['blocks']} blocks): most of the data is not trained on (lower --val-fraction)")
    manifest = {
        "format": FORMAT, "mode": "pretrain", "max_seq_len": max_seq_len, "seed": seed,
        "val_fraction": val_fraction, "end_id": tok.eos_id, **tokenizer_manifest(tok, tokenizer),
        "max_line_bytes": cap, "inputs": [str(Path(f)) for f in inputs], "text_field": text_field,
        "splits": manifest_splits, "moved_to_train": moved, "warnings": warnings,
        "skipped": skips.as_dict(), "skipped_total": sum(skips.counts.values()),
        "arrays": {"input_ids": "int32", "segment_ids": "uint16"},
    }
    _write(Path(output), splits, manifest)
    manifest["seconds"] = time.perf_counter() - t0
    return manifest


# ---- output --------------------------------------------------------------------------------------
def _write(out: Path, arrays: dict, manifest: dict) -> None:
    """Write into a sibling temp folder, then swap it in (never a half-written dataset)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_prepared(out))):
        raise DataError(f"{out}: exists and is not a prepared dataset; refusing to replace it")
    tmp = out.with_name(out.name + ".tmp-prepare")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, value in arrays.items():
        if isinstance(value, dict):  # a split
            (tmp / name).mkdir()
            for k, a in value.items():
                np.save(tmp / name / f"{k}.npy", a)
        else:
            np.save(tmp / f"{name}.npy", value)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _is_prepared(folder: Path) -> bool:
    try:
        return json.loads((folder / "manifest.json").read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_prepared(path: str | Path, split: str | None = None) -> dict:
    """The arrays of a prepared folder, memory-mapped (read-only), plus "manifest"."""
    path = Path(path)
    mf = path / "manifest.json"
    if not mf.exists():
        raise DataError(f"{path}: no manifest.json (not a prepared dataset)")
    manifest = json.loads(mf.read_text(encoding="utf-8"))
    folder = path / split if split else path
    out = {"manifest": manifest}
    for name in manifest["arrays"]:
        out[name] = np.load(folder / f"{name}.npy", mmap_mode="r")
    return out

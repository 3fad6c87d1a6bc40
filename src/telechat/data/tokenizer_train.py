"""Train a TeleChat byte-level BPE tokenizer (HF `tokenizers`) from plain text or JSON-lines files.

The result is a folder with `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`
that `telechat.load_tokenizer(DIR)` and `transformers.AutoTokenizer.from_pretrained(DIR)` both read.

Id layout (fixed, `ID_LAYOUT`; the same for every vocabulary size):

    0 <_unk>   1 <_start>   2 <_end>   3 <_pad>   4 <_user>   5 <_bot>   6 <_system>
    7 .. 106   <reserve1> .. <reserve100>                 (NUM_RESERVED reserved special tokens)
    107 .. 362 the 256 byte-level symbols                  (BYTE_OFFSET .. FIRST_MERGE_ID - 1,
                                                            in code-point order of their characters)
    363 ..     merged tokens, in the order they were learned, up to vocab_size - 1

The names are those of the official 12B SentencePiece tokenizer (which has `<_user>` at 20,
`<_bot>` 21, `<_system>` 22, `<reserve1..100>` 23..122); here they are packed at the front.
All special and reserved tokens are *special* added tokens: never split, matched as one id when
their text appears in the input, and dropped by `decode(..., skip_special_tokens=True)`.

Pipeline: no normalizer (text is never changed), pre-tokenizer = Digits(individual_digits=True)
then ByteLevel(add_prefix_space=False, use_regex=True), ByteLevel decoder. So every digit is its
own token and decode(encode(x)) == x exactly for any text (skipping nothing).
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator

# ---- the fixed layout ------------------------------------------------------------------------------
SPECIAL_TOKENS: tuple[str, ...] = ("<_unk>", "<_start>", "<_end>", "<_pad>", "<_user>", "<_bot>", "<_system>")
NUM_RESERVED = 100
RESERVED_TOKENS: tuple[str, ...] = tuple(f"<reserve{i}>" for i in range(1, NUM_RESERVED + 1))
ALL_SPECIAL_TOKENS: tuple[str, ...] = SPECIAL_TOKENS + RESERVED_TOKENS
ID_LAYOUT: dict[str, int] = {tok: i for i, tok in enumerate(ALL_SPECIAL_TOKENS)}
BYTE_OFFSET = len(ALL_SPECIAL_TOKENS)  # 107: id of the first of the 256 byte-level symbols
FIRST_MERGE_ID = BYTE_OFFSET + 256  # 363: id of the first learned merge
MIN_VOCAB_SIZE = FIRST_MERGE_ID  # specials + the byte alphabet, no merges
DEFAULT_VOCAB_SIZE = 160256  # the 7B TeleChat vocabulary size
DEFAULT_MODEL_MAX_LENGTH = 8192

TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
FALLBACK_TEXT_FIELDS = ("data", "content")  # TeleChat-PTD is {"data": ...}
_PIECE_BYTES = 1 << 20  # a text line longer than this is read (and counted) in pieces of this size
_BATCH_LINES, _BATCH_BYTES = 1024, 1 << 20  # lines handed to the trainer per batch


class TokenizerTrainError(ValueError):
    """Bad input to tokenizer training (caught by the CLI like any ValueError)."""


class InputNotFoundError(FileNotFoundError, TokenizerTrainError):
    """An input file that does not exist."""


class OutputExistsError(FileExistsError, TokenizerTrainError):
    """The output folder exists and holds files that are not a tokenizer's."""


# ---- pipeline and configs --------------------------------------------------------------------------
def new_tokenizer():
    """An untrained tokenizer with TeleChat's byte-level BPE pipeline (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def special_tokens_map() -> dict:
    return {"bos_token": "<_start>", "eos_token": "<_end>", "unk_token": "<_unk>", "pad_token": "<_pad>",
            "additional_special_tokens": ["<_user>", "<_bot>", "<_system>"]}


def tokenizer_config(model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> dict:
    """`tokenizer_config.json`: a plain fast tokenizer that adds nothing and changes no spaces."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", **special_tokens_map(),
            "model_max_length": int(model_max_length), "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False}


# ---- reading the corpus ----------------------------------------------------------------------------
def _new_stats() -> dict:
    return {"lines": 0, "bytes": 0, "skipped_invalid_utf8": 0, "skipped_records": 0}


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _is_jsonl(path: Path) -> bool:
    name = path.name[:-3] if path.suffix == ".gz" else path.name
    return name.lower().endswith(JSONL_SUFFIXES)


def _complete_utf8_len(data: bytes) -> int:
    """Length of `data` without an unfinished multi-byte UTF-8 character at its end."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 != 0x80:  # an ASCII byte or a lead byte
            need = 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
            return len(data) - back if need > back else len(data)
    return len(data)


def _text_lines(f, stats: dict) -> Iterator[str]:
    """A text file's lines (line endings kept); invalid UTF-8 lines are skipped and counted."""
    carry, first = b"", True
    while True:
        raw = f.readline(_PIECE_BYTES)
        if not raw:
            if carry:  # the file ends inside a character
                stats["skipped_invalid_utf8"] += 1
            return
        stats["bytes"] += len(raw)
        data, carry = carry + raw, b""
        if len(raw) == _PIECE_BYTES and not raw.endswith(b"\n"):  # a piece of a long line: finish its last character next time
            cut = _complete_utf8_len(data)
            data, carry = data[:cut], data[cut:]
        if first:
            data, first = data.removeprefix(b"\xef\xbb\xbf"), False
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            stats["skipped_invalid_utf8"] += 1
            continue
        stats["lines"] += 1
        if text:
            yield text


def _jsonl_texts(f, fields: tuple[str, ...], stats: dict) -> Iterator[str]:
    """The text field of each JSON line (the first of `fields` that holds a string)."""
    for raw in f:
        stats["bytes"] += len(raw)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats["skipped_invalid_utf8"] += 1
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            stats["skipped_records"] += 1
            continue
        text = next((record[k] for k in fields if isinstance(record, dict) and isinstance(record.get(k), str)), None)
        if text is None:
            stats["skipped_records"] += 1
            continue
        stats["lines"] += 1
        if text:
            yield text


def iter_texts(files: Iterable[str | os.PathLike], text_field: str = "text", stats: dict | None = None) -> Iterator[str]:
    """Stream the training text of `files`, one line (text files) or record (.jsonl) at a time.

    `.jsonl`/`.ndjson` files give each line's `text_field`, else its "data" or "content" field;
    `.gz` files are read through gzip. Counts go into `stats` (lines, bytes read, skipped lines).
    """
    stats = _new_stats() if stats is None else stats
    fields = tuple(dict.fromkeys((text_field, *FALLBACK_TEXT_FIELDS)))
    for file in files:
        path = Path(file)
        with _open(path) as f:
            yield from (_jsonl_texts(f, fields, stats) if _is_jsonl(path) else _text_lines(f, stats))


def _batches(texts: Iterator[str]) -> Iterator[list[str]]:
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if len(batch) >= _BATCH_LINES or size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# ---- the output folder -----------------------------------------------------------------------------
def _check_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"{output}: exists and is not a folder")
    if output.is_dir():
        others = sorted(p.name for p in output.iterdir() if p.name not in TOKENIZER_FILES)
        if others:
            raise OutputExistsError(f"{output}: refusing to overwrite a folder that holds other files than a "
                                    f"tokenizer's ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}); "
                                    f"choose a new or empty folder")


def _write_output(tok, output: Path, model_max_length: int) -> None:
    """Write the three files into a temporary sibling folder, then move it into place."""
    _check_output(output)
    from ..checkpoint import make_temp_dir, remove_stale_temps

    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(output.parent)  # what killed runs left here
    tmp = make_temp_dir(output.parent, output.name)  # the umask's modes, not mkdtemp's 0700
    try:
        tok.save(str(tmp / "tokenizer.json"))
        for name, content in (("tokenizer_config.json", tokenizer_config(model_max_length)),
                              ("special_tokens_map.json", special_tokens_map())):
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if output.exists():  # an empty folder or an older tokenizer: swap it out, then delete it
            # not a temp name: killed between the renames, the old tokenizer stays (stale temps are deleted)
            old = output.parent / f".{output.name}.previous-{os.getpid()}"
            os.rename(output, old)
            try:
                os.rename(tmp, output)
            except OSError:
                os.rename(old, output)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_layout(tok) -> None:
    """The trained vocabulary must have the documented fixed layout (guards against library changes)."""
    from tokenizers import pre_tokenizers

    wrong = [t for t, i in ID_LAYOUT.items() if tok.token_to_id(t) != i]
    alphabet = {tok.id_to_token(i) for i in range(BYTE_OFFSET, FIRST_MERGE_ID)}
    if wrong or alphabet != set(pre_tokenizers.ByteLevel.alphabet()):
        raise RuntimeError(f"the trained tokenizer does not have the fixed id layout "
                           f"(misplaced: {wrong[:5]}, byte alphabet at {BYTE_OFFSET}..{FIRST_MERGE_ID - 1}: "
                           f"{alphabet == set(pre_tokenizers.ByteLevel.alphabet())})")


# ---- training --------------------------------------------------------------------------------------
def train_tokenizer(inputs: Iterable[str | os.PathLike] | str | os.PathLike, output: str | os.PathLike,
                    vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2, text_field: str = "text",
                    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH, show_progress: bool = False) -> dict:
    """Train a byte-level BPE tokenizer with TeleChat's special tokens on `inputs` and write it to `output`.

    Files are streamed (never loaded whole): text files line by line, `.jsonl` files record by
    record (`text_field`, else "data", else "content"); lines that are not valid UTF-8 are skipped
    and counted. `output` must be new, empty, or an earlier tokenizer folder; it is replaced at once.

    Returns a summary: output, vocab_size (may be below requested_vocab_size when the text has
    fewer merges to learn), requested_vocab_size, files, lines, bytes (read from the inputs),
    skipped_invalid_utf8, skipped_records (JSON lines without text), seconds, mb_per_s.
    """
    from tokenizers import AddedToken, pre_tokenizers, trainers

    files = [Path(inputs)] if isinstance(inputs, (str, os.PathLike)) else [Path(f) for f in inputs]
    if not files:
        raise TokenizerTrainError("no input files given")
    for f in files:
        if not f.exists():
            raise InputNotFoundError(f"input file not found: {f}")
        if not f.is_file():
            raise TokenizerTrainError(f"input is not a file: {f}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerTrainError(f"vocab_size must be an integer >= {MIN_VOCAB_SIZE} ({len(ALL_SPECIAL_TOKENS)} "
                                  f"special tokens + 256 byte symbols), got {vocab_size!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise TokenizerTrainError(f"min_frequency must be an integer >= 1, got {min_frequency!r}")
    if model_max_length < 1:
        raise TokenizerTrainError(f"model_max_length must be >= 1, got {model_max_length!r}")
    output = Path(output)
    _check_output(output)  # fail before a long training run, and again just before writing

    start = time.perf_counter()
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in ALL_SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    stats = _new_stats()
    tok.train_from_iterator(_batches(iter_texts(files, text_field, stats)), trainer)
    if stats["lines"] == 0:
        raise TokenizerTrainError(f"no text to train on in {', '.join(map(str, files))} "
                                  f"(skipped: {stats['skipped_invalid_utf8']} invalid UTF-8 lines, "
                                  f"{stats['skipped_records']} JSON lines without a text field)")
    _check_layout(tok)
    _write_output(tok, output, model_max_length)
    seconds = time.perf_counter() - start
    return {"output": str(output), "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "requested_vocab_size": vocab_size, "files": len(files), **stats, "seconds": round(seconds, 3),
            "mb_per_s": round(stats["bytes"] / 1e6 / seconds, 3) if seconds > 0 else None}

"""Calibration text for GPTQ: files or a folder of text, JSON lines or HF datasets arrow files,
cut into fixed-length token windows."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .format import QuantError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
ARROW_SUFFIXES = (".arrow",)
_CHARS_PER_TOKEN_BUDGET = 16  # read at most this many characters per needed token (ample for any script)


def _kind(path: Path) -> str | None:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(ARROW_SUFFIXES) and not path.name.lower().endswith(".gz"):
        return "arrow"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def calibration_files(source: str | Path) -> list[Path]:
    """A file (any name: read as text unless .jsonl/.arrow), or a folder's known files, recursively, sorted."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p))
        if not files:
            raise QuantError(f"{path}: no calibration files in this folder (expected "
                             f"{', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES + ARROW_SUFFIXES)}, optionally .gz)")
        return files
    raise QuantError(f"{path}: calibration file or folder does not exist")


def _arrow_texts(path: Path, field: str) -> list[str]:
    try:
        import pyarrow as pa
    except ImportError:
        raise QuantError(f"{path}: reading .arrow calibration files needs pyarrow (pip install pyarrow)") from None
    try:
        with pa.memory_map(str(path)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()  # what HF datasets writes
            except pa.ArrowInvalid:
                source.seek(0)
                table = pa.ipc.open_file(source).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise QuantError(f"{path}: not a readable arrow file ({e})") from None
    if field not in table.column_names:
        raise QuantError(f"{path}: no {field!r} column (columns: {', '.join(table.column_names)})")
    return [t for t in table.column(field).to_pylist() if isinstance(t, str)]


def read_calibration_text(source: str | Path, max_chars: int | None = None, text_field: str = "text") -> str:
    """The text of `source`, up to `max_chars`: text files as they are, JSON lines' `text_field`
    (else "data" or "content") and arrow rows' `text_field`, records separated by blank lines."""
    from ..data.tokenizer_train import iter_texts

    parts: list[str] = []
    size = 0
    for file in calibration_files(source):
        kind = _kind(file) or "text"
        if kind == "arrow":
            texts, sep = _arrow_texts(file, text_field), ""  # HF text datasets keep each row's newline
        else:
            texts, sep = iter_texts([file], text_field), ("\n\n" if kind == "jsonl" else "")
        for t in texts:
            parts.append(t + sep)
            size += len(t) + len(sep)
            if max_chars is not None and size >= max_chars:
                return "".join(parts)
    return "".join(parts)


def calibration_samples(tokenizer, source: str | Path, n_samples: int, seq_len: int, seed: int = 0) -> Tensor:
    """`n_samples` windows of `seq_len` tokens [n_samples, seq_len], drawn without overlap from the
    tokenized text of `source` (a seeded choice among its consecutive windows)."""
    if n_samples < 1 or seq_len < 2:
        raise QuantError(f"need at least 1 calibration sample of at least 2 tokens, got --calib-samples "
                         f"{n_samples} and --calib-seq-len {seq_len}")
    text = read_calibration_text(source, max_chars=_CHARS_PER_TOKEN_BUDGET * n_samples * seq_len)
    if not text.strip():
        raise QuantError(f"{source}: the calibration text is empty")
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    windows = ids.numel() // seq_len
    if windows < n_samples:
        raise QuantError(f"{source}: the calibration text has {ids.numel()} tokens, too few for "
                         f"{n_samples} samples of {seq_len} tokens ({n_samples * seq_len} needed); "
                         f"add text or lower --calib-samples / --calib-seq-len")
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(windows, generator=g)[:n_samples].sort().values
    return ids[: windows * seq_len].view(windows, seq_len)[chosen].clone()

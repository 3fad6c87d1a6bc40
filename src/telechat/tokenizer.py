"""TeleChat tokenizers: SentencePiece `tokenizer.model` (12B/1B) and byte-level BPE `tokenizer.json` (7B)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Iterable

_SURROGATE = re.compile("[\ud800-\udfff]")
_SPECIAL_PIECE = re.compile(r"^<(_\w+|reserve\d+|pad|unk|s|/s|\|[\w\-]+\|)>$")
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "specail_tokens_map.json")


class TokenizerError(ValueError):
    """A tokenizer file that is missing or cannot be read."""


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """One interface over both formats: `encode(text) -> ids`, `decode(ids) -> text`, special ids.

    encode() adds no BOS/EOS (TeleChat's `add_bos_token`/`add_eos_token` are false); a
    SentencePiece segment starts with its dummy-prefix "▁" piece, as the published tokenizer does.
    """

    def __init__(self, path: str | Path, tokenizer_config: dict | None = None, generation_config: dict | None = None):
        path = Path(path)
        self.path = path
        self.tokenizer_config = dict(tokenizer_config or {})
        if path.suffix == ".model":
            import sentencepiece as spm

            try:
                self.sp = spm.SentencePieceProcessor(model_file=str(path))
            except (OSError, RuntimeError) as e:
                raise TokenizerError(f"{path}: not a readable SentencePiece model ({e})") from None
            self.hf = None
            self.kind = "sentencepiece"
            self.vocab_size = self.sp.get_piece_size()
            pieces = self.sp.id_to_piece(list(range(self.vocab_size)))  # one call: fast for 120k pieces
            self.special_ids = {i for i, p in enumerate(pieces) if p.startswith("<") and _SPECIAL_PIECE.match(p)
                                and not self.sp.is_byte(i)}
            self.special_ids |= {i for i in range(self.vocab_size) if self.sp.is_control(i)}
        elif path.suffix == ".json":
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self.hf = HFTokenizer.from_file(str(path))
            except Exception as e:
                raise TokenizerError(f"{path}: not a readable tokenizer.json ({e})") from None
            self.sp = None
            self.kind = "hf"
            self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
            self.special_ids = {i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
        else:
            raise TokenizerError(f"{path}: expected a tokenizer.model or tokenizer.json file")
        cfg, gen = self.tokenizer_config, generation_config or {}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template or None

        def pick(gen_key: str, *names: str) -> int | None:
            if isinstance(gen.get(gen_key), int):
                return gen[gen_key]
            for name in names:
                i = self.token_to_id(name) if name else None
                if i is not None:
                    return i
            return None

        self.unk_id = self.sp.unk_id() if self.sp is not None else pick("unk_token_id", _token_content(cfg.get("unk_token")), "<unk>", "<_unk>")
        self.bos_id = pick("bos_token_id", "<_start>", _token_content(cfg.get("bos_token")))
        self.eos_id = pick("eos_token_id", _token_content(cfg.get("eos_token")), "<_end>")
        self.pad_id = pick("pad_token_id", _token_content(cfg.get("pad_token")), "<_pad>", "<pad>")
        self.user_id = pick("user_token_id", "<_user>")
        self.bot_id = pick("bot_token_id", "<_bot>")
        self.system_id = pick("system_token_id", "<_system>")
        for i in (self.bos_id, self.eos_id, self.pad_id, self.user_id, self.bot_id, self.system_id):
            if i is not None:
                self.special_ids.add(i)

    # ---- ids <-> tokens ----------------------------------------------------------------------
    def token_to_id(self, token: str) -> int | None:
        if self.sp is not None:
            i = self.sp.piece_to_id(token)
            return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i
        return self.hf.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        if self.sp is not None:
            return self.sp.id_to_piece(i) if 0 <= i < self.vocab_size else None
        return self.hf.id_to_token(i)

    def encode(self, text: str) -> list[int]:
        try:
            if self.sp is not None:
                return self.sp.encode(text)
            return self.hf.encode(text, add_special_tokens=False).ids
        except (RuntimeError, TypeError):  # what the bindings raise for text that is not UTF-8-encodable
            bad = _SURROGATE.search(text) if isinstance(text, str) else None
            if bad is None:
                raise
            raise ValueError(f"text holds a lone UTF-16 surrogate {ascii(bad.group())} at index {bad.start()}: it is "
                             "not Unicode text and cannot be tokenized") from None

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        if self.sp is not None:
            return self.sp.decode(ids)
        return self.hf.decode(ids, skip_special_tokens=False)

    def __call__(self, text: str) -> dict:
        """HF-style call, for code written against the published tokenizer."""
        return {"input_ids": self.encode(text)}

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({self.kind}, vocab={self.vocab_size}, file={self.path.name})"

    # ---- files -------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Copy the tokenizer file and its side files into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.path.resolve() != (directory / self.path.name).resolve():
            shutil.copyfile(self.path, directory / self.path.name)
        for name in _SIDE_FILES:
            src = self.path.parent / name
            if src.exists() and src.resolve() != (directory / name).resolve():
                shutil.copyfile(src, directory / name)
        if not (directory / "tokenizer_config.json").exists() and self.tokenizer_config:
            (directory / "tokenizer_config.json").write_text(json.dumps(self.tokenizer_config, indent=2, ensure_ascii=False))


def has_tokenizer(path: str | Path) -> bool:
    path = Path(path)
    return path.is_file() or any((path / n).exists() for n in _TOKENIZER_FILES)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of a checkpoint folder (or a `tokenizer.model` / `tokenizer.json` file).

    Special ids come from the tokenizer itself, `tokenizer_config.json` and `generation_config.json`.
    """
    path = Path(path)
    folder = path.parent if path.is_file() else path
    if path.is_file():
        file = path
    else:
        # tokenizer.json (our own or imported) first; the SentencePiece model is the official 12B/1B file.
        file = next((path / n for n in ("tokenizer.json", "tokenizer.model") if (path / n).exists()), None)
        if file is None:
            raise TokenizerError(f"{path}: no tokenizer.model or tokenizer.json found")
    configs = []
    for name in ("tokenizer_config.json", "generation_config.json"):
        f = folder / name
        try:
            configs.append(json.loads(f.read_text(encoding="utf-8")) if f.exists() else {})
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{f}: not valid JSON ({e})") from None
    return Tokenizer(file, configs[0], configs[1])


class StreamDecoder:
    """Turns a stream of token ids into text increments that never split a UTF-8 character.

    Decodes a short window of ids and emits only the text that is complete: a trailing U+FFFD
    (an unfinished byte sequence) waits for the next token.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # ids before this are already emitted
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        done = self.tokenizer.decode(self.ids[self.prefix:self.read], self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix:], self.skip)
        if len(full) > len(done) and not full.endswith("\ufffd"):
            delta = full[len(done):]
            self.prefix, self.read = self.read, len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is left at the end of the stream (an incomplete byte sequence stays as U+FFFD)."""
        done = self.tokenizer.decode(self.ids[self.prefix:self.read], self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix:], self.skip)
        self.prefix = self.read = len(self.ids)
        delta = full[len(done):] if full.startswith(done) else ""
        self.text += delta
        return delta

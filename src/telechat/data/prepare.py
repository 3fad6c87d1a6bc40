"""SFT samples (TeleChat's recipe, spec section 6) and pre-training token blocks, as memory-mappable arrays.

SFT: `data.json` maps dialogue files to weights; each kept dialogue becomes
`[<_system> system] ([<_user>] q [<_bot>] a [<_end>])*` with loss on `<_user>` and on each
`<_bot>`..`<_end>` span; whole dialogues are packed greedily into `max_seq_len` and left-padded.
Pre-training: documents + `<_end>`, concatenated and cut into fixed-length blocks.

Workers only parse and tokenize (the costly part); selection, order and packing happen in the
parent, so the output is byte-identical whatever the number of workers.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..tokenizer import Tokenizer, load_tokenizer

FORMAT = "telechat-prepared-v1"
MAX_EXAMPLES = 5  # file:line examples kept per skip reason
CHUNK = 64  # records per worker task (small: the workers finish together)

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


def _lines(path: Path):
    """(line number, raw bytes) of a file, without trailing newline; blank lines skipped."""
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            raw = raw.rstrip(b"\r\n")
            if raw.strip():
                yield n, raw


def copies(weight: float, rng: np.random.Generator) -> int:
    """The spec's weighting: w < 1 keeps a record with probability w; w >= 1 keeps floor(w) copies
    and one more with probability frac(w)."""
    whole, frac = int(weight), weight - int(weight)
    return whole + (1 if frac > 0 and rng.random() < frac else 0)


# ---- one record -> ids and loss mask (runs in workers) ------------------------------------------
def parse_dialogue(raw: bytes) -> tuple[str | None, list[tuple[str, str]]]:
    """(system, [(question, answer), ...]) of one JSON line, or ValueError("reason: detail")."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"bad_encoding: not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid_json: {e}") from None
    if not isinstance(rec, dict):
        raise ValueError(f"invalid_json: expected an object, got {type(rec).__name__}")
    if "dialog" in rec:
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
        return system or None, _checked(turns)
    if "input" not in rec or "output" not in rec:
        missing = [k for k in ("input", "output") if k not in rec]
        raise ValueError(f"missing_field: no {' and no '.join(repr(k) for k in missing)}")
    inp, out = rec["input"], rec["output"]
    if not isinstance(inp, str) or not isinstance(out, str):
        raise ValueError("missing_field: 'input' and 'output' must be strings")
    if inp.count("<_user>") != inp.count("<_bot>") + 1 and not (inp.count("<_user>") == 0 == inp.count("<_bot>")):
        raise ValueError(f"unequal_markers: {inp.count('<_user>')} <_user> and {inp.count('<_bot>')} <_bot> in input")
    if "<_user>" not in inp:
        return None, _checked([(inp, out)])
    if not inp.startswith("<_user>"):
        raise ValueError("unequal_markers: input must start with <_user>")
    turns = []
    for chunk in inp.split("<_user>")[1:]:
        q, _, a = chunk.partition("<_bot>")
        turns.append([q, a])
    turns[-1][1] = out
    return None, _checked([tuple(t) for t in turns])


def _checked(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    for i, (_, a) in enumerate(turns):
        if not a.strip():
            raise ValueError(f"empty_answer: turn {i + 1} has an empty answer")
    return turns


def encode_dialogue(tok: Tokenizer, system: str | None, turns: list[tuple[str, str]]
                    ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(ids int32, loss mask uint8, part lengths): the system prefix (if any) and each turn are
    parts, so a dialogue can be cut at a turn boundary."""
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
    for (user, bot), n in zip(answers, lengths[len(lengths) - len(answers):]):
        mask[user] = 1
        mask[bot:user + n] = 1
    return np.asarray(ids, np.int32), mask, lengths


def _sft_worker(task):
    """[(ids, loss mask, part lengths, has_system) | "reason: detail"] for a chunk of raw lines."""
    out = []
    for raw in task:
        try:
            system, turns = parse_dialogue(raw)
            if system and _TOKENIZER.system_id is None:
                raise ValueError("no_system_token: the record has a system prompt and the tokenizer no <_system>")
        except ValueError as e:
            out.append(str(e))
            continue
        ids, mask, lengths = encode_dialogue(_TOKENIZER, system, turns)
        out.append((ids, mask, lengths, bool(system)))
    return out


def _text_worker(task):
    return [np.asarray(_TOKENIZER.encode(t) + [_TOKENIZER.eos_id], dtype=np.int32) for t in task]


def _init_worker(tok_path: str | None) -> None:
    global _TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if tok_path is not None:  # spawned; a forked worker has the parent's tokenizer already
        _TOKENIZER = load_tokenizer(tok_path)


def _map(fn, tasks: list, tokenizer: Tokenizer, tok_path: str, workers: int):
    """fn over tasks in order; in-process for one worker, else a fork pool of `workers` processes."""
    global _TOKENIZER
    if workers <= 1:
        _TOKENIZER = tokenizer
        yield from map(fn, tasks)
        return
    fork = "fork" in multiprocessing.get_all_start_methods()
    _TOKENIZER = tokenizer
    ctx = multiprocessing.get_context("fork" if fork else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(None if fork else tok_path,)) as pool:
        yield from pool.imap(fn, tasks)


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
        names = {"user_id": "<_user>", "bot_id": "<_bot>", "eos_id": "<_end>", "pad_id": "<_pad>", "system_id": "<_system>"}
        raise DataError(f"{path}: the tokenizer has no {', '.join(names[m] for m in missing)} token; "
                        "TeleChat data needs <_user>, <_bot>, <_end> and a pad token")


def prepare_sft(data_json: str | Path, tokenizer: str | Path, max_seq_len: int, output: str | Path,
                num_samples: int | None = None, num_workers: int = 1, seed: int = 0) -> dict:
    """Pack weighted dialogues into `num_samples` left-padded samples (all of them once if None).

    Writes input_ids.npy [N, L] int32, loss_mask.npy [N, L] uint8, segment_ids.npy [N, L] uint16
    (0 = padding, k = the k-th dialogue of the sample, for per-dialogue attention) and manifest.json.
    """
    if max_seq_len < 4:
        raise DataError(f"max_seq_len must be >= 4, got {max_seq_len}")
    if num_samples is not None and num_samples < 1:
        raise DataError(f"num_samples must be >= 1, got {num_samples}")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # workers are the parallelism
    sources = read_data_json(data_json)
    tok = load_tokenizer(tokenizer)
    _check_tokenizer(tok, tokenizer, ("user_id", "bot_id", "eos_id", "pad_id"))
    t0 = time.perf_counter()

    # Selection by weight, in the parent (a seeded stream per source file).
    raws, origin, copies_of, skips, per_file = [], [], [], _Skips.new(), {}
    for fi, (f, w) in enumerate(sources):
        rng = np.random.default_rng([seed, fi])
        stats = per_file.setdefault(str(f), {"weight": w, "records": 0, "selected": 0})
        for n, raw in _lines(f):
            stats["records"] += 1
            k = copies(w, rng)
            stats["selected"] += k
            if k:  # each record is tokenized once, however many copies it gets
                raws.append(raw)
                origin.append((fi, n))
                copies_of.append(k)
    if not raws:
        raise DataError(f"{data_json}: no records selected (empty files or zero weights)")

    tasks = [raws[i:i + CHUNK] for i in range(0, len(raws), CHUNK)]
    dialogues, truncated = [], 0
    i = 0
    for results in _map(_sft_worker, tasks, tok, str(tokenizer), num_workers):
        for res in results:
            fi, n = origin[i]
            where = f"{sources[fi][0]}:{n}"
            i += 1
            if isinstance(res, str):  # counted once per record, however many copies it was given
                reason, _, detail = res.partition(": ")
                skips.add(reason, where, detail)
                continue
            ids, mask, lengths, has_system = res
            keep, length = 0, 0
            for n_part in lengths:  # whole parts (system prefix, turns) while they fit
                if length + n_part > max_seq_len:
                    break
                keep, length = keep + 1, length + n_part
            if keep <= int(has_system):
                skips.add("too_long", where, f"the first turn does not fit in max_seq_len {max_seq_len}")
                continue
            if keep < len(lengths):
                truncated += copies_of[i - 1]
            dialogues.extend([(ids[:length], mask[:length])] * copies_of[i - 1])
    if not dialogues:
        raise DataError(f"{data_json}: every record was skipped: {json.dumps(skips.as_dict(), ensure_ascii=False)}")

    samples, epochs = _pack(dialogues, max_seq_len, num_samples, seed)
    N = len(samples)
    ids = np.full((N, max_seq_len), tok.pad_id, np.int32)
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
        "num_samples": N, "epochs": epochs, "pad_id": tok.pad_id,
        "special_ids": {"user": tok.user_id, "bot": tok.bot_id, "end": tok.eos_id, "system": tok.system_id},
        "tokenizer": str(Path(tokenizer).resolve()), "sources": per_file,
        "dialogues": len(dialogues), "truncated_dialogues": truncated,
        "skipped": skips.as_dict(), "skipped_total": sum(skips.counts.values()),
        "tokens": int((seg > 0).sum()), "loss_tokens": int(mask.sum()), "padding_tokens": int((seg == 0).sum()),
        "fill": round(float((seg > 0).mean()), 4),
        "arrays": {"input_ids": "int32", "loss_mask": "uint8", "segment_ids": "uint16"},
    }
    _write(Path(output), {"input_ids": ids, "loss_mask": mask, "segment_ids": seg}, manifest)
    manifest["seconds"] = time.perf_counter() - t0
    return manifest


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
def read_documents(files: list[str | Path], text_field: str | None, skips: _Skips):
    """Documents of .jsonl files (the `text_field`, default "data" then "text") and plain-text files
    (one document per file)."""
    for f in map(Path, files):
        if not f.is_file():
            raise DataError(f"{f}: input file does not exist")
        if f.suffix in (".jsonl", ".json"):
            for n, raw in _lines(f):
                try:
                    rec = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    skips.add("bad_encoding", f"{f}:{n}", e.reason)
                    continue
                except json.JSONDecodeError as e:
                    skips.add("invalid_json", f"{f}:{n}", str(e))
                    continue
                fields = [text_field] if text_field else ["data", "text", "content"]
                text = next((rec[k] for k in fields if isinstance(rec, dict) and isinstance(rec.get(k), str)), None)
                if text is None:
                    skips.add("missing_field", f"{f}:{n}", f"no string field {' / '.join(fields)}")
                elif not text.strip():
                    skips.add("empty_text", f"{f}:{n}")
                else:
                    yield text
        else:
            try:
                text = f.read_bytes().decode("utf-8")
            except UnicodeDecodeError as e:
                skips.add("bad_encoding", str(f), f"{e.reason} at byte {e.start}")
                continue
            if text.strip():
                yield text
            else:
                skips.add("empty_text", str(f))


def prepare_pretrain(inputs: list[str | Path], tokenizer: str | Path, max_seq_len: int, output: str | Path,
                     text_field: str | None = None, val_fraction: float = 0.01, num_workers: int = 1,
                     seed: int = 0) -> dict:
    """Documents + <_end> as fixed-length blocks: train/ and val/ (a seeded document split), each with
    input_ids.npy [N, L] int32 and segment_ids.npy [N, L] uint16 (document k of the block)."""
    if max_seq_len < 2:
        raise DataError(f"max_seq_len must be >= 2, got {max_seq_len}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = load_tokenizer(tokenizer)
    _check_tokenizer(tok, tokenizer, ("eos_id",))
    t0 = time.perf_counter()
    skips = _Skips.new()
    docs = list(read_documents(inputs, text_field, skips))
    if not docs:
        raise DataError(f"no documents in {', '.join(map(str, inputs))}: {json.dumps(skips.as_dict(), ensure_ascii=False)}")
    is_val = np.random.default_rng([seed, 7]).random(len(docs)) < val_fraction
    if val_fraction > 0 and len(docs) > 1 and not is_val.any():
        is_val[-1] = True  # a validation split was asked for: at least one document
    if is_val.all():
        is_val[0] = False
    tasks = [docs[i:i + CHUNK] for i in range(0, len(docs), CHUNK)]
    encoded = [a for res in _map(_text_worker, tasks, tok, str(tokenizer), num_workers) for a in res]
    splits, manifest_splits = {}, {}
    for name, sel in (("train", ~is_val), ("val", is_val)):
        arrays = [a for a, keep in zip(encoded, sel) if keep]
        stream = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
        doc_ids = np.concatenate([np.full(len(a), i, np.int64) for i, a in enumerate(arrays)]) if arrays \
            else np.zeros(0, np.int64)
        n = len(stream) // max_seq_len
        ids = stream[:n * max_seq_len].reshape(n, max_seq_len)
        d = doc_ids[:n * max_seq_len].reshape(n, max_seq_len)
        seg = (d - d[:, :1] + 1).astype(np.uint16) if n else np.zeros((0, max_seq_len), np.uint16)
        splits[name] = {"input_ids": ids, "segment_ids": seg}
        manifest_splits[name] = {"documents": len(arrays), "tokens": int(len(stream)), "blocks": n,
                                 "dropped_tail_tokens": int(len(stream) - n * max_seq_len)}
    manifest = {
        "format": FORMAT, "mode": "pretrain", "max_seq_len": max_seq_len, "seed": seed,
        "val_fraction": val_fraction, "end_id": tok.eos_id, "tokenizer": str(Path(tokenizer).resolve()),
        "inputs": [str(Path(f)) for f in inputs], "text_field": text_field, "splits": manifest_splits,
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

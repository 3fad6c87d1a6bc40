"""Readers for the benchmark files in their original formats.

Every reader returns `Item`s; a malformed file raises `DataError` naming the file, the record
and the field, with what was expected and what was found.
"""
from __future__ import annotations

import bz2
import csv
import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class DataError(ValueError):
    """A benchmark file that is missing or not in the expected format."""


@dataclass
class Item:
    """One benchmark question.

    choices: option texts of a multiple-choice item (None for free-form answers).
    answer: index of the right choice; for free-form items the reference answer (str); for
        multi-answer items a list of indices.
    meta: task-specific fields (a HumanEval test, a BBH target, a passage, ...).
    """
    id: str
    subject: str
    question: str
    choices: list[str] | None = None
    answer: Any = None
    meta: dict = field(default_factory=dict)


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    return path


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-empty line."""
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            yield n, rec


def _field(rec: dict, key: str, where: str, kind=str):
    if key not in rec:
        raise DataError(f"{where}: missing field {key!r} (has {sorted(rec)})")
    v = rec[key]
    if kind is not None and not isinstance(v, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field {key!r} should be {names}, got {type(v).__name__} {v!r:.60}")
    return v


def _letter_index(value: str, n: int, where: str, key: str) -> int:
    v = str(value).strip().upper()
    if len(v) != 1 or v not in LETTERS[:n]:
        raise DataError(f"{where}: field {key!r} should be one of {', '.join(LETTERS[:n])}, got {value!r}")
    return LETTERS.index(v)


def _subject_files(folder: Path, pattern: str, what: str) -> list[Path]:
    files = sorted(folder.glob(pattern))
    if not files:
        raise DataError(f"{folder}: no {what} files ({pattern}) found")
    return files


# ---- MMLU / C-Eval / CMMLU (csv, one file per subject) -------------------------------------------
def read_mmlu_csv(path: Path, subject: str) -> list[Item]:
    """Hendrycks' csv: no header; question, A, B, C, D, answer letter."""
    items = []
    with open(path, encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if len(row) != 6:
                raise DataError(f"{path}: row {n}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
            items.append(Item(f"{subject}/{n - 1}", subject, row[0], row[1:5],
                              _letter_index(row[5], 4, f"{path}: row {n}", "answer")))
    return items


def load_mmlu(folder: Path, split: str = "test") -> dict[str, list[Item]]:
    """`folder/{split}/{subject}_{split}.csv` -> {subject: items}."""
    files = _subject_files(Path(folder) / split, f"*_{split}.csv", f"MMLU {split}")
    return {f.name[: -len(f"_{split}.csv")]: read_mmlu_csv(f, f.name[: -len(f"_{split}.csv")]) for f in files}


def _read_header_csv(path: Path, subject: str, columns: dict[str, str], need_answer: bool) -> list[Item]:
    """C-Eval/CMMLU csv with a header; `columns` maps our names (id, question, A-D, answer) to theirs."""
    items = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for k, c in columns.items() if c not in header and (k != "answer" or need_answer)]
        if missing:
            raise DataError(f"{path}: header should have columns {list(columns.values())}, got {header}")
        for n, row in enumerate(reader, 2):
            where = f"{path}: line {n}"
            ans = row.get(columns["answer"])
            if ans in (None, "") and need_answer:
                raise DataError(f"{where}: field {columns['answer']!r} is empty (expected A-D)")
            answer = _letter_index(ans, 4, where, columns["answer"]) if ans not in (None, "") else None
            rid = row.get(columns["id"]) or str(n - 2)
            items.append(Item(f"{subject}/{rid}", subject, row[columns["question"]],
                              [row[columns[c]] for c in "ABCD"], answer,
                              {"explanation": row["explanation"]} if row.get("explanation") else {}))
    return items


def load_ceval(folder: Path, split: str = "val") -> dict[str, list[Item]]:
    """`folder/{split}/{subject}_{split}.csv` (id,question,A,B,C,D,answer[,explanation]) -> {subject: items}.
    The public test split has no answers, so scoring uses val."""
    cols = {"id": "id", "question": "question", "A": "A", "B": "B", "C": "C", "D": "D", "answer": "answer"}
    files = _subject_files(Path(folder) / split, f"*_{split}.csv", f"C-Eval {split}")
    return {f.name[: -len(f"_{split}.csv")]: _read_header_csv(f, f.name[: -len(f"_{split}.csv")], cols, split != "test")
            for f in files}


def load_cmmlu(folder: Path, split: str = "test") -> dict[str, list[Item]]:
    """`folder/{split}/{subject}.csv` (,Question,A,B,C,D,Answer) -> {subject: items}."""
    cols = {"id": "", "question": "Question", "A": "A", "B": "B", "C": "C", "D": "D", "answer": "Answer"}
    files = _subject_files(Path(folder) / split, "*.csv", f"CMMLU {split}")
    return {f.stem: _read_header_csv(f, f.stem, cols, True) for f in files}


# ---- HellaSwag ------------------------------------------------------------------------------------
def _hellaswag_clean(text: str) -> str:
    # WikiHow items carry "[title]"/"[header]"-style markers; drop them as the usual preprocessing does.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(path: Path) -> list[Item]:
    """HellaSwag validation: the 6-lines-per-item text file (optionally .bz2: `label: ctx`, gold index,
    4 endings; already preprocessed) or the original jsonl (ctx, endings, label, activity_label; its
    WikiHow markup is removed)."""
    path = Path(path)
    if path.is_dir():
        found = sorted([*path.glob("*.jsonl"), *path.glob("*.txt"), *path.glob("*.txt.bz2"), *path.glob("*.jsonl.gz")])
        if not found:
            raise DataError(f"{path}: no HellaSwag file (*.txt, *.txt.bz2 or *.jsonl) found")
        path = found[0]
    _require_file(path, "HellaSwag file")
    items = []
    if ".jsonl" in path.suffixes:
        for n, rec in read_jsonl(path):
            where = f"{path}:{n}"
            endings = _field(rec, "endings", where, list)
            if len(endings) != 4:
                raise DataError(f"{where}: field 'endings' should have 4 entries, got {len(endings)}")
            label = rec.get("label")
            if label in (None, ""):
                raise DataError(f"{where}: field 'label' is missing (expected 0-3)")
            ctx = _field(rec, "ctx", where)
            act = rec.get("activity_label", "")
            items.append(Item(str(rec.get("ind", len(items))), "hellaswag",
                              _hellaswag_clean(f"{act}: {ctx}" if act else ctx),
                              [" " + _hellaswag_clean(e) for e in endings], int(label)))
        return items
    with _open_text(path) as f:
        lines = f.read().split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise DataError(f"{path}: expected 6 lines per item (context, gold index, 4 endings), "
                        f"got {len(lines)} lines (not a multiple of 6)")
    for i in range(0, len(lines), 6):
        ctx, gold, *endings = lines[i:i + 6]
        if not gold.strip().isdigit() or not 0 <= int(gold) < 4:
            raise DataError(f"{path}: line {i + 2}: expected the gold index 0-3, got {gold!r}")
        # this format is already preprocessed: used as written
        items.append(Item(str(i // 6), "hellaswag", ctx.strip(), [" " + e.strip() for e in endings], int(gold)))
    return items


# ---- CHID / CSL / EPRSTMT (FewCLUE json lines) ---------------------------------------------------
def _fewclue_file(folder: Path, names: tuple[str, ...], what: str) -> Path:
    folder = Path(folder)
    if folder.is_file():
        return folder
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: no {what} file found (looked for {', '.join(names)})")


def load_chid(folder: Path) -> list[Item]:
    """FewCLUE CHID (`test_public.json`, else `dev_few_all.json`): content with one #idiom# blank,
    7 candidate idioms, the answer index."""
    path = _fewclue_file(folder, ("test_public.json", "dev_few_all.json"), "CHID")
    items = []
    for n, rec in read_jsonl(path):
        where = f"{path}:{n}"
        content = _field(rec, "content", where)
        cands = _field(rec, "candidates", where, list)
        if "#idiom#" not in content:
            raise DataError(f"{where}: field 'content' has no #idiom# blank")
        answer = _field(rec, "answer", where, int)
        if not 0 <= answer < len(cands):
            raise DataError(f"{where}: field 'answer' should be 0-{len(cands) - 1}, got {answer}")
        items.append(Item(str(rec.get("id", n)), "chid", content, [str(c) for c in cands], answer))
    return items


def load_csl(folder: Path) -> list[Item]:
    """FewCLUE CSL (`test_public.json`, else `dev_few_all.json`): abst, keyword list, label "0"/"1"
    (1: every keyword is a real keyword of the abstract)."""
    path = _fewclue_file(folder, ("test_public.json", "dev_few_all.json", "dev.json"), "CSL")
    items = []
    for n, rec in read_jsonl(path):
        where = f"{path}:{n}"
        abst = _field(rec, "abst", where)
        kws = _field(rec, "keyword", where, list)
        label = str(_field(rec, "label", where, (str, int)))
        if label not in ("0", "1"):
            raise DataError(f"{where}: field 'label' should be \"0\" or \"1\", got {label!r}")
        items.append(Item(str(rec.get("id", n)), "csl", abst, ["否", "是"], int(label), {"keywords": kws}))
    return items


EPRSTMT_LABELS = ("Negative", "Positive")


def load_eprstmt(folder: Path) -> list[Item]:
    """FewCLUE EPRSTMT (`test_public.json`, else `dev_few_all.json`): sentence, label Positive/Negative."""
    path = _fewclue_file(folder, ("test_public.json", "dev_few_all.json", "dev.json"), "EPRSTMT")
    items = []
    for n, rec in read_jsonl(path):
        where = f"{path}:{n}"
        sentence = _field(rec, "sentence", where)
        label = _field(rec, "label", where)
        if label not in EPRSTMT_LABELS:
            raise DataError(f"{where}: field 'label' should be Positive or Negative, got {label!r}")
        items.append(Item(str(rec.get("id", n)), "eprstmt", sentence, ["消极", "积极"], EPRSTMT_LABELS.index(label)))
    return items


# ---- AGIEval / GAOKAO-Bench -----------------------------------------------------------------------
_OPTION_PREFIX = re.compile(r"^\s*\(?([A-J])\s*[).．、:：]\s*")


def load_agieval(folder: Path) -> dict[str, list[Item]]:
    """AGIEval `*.jsonl` (passage, question, options ["(A)...", ...], label "A" or ["A", "C"], answer):
    one subject per file. Items without options (cloze) are free-form with `answer`."""
    folder = Path(folder)
    files = [folder] if folder.is_file() else _subject_files(folder, "*.jsonl", "AGIEval")
    out: dict[str, list[Item]] = {}
    for path in files:
        subject = path.stem
        items = []
        for n, rec in read_jsonl(path):
            where = f"{path}:{n}"
            question = _field(rec, "question", where)
            passage = rec.get("passage") or ""
            options = rec.get("options")
            meta = {"passage": passage} if passage else {}
            if options:
                if not isinstance(options, list):
                    raise DataError(f"{where}: field 'options' should be a list, got {type(options).__name__}")
                choices = [_OPTION_PREFIX.sub("", str(o), count=1) for o in options]
                label = _field(rec, "label", where, (str, list))
                labels = label if isinstance(label, list) else list(label.strip()) if len(label.strip()) > 1 else [label]
                idx = sorted(_letter_index(x, len(choices), where, "label") for x in labels)
                answer = idx[0] if len(idx) == 1 else idx
                items.append(Item(f"{subject}/{n - 1}", subject, question, choices, answer, meta))
            else:
                ans = rec.get("answer")
                if ans in (None, ""):
                    raise DataError(f"{where}: a question without 'options' needs field 'answer'")
                items.append(Item(f"{subject}/{n - 1}", subject, question, None, str(ans), meta))
        out[subject] = items
    return out


_INLINE_OPTION = re.compile(r"(?:^|\s|\n)([A-D])\s*[.．、:：]")


def load_gaokao(folder: Path) -> dict[str, list[Item]]:
    """GAOKAO-Bench objective questions: `*.json` files {"keywords", "example": [{"question" (options
    inline, "A．..."), "answer": ["B"], "year", "category", "score", "index"}]}; one subject per file."""
    folder = Path(folder)
    if (folder / "Objective_Questions").is_dir():
        folder = folder / "Objective_Questions"
    files = [folder] if folder.is_file() else _subject_files(folder, "*.json", "GAOKAO-Bench")
    out: dict[str, list[Item]] = {}
    for path in files:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("example"), list):
            raise DataError(f"{path}: expected an object with an 'example' list")
        subject = str(doc.get("keywords") or path.stem)
        items = []
        for i, rec in enumerate(doc["example"]):
            where = f"{path}: example[{i}]"
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
            question = _field(rec, "question", where)
            answer = _field(rec, "answer", where, list)
            letters = sorted({m for m in _INLINE_OPTION.findall(question)})
            n_opts = max(4, len(letters))
            idx = sorted(_letter_index(a, n_opts, where, "answer") for a in answer)
            if not idx:
                raise DataError(f"{where}: field 'answer' is empty (expected letters like ['B'])")
            items.append(Item(f"{subject}/{rec.get('index', i)}", subject, question.strip(),
                              list(LETTERS[:n_opts]), idx[0] if len(idx) == 1 else idx,
                              {"year": rec.get("year"), "score": rec.get("score"), "options_inline": True}))
        out[subject] = items
    return out


# ---- GSM8K / MATH / BBH / HumanEval ---------------------------------------------------------------
def gsm8k_final(answer: str) -> str:
    """The number after '####' in a GSM8K answer, without thousands separators."""
    return answer.rsplit("####", 1)[-1].strip().replace(",", "")


def load_gsm8k(folder: Path, split: str = "test") -> list[Item]:
    """GSM8K `{split}.jsonl`: question, answer (reasoning with <<calc>> notes, then '#### N')."""
    path = _require_file(Path(folder) / f"{split}.jsonl", f"GSM8K {split}.jsonl")
    items = []
    for n, rec in read_jsonl(path):
        where = f"{path}:{n}"
        q, a = _field(rec, "question", where), _field(rec, "answer", where)
        if "####" not in a:
            raise DataError(f"{where}: field 'answer' has no '#### <number>' final answer")
        steps = re.sub(r"<<[^>]*>>", "", a.rsplit("####", 1)[0]).strip()
        items.append(Item(f"gsm8k/{n - 1}", "gsm8k", q, None, gsm8k_final(a), {"solution": steps}))
    return items


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        m = re.match(r"\\boxed ([^\s$]+)", text[start:])
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def load_math(folder: Path, split: str = "test") -> dict[str, list[Item]]:
    """Hendrycks MATH: `{split}/{type}/{n}.json` files (problem, level, type, solution with \\boxed{}),
    or a `{split}.jsonl` with the same fields (an `answer` field wins over the boxed one)."""
    folder = Path(folder)
    out: dict[str, list[Item]] = {}
    jsonl = folder / f"{split}.jsonl"
    if jsonl.is_file():
        records = [(f"{jsonl}:{n}", rec) for n, rec in read_jsonl(jsonl)]
    else:
        files = sorted((folder / split).glob("*/*.json")) if (folder / split).is_dir() else []
        if not files:
            raise DataError(f"{folder}: no MATH {split} data ({split}/<type>/<n>.json or {split}.jsonl) found")
        records = []
        for f in files:
            try:
                records.append((str(f), json.loads(f.read_text(encoding="utf-8"))))
            except json.JSONDecodeError as e:
                raise DataError(f"{f}: not valid JSON ({e.msg})") from None
    for where, rec in records:
        problem = _field(rec, "problem", where)
        solution = rec.get("solution", "")
        answer = rec.get("answer")
        if answer is None:
            answer = last_boxed(solution or "")
            if answer is None:
                raise DataError(f"{where}: field 'solution' has no \\boxed{{}} answer (and there is no 'answer' field)")
        subject = str(rec.get("type") or rec.get("subject") or "math").lower().replace(" ", "_").replace("&", "and")
        items = out.setdefault(subject, [])
        rid = Path(where.split(":")[0]).stem if jsonl != Path(where.split(":")[0]) else str(len(items))
        items.append(Item(f"{subject}/{rid}", subject, problem, None, str(answer),
                          {"solution": solution, "level": rec.get("level")}))
    return out


def load_bbh(folder: Path, prompts: Path | None = None) -> dict[str, tuple[list[Item], str]]:
    """BIG-Bench Hard: `folder/{task}.json` ({"examples": [{"input", "target"}]}) and the chain-of-thought
    prompts `{task}.txt` (in `prompts`, default the sibling folder `bbh-cot-prompts` or `folder/cot-prompts`).
    -> {task: (items, cot prompt text)}."""
    folder = Path(folder)
    if prompts is None:
        for cand in (folder.parent / "bbh-cot-prompts", folder / "cot-prompts", folder / "cot-prompts" / "cot-prompts"):
            if cand.is_dir():
                prompts = cand
                break
        else:
            raise DataError(f"{folder}: no chain-of-thought prompts found (expected {folder.parent / 'bbh-cot-prompts'})")
    out = {}
    for path in _subject_files(folder, "*.json", "BBH task"):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg})") from None
        examples = doc.get("examples") if isinstance(doc, dict) else None
        if not isinstance(examples, list):
            raise DataError(f"{path}: expected an object with an 'examples' list")
        task = path.stem
        items = []
        for i, ex in enumerate(examples):
            where = f"{path}: examples[{i}]"
            items.append(Item(f"{task}/{i}", task, _field(ex, "input", where), None, _field(ex, "target", where)))
        cot = _require_file(Path(prompts) / f"{task}.txt", f"BBH chain-of-thought prompt for {task}").read_text(
            encoding="utf-8")
        out[task] = (items, cot_prompt_body(cot))
    return out


def cot_prompt_body(text: str) -> str:
    """A BBH prompt file without its canary line and '-----' separator."""
    if "-----" in text:
        text = text.split("-----", 1)[1]
    return text.strip()


def split_cot_examples(prompt: str) -> tuple[str, list[tuple[str, str]]]:
    """A BBH CoT prompt -> (task description, [(question, reasoning answer)])."""
    blocks = re.split(r"\n\n(?=Q: )", prompt.strip())
    head = "" if blocks[0].startswith("Q: ") else blocks.pop(0).strip()
    shots = []
    for b in blocks:
        q, sep, a = b.partition("\nA: ")
        if not sep:
            raise DataError(f"BBH prompt block without an 'A: ' answer: {b[:80]!r}")
        shots.append((q.removeprefix("Q: ").strip(), a.strip()))
    return head, shots


def load_humaneval(path: Path) -> list[Item]:
    """HumanEval `HumanEval.jsonl(.gz)`: task_id, prompt, canonical_solution, test, entry_point."""
    path = Path(path)
    if path.is_dir():
        found = sorted([*path.glob("*.jsonl.gz"), *path.glob("*.jsonl")])
        if not found:
            raise DataError(f"{path}: no HumanEval file (*.jsonl or *.jsonl.gz) found")
        path = found[0]
    items = []
    for n, rec in read_jsonl(_require_file(path, "HumanEval file")):
        where = f"{path}:{n}"
        tid = _field(rec, "task_id", where)
        items.append(Item(tid, "humaneval", _field(rec, "prompt", where), None, rec.get("canonical_solution"),
                          {"test": _field(rec, "test", where), "entry_point": _field(rec, "entry_point", where)}))
    return items


# ---- WikiText-2 -----------------------------------------------------------------------------------
def read_arrow_text(path: Path, column: str = "text") -> list[str]:
    """The `column` of an Arrow IPC file (stream or file format, as HF datasets writes them)."""
    try:
        import pyarrow as pa
    except ImportError:
        raise DataError(f"{path}: reading .arrow files needs pyarrow (pip install \"telechat[eval]\"); "
                        "or pass the raw text file (wiki.test.raw)") from None
    try:
        with pa.memory_map(str(path)) as src:
            try:
                table = pa.ipc.open_stream(src).read_all()
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(src).read_all()
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: not an Arrow IPC file ({e})") from None
    if column not in table.column_names:
        raise DataError(f"{path}: expected a {column!r} column, got {table.column_names}")
    return [t or "" for t in table.column(column).to_pylist()]


def split_wikitext_articles(text: str) -> list[str]:
    """Raw WikiText split at its top-level headings (' = Title = ')."""
    starts = [m.start() for m in re.finditer(r"^ = [^=\n].* = $", text, flags=re.M)]
    if not starts:
        return [text] if text.strip() else []
    if text[:starts[0]].strip():
        starts.insert(0, 0)
    bounds = starts + [len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:]) if text[a:b].strip()]


def load_wikitext(folder: Path, split: str = "test") -> list[Item]:
    """WikiText-2 raw: `wiki.{split}.raw` text, or the HF datasets `wikitext-{split}.arrow` (searched
    under `folder`); one item per article."""
    folder = Path(folder)
    if folder.is_file():
        path = folder
    else:
        found = sorted(folder.rglob(f"wiki.{split}.raw")) + sorted(folder.rglob(f"wikitext-{split}.arrow"))
        if not found:
            raise DataError(f"{folder}: no WikiText {split} data (wiki.{split}.raw or wikitext-{split}.arrow) found")
        path = found[0]
    if path.suffix == ".arrow":
        text = "".join(read_arrow_text(path))
    else:
        text = path.read_text(encoding="utf-8")
    return [Item(f"wikitext/{i}", "wikitext2", a) for i, a in enumerate(split_wikitext_articles(text))]

"""`evaluate(llm, EvalConfig)`: run tasks, score them, and report (dict, JSON file, markdown table)."""
from __future__ import annotations

import json
import math
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import metrics as M
from .data import LETTERS, DataError, Item
from .extract import extract_choice, extract_choices
from .generation import generate_until
from .long import read_long_text, run_longppl, run_passkey
from .loglik import LoglikEngine, rolling_windows
from .sandbox import humaneval_program, run_programs
from .tasks import Loaded, Task, answer_letters, get_task


@dataclass
class EvalConfig:
    """Every setting of a run (all of it is written to the JSON report)."""
    tasks: list[str]
    data_dir: str | None = None  # needed by every task but the long-context ones
    shots: int | None = None  # None: each task's default
    limit: int | None = None  # items per subject (per task when it has one subject)
    batch_size: int = 8
    mode: str = "loglik"  # multiple choice: "loglik" or "generate"
    share_prefix: bool = True
    prompt_style: str = "chat"  # generation prompts: "chat" (the checkpoint's chat format) or "plain"
    max_new_tokens: int | None = None  # None: each task's default
    samples: int = 1  # HumanEval completions per problem (1: greedy)
    pass_k: list[int] = field(default_factory=lambda: [1])
    temperature: float = 0.8  # sampling, when samples > 1
    top_p: float = 0.95
    seed: int = 0
    max_length: int | None = None  # perplexity window (default min(context, 2048))
    stride: int | None = None  # perplexity stride (default max_length // 2)
    timeout: float = 10.0  # sandbox seconds per program
    memory_mb: int = 1024  # sandbox address-space limit
    workers: int = 2  # sandbox programs at a time
    subjects: list[str] | None = None  # only these subjects (of tasks that have them)
    progress: bool = True
    long_text: str | None = None  # longppl: a long UTF-8 text file
    lengths: list[int] | None = None  # longppl/passkey input lengths (default: 1, 2, 4 x training_seqlen)
    rope_scaling: list[str] | None = None  # longppl/passkey: one row per mode (None: the checkpoint's own)
    ppl_tail: int = 256  # longppl: tokens scored at the end of each prefix
    passkey_trials: int = 5  # passkey: prompts per length (depths spread from start to end)

    def validate(self) -> None:
        if self.mode not in ("loglik", "generate"):
            raise ValueError(f"mode must be loglik or generate, got {self.mode!r}")
        if self.prompt_style not in ("chat", "plain"):
            raise ValueError(f"prompt_style must be chat or plain, got {self.prompt_style!r}")
        for name, v, lo in (("batch_size", self.batch_size, 1), ("samples", self.samples, 1),
                            ("limit", self.limit, 1), ("shots", self.shots, 0), ("workers", self.workers, 1)):
            if v is not None and v < lo:
                raise ValueError(f"{name} must be >= {lo}, got {v}")
        bad = [k for k in self.pass_k if k < 1 or k > self.samples]
        if bad:
            raise ValueError(f"pass@k needs 1 <= k <= samples ({self.samples}), got k={bad}")
        kinds = {get_task(t).kind for t in self.tasks}
        if kinds - {"long"}:
            if self.data_dir is None:
                raise DataError(f"--data-dir is needed for {', '.join(t for t in self.tasks if get_task(t).kind != 'long')}")
            if not Path(self.data_dir).is_dir():
                raise DataError(f"{self.data_dir}: --data-dir is not a folder")
        from ..config import ROPE_SCALING_TYPES

        bad = [m for m in self.rope_scaling or [] if m not in ROPE_SCALING_TYPES]
        if bad:
            raise ValueError(f"--rope-scaling: {', '.join(bad)} unknown; choose from {', '.join(ROPE_SCALING_TYPES)}")
        if len(self.rope_scaling or []) > 1 and kinds - {"long"}:
            raise ValueError("several --rope-scaling modes compare long-context tasks (longppl, passkey) only; "
                             "evaluate the other tasks with one mode")
        if any(get_task(t).name == "longppl" for t in self.tasks) and not self.long_text:
            raise DataError("longppl needs --long-text FILE (a long UTF-8 text: a book, speeches)")
        if self.ppl_tail < 1 or self.passkey_trials < 1:
            raise ValueError(f"--ppl-tail and --passkey-trials must be >= 1, got {self.ppl_tail} and {self.passkey_trials}")
        small = [n for n in self.lengths or [] if n <= self.ppl_tail or n < 64]
        if small:
            raise ValueError(f"--lengths must exceed the scored tail of {self.ppl_tail} tokens (and 64), got {small}")


class _Bar:
    """tqdm on stderr when enabled, else nothing."""

    def __init__(self, enabled: bool, total: int, desc: str):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="it", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _tok(llm):
    if llm.tokenizer is None:
        raise ValueError("evaluation needs a tokenizer: this checkpoint folder has none")
    return llm.tokenizer


def _prefix_id(tok) -> int:
    for i in (tok.bos_id, tok.eos_id, tok.pad_id):
        if i is not None:
            return int(i)
    return 0


def encode_pair(tok, context: str, continuation: str, ctx_ids: list[int] | None = None) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) split where the two texts meet.

    The whole text is encoded once, so tokens merge as they would in one string; if a token
    straddles the boundary the split moves back to the last token the context alone also has.
    """
    n_sp = len(context) - len(context.rstrip(" "))
    if n_sp:  # a trailing space belongs to the continuation's first word
        context, continuation = context[:-n_sp], context[-n_sp:] + continuation
    if ctx_ids is None:
        ctx_ids = tok.encode(context) if context else []
    whole = tok.encode(context + continuation)
    k = 0
    limit = min(len(ctx_ids), len(whole) - 1)
    while k < limit and ctx_ids[k] == whole[k]:
        k += 1
    if not context:
        k = 0
    return whole[:k], whole[k:]


def _limit(items: list[Item], limit: int | None) -> list[Item]:
    return items if limit is None else items[:limit]


def has_subjects(task: Task, loaded: Loaded) -> bool:
    """Whether --subjects applies to the task (hellaswag, gsm8k, ... are one subject named after it)."""
    return set(loaded.subjects) != {task.name}


def _select(task: Task, loaded: Loaded, cfg: EvalConfig):
    """(items per subject, few-shot examples per subject, shots, where the examples come from)."""
    shots = task.default_shots if cfg.shots is None else cfg.shots
    subjects = loaded.subjects
    if cfg.subjects and has_subjects(task, loaded):
        subjects = {s: v for s, v in subjects.items() if s in cfg.subjects}
    shots_from = loaded.shots_from
    if shots and not any(loaded.shots.values()):
        # no example split: the first `shots` items of each subject become its examples, unscored
        pool = {s: v[:shots] for s, v in subjects.items()}
        subjects = {s: v[shots:] for s, v in subjects.items()}
        shots_from = "eval head"
    else:
        pool = loaded.shots
    subjects = {s: _limit(v, cfg.limit) for s, v in subjects.items() if v}
    pools = {s: list(pool.get(s, []))[:shots] for s in subjects}
    short = {s: len(p) for s, p in pools.items() if len(p) < shots}
    if short:
        s, n = next(iter(short.items()))
        raise DataError(f"{task.name}: {shots}-shot needs {shots} examples per subject, but {s} has {n} "
                        f"({len(short)} subjects short); use --shots {n}")
    return subjects, pools, shots, (shots_from if shots else "none")


# ---- prompts for generation -----------------------------------------------------------------------
def _chat_ids(llm, pairs: list[tuple[str, str]], user: str, prefix: str, room: int) -> list[int]:
    history = [m for u, b in pairs for m in ({"role": "user", "content": u}, {"role": "bot", "content": b})]
    ids = llm.encode_chat(user, history, max_length=room)
    if prefix:
        ids = ids + llm.tokenizer.encode(prefix)
    return ids


def _style(llm, cfg: EvalConfig) -> str:
    return "plain" if cfg.prompt_style == "plain" or llm.chat_format == "none" else "chat"


# ---- task kinds ---------------------------------------------------------------------------------
def _run_mc_loglik(llm, task, subjects, pools, cfg, engine: LoglikEngine) -> list[dict]:
    tok = _tok(llm)
    reqs, plan, records = [], [], []
    for subject, items in subjects.items():
        for item in items:
            if item.choices is None:
                records.append({"id": item.id, "subject": subject, "gold": item.answer, "pred": None,
                                "correct": False, "skipped": "free-form item (generate mode only)"})
                continue
            ctx, conts = task.loglik_prompt(subject, pools[subject], item)
            ctx_ids = tok.encode(ctx.rstrip(" ")) if ctx.strip() else []
            start = len(reqs)
            for c in conts:
                a, b = encode_pair(tok, ctx, c, ctx_ids)
                reqs.append((a or [_prefix_id(tok)], b))
            plan.append((subject, item, start, conts))
    bar = _Bar(cfg.progress, len(reqs), f"{task.name} loglik")
    try:
        out = engine.loglikelihood(reqs, progress=bar)
    finally:
        bar.close()
    for subject, item, start, conts in plan:
        scores = [out[start + j][0] for j in range(len(conts))]
        pred = M.pick(scores)
        pred_norm = M.pick_normalized(scores, [len(c) for c in conts])
        gold = item.answer
        ok = (gold == [pred]) if isinstance(gold, list) else pred == gold
        ok_norm = (gold == [pred_norm]) if isinstance(gold, list) else pred_norm == gold
        records.append({"id": item.id, "subject": subject, "gold": gold, "pred": pred, "pred_norm": pred_norm,
                        "correct": ok, "correct_norm": ok_norm, "loglik": [round(s, 6) for s in scores]})
    return records


def _run_mc_generate(llm, task, subjects, pools, cfg) -> list[dict]:
    tok = _tok(llm)
    style = _style(llm, cfg)
    max_new = cfg.max_new_tokens or task.max_new_tokens
    room = llm.config.seq_length - max_new
    prompts, plan, stops = [], [], []
    for subject, items in subjects.items():
        pairs = [(task.chat_user(subject, s), answer_letters(s)) for s in pools[subject] if s.choices is not None]
        for item in items:
            user = task.chat_user(subject, item) if item.choices is not None else task.cloze_user(item)
            if style == "chat":
                prompts.append(_chat_ids(llm, pairs, user, "", room))
            else:
                prompts.append(tok.encode("".join(f"{u}{a}\n\n" for u, a in pairs) + user))
            plan.append((subject, item))
    bar = _Bar(cfg.progress, len(prompts), f"{task.name} generate")
    try:
        replies = generate_until(llm, prompts, max_new, stop=["\n\n"] if style == "plain" else [],
                                 batch_size=cfg.batch_size, progress=bar)
    finally:
        bar.close()
    records = []
    for (subject, item), reply in zip(plan, replies):
        rec = {"id": item.id, "subject": subject, "gold": item.answer, "output": reply}
        if item.choices is None:  # cloze: exact match after removing spacing and '$'
            norm = lambda s: re.sub(r"[\s$]", "", str(s))  # noqa: E731
            pred = reply.strip().split("\n")[0]
            rec.update(pred=pred, correct=norm(pred) == norm(item.answer))
        elif isinstance(item.answer, list):
            letters = extract_choices(reply, len(item.choices))
            rec.update(pred=letters, correct=letters == [LETTERS[i] for i in item.answer])
        else:
            letter = extract_choice(reply, len(item.choices), task.lang_of(item))
            rec.update(pred=letter, correct=letter == LETTERS[item.answer])
        records.append(rec)
    return records


def _run_generation(llm, task, subjects, pools, cfg) -> list[dict]:
    tok = _tok(llm)
    style = _style(llm, cfg)
    max_new = cfg.max_new_tokens or task.max_new_tokens
    room = llm.config.seq_length - max_new
    groups: dict[tuple, list] = {}  # prompts sharing stop strings run together
    for subject, items in subjects.items():
        for item in items:
            if style == "chat":
                pairs = [task.turn(subject, s) for s in pools[subject]]
                prefix = task.answer_prefix(subject)
                ids, stop = _chat_ids(llm, pairs, task.turn(subject, item)[0], prefix, room), ()
            else:
                text, stop = task.plain(subject, pools[subject], item)
                ids, prefix = tok.encode(text), ""
            groups.setdefault(tuple(stop), []).append((subject, item, ids, prefix))
    bar = _Bar(cfg.progress, sum(map(len, groups.values())), f"{task.name} generate")
    records = []
    try:
        for stop, entries in groups.items():
            replies = generate_until(llm, [e[2] for e in entries], max_new, stop=list(stop),
                                     batch_size=cfg.batch_size, progress=bar)
            for (subject, item, _, prefix), reply in zip(entries, replies):
                full = (prefix + reply) if style == "chat" else reply
                pred, ok = task.score(subject, item, full)
                records.append({"id": item.id, "subject": subject, "gold": item.answer, "pred": pred,
                                "correct": ok, "output": reply})
    finally:
        bar.close()
    return records


def _run_code(llm, task, subjects, pools, cfg) -> tuple[list[dict], dict]:
    tok = _tok(llm)
    items = [it for v in subjects.values() for it in v]
    n = cfg.samples
    prompts = [tok.encode(it.question) for it in items for _ in range(n)]
    max_new = cfg.max_new_tokens or task.max_new_tokens
    bar = _Bar(cfg.progress, len(prompts), f"{task.name} generate")
    try:
        completions = generate_until(llm, prompts, max_new, stop=task.stop, batch_size=cfg.batch_size,
                                     do_sample=n > 1, temperature=cfg.temperature if n > 1 else None,
                                     top_p=cfg.top_p if n > 1 else None, top_k=0 if n > 1 else None,
                                     seed=cfg.seed, progress=bar)
    finally:
        bar.close()
    programs = [humaneval_program(it.question, completions[i * n + j], it.meta["test"], it.meta["entry_point"])
                for i, it in enumerate(items) for j in range(n)]
    bar = _Bar(cfg.progress, len(programs), f"{task.name} execute")
    try:
        outcomes = run_programs(programs, workers=cfg.workers, progress=bar, timeout=cfg.timeout,
                                memory_mb=cfg.memory_mb)
    finally:
        bar.close()
    records, status = [], {}
    for i, it in enumerate(items):
        outs = outcomes[i * n:(i + 1) * n]
        c = sum(o.passed for o in outs)
        for o in outs:
            status[o.status] = status.get(o.status, 0) + 1
        rec = {"id": it.id, "subject": "humaneval", "n": n, "passed": c, "correct": c > 0 if n == 1 else c / n,
               "samples": [{"completion": completions[i * n + j], "status": o.status,
                            "seconds": round(o.seconds, 3), "output": o.output[-500:]} for j, o in enumerate(outs)]}
        for k in cfg.pass_k:
            rec[f"pass@{k}"] = M.pass_at_k(n, c, k)
        records.append(rec)
    summary = {f"pass@{k}": sum(r[f"pass@{k}"] for r in records) / len(records) if records else float("nan")
               for k in cfg.pass_k}
    summary["statuses"] = status
    return records, summary


def _run_ppl(llm, task, subjects, pools, cfg, engine: LoglikEngine) -> tuple[list[dict], dict]:
    tok = _tok(llm)
    max_len = cfg.max_length or min(int(llm.config.seq_length), 2048)
    stride = cfg.stride or max(1, max_len // 2)
    reqs, plan = [], []
    for subject, items in subjects.items():
        for it in items:
            ids = tok.encode(it.question)
            windows = rolling_windows(ids, _prefix_id(tok), max_len, stride)
            plan.append((it, len(ids), len(reqs), len(windows)))
            reqs.extend(windows)
    bar = _Bar(cfg.progress, len(reqs), f"{task.name} windows")
    try:
        out = engine.loglikelihood(reqs, progress=bar)
    finally:
        bar.close()
    records = []
    tot = {"nll": 0.0, "tokens": 0, "words": 0, "bytes": 0}
    for it, n_tok, start, n_win in plan:
        nll = -sum(out[start + j][0] for j in range(n_win))
        words, nbytes = len(it.question.split()), len(it.question.encode("utf-8"))
        records.append({"id": it.id, "subject": it.subject, "tokens": n_tok, "words": words, "bytes": nbytes,
                        "windows": n_win, "nll": nll, "token_perplexity": M.perplexity(nll, n_tok)})
        for k, v in (("nll", nll), ("tokens", n_tok), ("words", words), ("bytes", nbytes)):
            tot[k] += v
    summary = {"word_perplexity": M.perplexity(tot["nll"], tot["words"]),
               "token_perplexity": M.perplexity(tot["nll"], tot["tokens"]),
               "bits_per_byte": tot["nll"] / (tot["bytes"] * math.log(2)) if tot["bytes"] else float("nan"),
               "max_length": max_len, "stride": stride, **tot}
    return records, summary


def _run_long(llm, task: Task, cfg: EvalConfig, loaded: Loaded | None) -> dict:
    t0 = time.time()
    tok = _tok(llm)
    T = int(llm.config.training_seqlen)
    lengths = cfg.lengths or [T, 2 * T, 4 * T]
    modes = cfg.rope_scaling or [None]
    bar = _Bar(cfg.progress, len(lengths) * len(modes), f"{task.name}")
    try:
        if task.name == "longppl":
            text = loaded.text if loaded is not None and loaded.text else read_long_text(cfg.long_text)
            ids = tok.encode(text)
            if len(ids) < max(lengths):
                raise DataError(f"{cfg.long_text}: {len(ids)} tokens, fewer than the longest --lengths "
                                f"({max(lengths)}); give a longer text or shorter lengths")
            rows = run_longppl(llm, ids, lengths, modes, cfg.ppl_tail, progress=bar)
        else:
            rows = run_passkey(llm, lengths, modes, cfg.passkey_trials, cfg.seed, progress=bar)
    finally:
        bar.close()
    metric = task.metrics[0]
    details = {"training_seqlen": T, "lengths": lengths}
    if task.name == "longppl":
        details.update(text=str(cfg.long_text), text_tokens=len(ids), tail=cfg.ppl_tail)
    else:
        details["trials"] = cfg.passkey_trials
    return {"task": task.name, "kind": "long", "mode": "long", "shots": 0, "n": len(rows), "skipped": 0,
            "metrics": {}, "rows": rows, "metric": metric, "details": details,
            "seconds": round(time.time() - t0, 3)}


# ---- one task, all tasks ----------------------------------------------------------------------------
def _load(task: Task, cfg: EvalConfig) -> Loaded:
    try:
        return task.load(Path(cfg.data_dir))
    except ImportError as e:  # e.g. pyarrow for .arrow files
        name = getattr(e, "name", None) or str(e)
        raise DataError(f"{task.name}: reading its data needs the {name} package, which is not installed: "
                        f'pip install "telechat[eval]"') from None


def _check_selection(task: Task, loaded: Loaded, cfg: EvalConfig) -> None:
    subjects = _select(task, loaded, cfg)[0]
    if subjects:
        return
    if cfg.subjects and has_subjects(task, loaded):
        have = sorted(loaded.subjects)
        raise DataError(f"{task.name}: none of --subjects {','.join(cfg.subjects)} is one of its subjects "
                        f"({len(have)}: {', '.join(have[:8])}{', ...' if len(have) > 8 else ''}); "
                        "evaluate it in a separate run")
    raise DataError(f"{task.name}: no items to evaluate in {Path(cfg.data_dir) / task.folder}")


def load_tasks(cfg: EvalConfig) -> dict[str, tuple[Task, Loaded]]:
    """Every task's data read and checked (files, subjects, few-shot examples, items) before any
    task runs, so that a mistake in the last one is not found after hours of the first."""
    cfg.validate()
    out: dict[str, tuple[Task, Loaded]] = {}
    for name in cfg.tasks:
        task = get_task(name)
        if task.kind == "long":
            loaded = Loaded({}, {}, "none", read_long_text(cfg.long_text) if task.name == "longppl" else None)
        else:
            loaded = _load(task, cfg)
            _check_selection(task, loaded, cfg)
        out[task.name] = (task, loaded)
    if cfg.subjects:
        known = {s for _, loaded in out.values() for s in loaded.subjects}
        unknown = [s for s in cfg.subjects if s not in known]
        if unknown:
            raise DataError(f"--subjects: {', '.join(unknown)} not found in any of the tasks {', '.join(out)}")
    return out


class EvalIncomplete(Exception):
    """A task failed after others finished: `.report` holds the finished tasks' results."""

    def __init__(self, task: str, cause: BaseException, report: dict):
        super().__init__(f"{task} failed: {cause}")
        self.task, self.cause, self.report = task, cause, report


def check_lengths(llm, cfg: EvalConfig, tasks: dict[str, tuple[Task, Loaded]]) -> None:
    """Generation lengths that leave no room for a prompt fail now, not when their task's turn comes."""
    context = int(llm.config.seq_length)
    for task, _ in tasks.values():
        if task.kind == "long":
            continue
        generates = task.kind in ("gen", "code") or (task.kind == "mc" and cfg.mode == "generate")
        max_new = cfg.max_new_tokens or task.max_new_tokens
        if generates and max_new >= context:
            raise ValueError(f"{task.name}: max_new_tokens {max_new} leaves no room for a prompt in the model's "
                             f"context of {context} tokens")


def run_task(llm, task: Task, cfg: EvalConfig, engine: LoglikEngine | None = None,
             loaded: Loaded | None = None) -> dict:
    t0 = time.time()
    if task.kind == "long":
        return _run_long(llm, task, cfg, loaded)
    if loaded is None:
        loaded = _load(task, cfg)
        _check_selection(task, loaded, cfg)
    subjects, pools, shots, shots_from = _select(task, loaded, cfg)
    engine = engine or LoglikEngine(llm.model, cfg.batch_size, cfg.share_prefix)
    mode = cfg.mode if task.kind == "mc" else {"gen": "generate", "code": "generate", "ppl": "loglik"}[task.kind]
    result = {"task": task.name, "kind": task.kind, "mode": mode, "shots": shots, "shots_from": shots_from}
    summary: dict = {}
    stats_before = dict(engine.stats)
    if task.kind == "mc" and mode == "loglik":
        records = _run_mc_loglik(llm, task, subjects, pools, cfg, engine)
    elif task.kind == "mc":
        records = _run_mc_generate(llm, task, subjects, pools, cfg)
    elif task.kind == "gen":
        records = _run_generation(llm, task, subjects, pools, cfg)
    elif task.kind == "code":
        records, summary = _run_code(llm, task, subjects, pools, cfg)
    else:
        records, summary = _run_ppl(llm, task, subjects, pools, cfg, engine)
    seconds = time.time() - t0
    scored = [r for r in records if not r.get("skipped")]
    result["n"] = len(scored)
    result["skipped"] = len(records) - len(scored)
    if task.kind in ("mc", "gen"):
        acc = M.group_accuracy(scored)
        name = "acc" if task.kind == "mc" else "exact_match"
        result["metrics"] = {f"{name}_macro": acc["macro"], f"{name}_micro": acc["micro"]}
        if task.kind == "mc" and mode == "loglik" and "acc_norm" in task.metrics:
            norm = M.group_accuracy(scored, "correct_norm")
            result["metrics"].update(acc_norm_macro=norm["macro"], acc_norm_micro=norm["micro"])
            for s, v in norm["subjects"].items():
                acc["subjects"][s]["acc_norm"] = v["acc"]
        result["subjects"] = acc["subjects"]
        cats = M.category_accuracy(acc["subjects"], task.categories)
        if cats:
            result["categories"] = cats
    else:
        result["metrics"] = {k: v for k, v in summary.items() if k in task.metrics or k.startswith("pass@")}
        result["details"] = {k: v for k, v in summary.items() if k not in result["metrics"]}
    result["seconds"] = round(seconds, 3)
    result["items_per_second"] = round(len(records) / seconds, 3) if seconds > 0 else None
    if mode == "loglik":
        result["engine"] = {k: engine.stats[k] - stats_before.get(k, 0) for k in engine.stats}
    result["items"] = records
    return result


def evaluate(llm, cfg: EvalConfig, tasks: dict[str, tuple[Task, Loaded]] | None = None) -> dict:
    """Run every task of `cfg` on `llm`; the report dict (settings, per-task results, markdown table).

    `tasks` is what `load_tasks(cfg)` returned (read now when None). If a task fails, the
    EvalIncomplete raised carries the report of the tasks finished before it.
    """
    if tasks is None:
        tasks = load_tasks(cfg)
    check_lengths(llm, cfg, tasks)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    engine = LoglikEngine(llm.model, cfg.batch_size, cfg.share_prefix)
    results = {}
    for name, (task, loaded) in tasks.items():
        try:
            results[name] = run_task(llm, task, cfg, engine, loaded)
        except Exception as e:
            report = _report(llm, cfg, started, results)
            report["failed"] = {"task": name, "error": f"{type(e).__name__}: {e}",
                                "not_run": [n for n in tasks if n not in results and n != name]}
            raise EvalIncomplete(name, e, report) from e
    return _report(llm, cfg, started, results)


def _report(llm, cfg: EvalConfig, started: str, results: dict) -> dict:
    from .. import __version__

    report = {
        "model": {k: v for k, v in llm.info().items()},
        "settings": {**asdict(cfg), "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "telechat": __version__, "torch": torch.__version__, "python": platform.python_version(),
                     "prompt_style_used": _style(llm, cfg), "threads": torch.get_num_threads()},
        "results": results,
    }
    report["table"] = markdown_table(report)
    return report


# ---- reporting ----------------------------------------------------------------------------------
def _fmt(name: str, v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if "perplexity" in name or "bits" in name:
        return f"{v:.3f}"
    return f"{100 * v:.2f}"


def markdown_table(report: dict) -> str:
    """Per task its metrics; then per category (or per subject, for tasks without categories)."""
    lines = ["| task | mode | shots | n | metric | value |", "|---|---|---|---|---|---|"]
    for name, r in report["results"].items():
        for m, v in r["metrics"].items():
            lines.append(f"| {name} | {r['mode']} | {r['shots']} | {r['n']} | {m} | {_fmt(m, v)} |")
    if len(lines) == 2:  # long-context tasks only: their own tables follow
        lines = []
    rows = []
    for name, r in report["results"].items():
        if r.get("categories"):
            for c, v in r["categories"].items():
                rows.append(f"| {name} | {c} | {v['n']} | {_fmt('acc', v['macro'])} | {_fmt('acc', v['micro'])} |")
        elif len(r.get("subjects", {})) > 1:
            for s, v in r["subjects"].items():
                rows.append(f"| {name} | {s} | {v['n']} | {_fmt('acc', v['acc'])} | {_fmt('acc', v['acc'])} |")
    if rows:
        lines += ["", "| task | category / subject | n | macro | micro |", "|---|---|---|---|---|", *rows]
    for name, r in report["results"].items():
        if r.get("kind") == "long":
            lines += ["", *long_table(r)] if lines else long_table(r)
    return "\n".join(lines)


def long_table(result: dict) -> list[str]:
    """A long-context task's rows as a table: one line per length, one column per rotary scaling."""
    metric = result["metric"]
    modes = list(dict.fromkeys(row["rope_scaling"] for row in result["rows"]))
    cells = {(row["length"], row["rope_scaling"]): row[metric] for row in result["rows"]}
    lines = [f"| {result['task']} ({metric}) | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
    for length in dict.fromkeys(row["length"] for row in result["rows"]):
        vals = [cells.get((length, m)) for m in modes]
        lines.append(f"| {length} | " + " | ".join("-" if v is None else (f"{v:.3f}" if metric == "ppl" else
                                                   f"{100 * v:.0f}%") for v in vals) + " |")
    return lines


def write_report(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return path

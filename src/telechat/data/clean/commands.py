"""The two CLI verbs' bodies (telechat.cli keeps only their signatures and help)."""
from __future__ import annotations

import sys


def quiet_datatrove(verbose: bool) -> None:
    """datatrove sends every task's INFO log to stderr; keep the terminal to warnings unless asked.
    The per-task log files (OUTPUT/.work/logs/STAGE/logs/) keep everything either way. datatrove
    installs its handlers inside each task, so its two helpers are replaced (forked workers inherit
    the replacement)."""
    import datatrove.executor.base as executor_base
    from loguru import logger

    level = "INFO" if verbose else "WARNING"
    if not verbose:  # datatrove's progress bars too (TQDM_DISABLE is read at tqdm's import, too late here)
        from functools import partialmethod

        from tqdm import tqdm

        tqdm.__init__ = partialmethod(tqdm.__init__, disable=True)
    fmt = "{time:YYYY-MM-DD HH:mm:ss.SSS} | <level>{level: <8}</level> | {name}:{function}:{line} - <level>{message}</level>"

    def add_task_logger(logging_dir, rank, local_rank=0, node_rank=-1):
        logger.remove()
        logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
        logger.add(sys.stderr, level=level if local_rank == 0 else "ERROR", format=fmt)
        logger.add(logfile, level="DEBUG", format=fmt, colorize=False)
        logger.info(f"Launching pipeline for {rank=}")
        return logfile

    def close_task_logger(logfile):
        logger.complete()
        logger.remove()
        logger.add(sys.stderr, level=level, format=fmt)
        logfile.close()

    executor_base.add_task_logger = add_task_logger
    executor_base.close_task_logger = close_task_logger
    logger.remove()
    logger.add(sys.stderr, level=level, format=fmt)


def summary(report: dict) -> str:
    inp, out = report["input"], report["output"]
    lines = [f"cleaned {inp['documents']:,} documents ({inp['chars']:,} chars, {inp['files']} files) -> "
             f"{out['documents']:,} documents ({out['chars']:,} chars) in {len(out['shards'])} shards at {out['folder']}"]
    for s in report["stages"]:
        removed = sum(r["count"] for r in s["removed"].values())
        if removed:
            top = ", ".join(f"{k} {v['count']:,}" for k, v in list(s["removed"].items())[:3])
            lines.append(f"  {s['name']:<22} -{removed:,} ({top})")
    if report.get("bad_input"):
        lines.append(f"  bad input in {len(report['bad_input'])} files (see report.md)")
    if "run" in report:
        skipped = sum(r["skipped"] for r in report["run"]["stages"])
        lines.append(f"  {report['run']['seconds']:.1f}s" + (f"; resumed ({skipped} tasks already complete)" if skipped else ""))
    if report.get("removed_documents"):
        lines.append(f"removed documents: {report['removed_documents']}/")
    lines.append(f"report: {out['folder']}/report.md and report.json")
    return "\n".join(lines)


def clean_command(input: list[str], output: str, config: str | None, workers: int, executor: str,
                  text_field: str | None, restart: bool, verbose: bool, write_removed: bool = False) -> int:
    from .pipeline import run_clean

    quiet_datatrove(verbose)
    report = run_clean(input, output, config, workers=workers, executor=executor, text_field=text_field,
                       restart=restart, overrides={"output.write_removed": True} if write_removed else None)
    if "submitted" in report:
        print(f"submitted {len(report['submitted'])} dependent Slurm jobs ({', '.join(report['submitted'])}); "
              f"the report will be at {report['output']}/report.md")
        return 0
    print(summary(report))
    return 0


def build_corpus_command(output: str, sources: list[str] | None, local: list[str] | None, cache: str | None,
                         config: str | None, workers: int, max_docs_per_source: int | None, offline: bool,
                         restart: bool, verbose: bool) -> int:
    from .corpus import build_corpus

    quiet_datatrove(verbose)
    report = build_corpus(output, sources, local, cache, config, workers, max_docs_per_source, offline, restart,
                          log=lambda m: print(m, file=sys.stderr, flush=True))
    for name, s in report["gathered"]["sources"].items():
        print(f"  {name:<40} {s['documents']:>8,} docs {s['chars']:>12,} chars")
    print(summary(report))
    return 0

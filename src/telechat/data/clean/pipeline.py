"""The cleaning pipeline as a chain of datatrove executors.

Stages (each a datatrove executor; "shard" stages run one task per output shard):

  filter      read -> normalise -> language -> boilerplate -> rules zh/en -> Gopher (en) ->
              sensitive words -> PII [-> scoring]  -> shard + dedup signatures
  exact-find  datatrove's ExactFindDedups (1 task)
  exact       read shard -> datatrove's ExactDedupFilter -> shard + MinHash signatures
  buckets     datatrove's MinhashDedupBuckets (one task per LSH band), then cluster (1 task)
  near-dup    read shard -> datatrove's MinhashDedupFilter -> scoring -> PTD shards
  select      (only for keep fractions / corpus cut-offs) read shard -> quality selection -> PTD shards
  report      merge every step's tallies (1 task)

Stages that are switched off disappear, and neighbouring shard stages merge. Each stage has its
datatrove logging folder with completion marks, so a rerun resumes at the first incomplete task;
when an upstream task had to run again, everything downstream runs again.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..prepare import DataError
from .config import load_config

WORK = ".work"
REMOVED = "removed"  # OUTPUT/removed/: the removed-documents sidecar (output.write_removed)
RUN_FORMAT = "telechat-clean-run-v1"


@dataclass
class Stage:
    name: str
    tasks: int
    pipeline: list
    clear: list[str] = field(default_factory=list)  # outputs to remove when the stage must run again
    always: bool = False  # rerun every time (the report)


def expand_inputs(patterns: list[str] | str) -> list[str]:
    """Sorted absolute paths of files matching the globs (folders: every file under them)."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [str(patterns)]
    files: set[str] = set()
    for pat in patterns:
        pat = os.path.expanduser(str(pat))
        matches = glob.glob(pat, recursive=True) if glob.has_magic(pat) else ([pat] if os.path.exists(pat) else [])
        if not matches:
            raise DataError(f"{pat}: no input files match")
        for m in matches:
            if os.path.isdir(m):
                for d, dirs, fs in os.walk(m):
                    dirs[:] = [x for x in dirs if not x.startswith(".")]  # e.g. an earlier run's .work
                    files.update(os.path.abspath(os.path.join(d, f)) for f in fs if not f.startswith("."))
            elif os.path.isfile(m):
                files.add(os.path.abspath(m))
    if not files:
        raise DataError(f"no input files in {', '.join(map(str, patterns))}")
    return sorted(files)


def _fingerprint(files: list[str]) -> list:
    out = []
    for f in files:
        st = os.stat(f)
        out.append([f, st.st_size, st.st_mtime_ns])
    return out


# ---- planning ------------------------------------------------------------------------------------------
def plan(cfg: dict, files: list[str], output: str, tasks: int, workers: int, classifier_model: str | None) -> tuple[list[Stage], dict]:
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupFilter, ExactDedupSignature, ExactFindDedups
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter

    from .base import StreamStep
    from .dedup import ChineseAwareMinhashSignature, MinhashVerify, exact_config, lsh_threshold, minhash_config
    from .io import RankReader, ShardWriter, TeleChatReader, ptd_adapter
    from .normalize import NormalizeStep
    from .pii import PIIStep
    from .quality import ClassifierStep, PerplexityStep, QualitySelectStep
    from .report import ReportStep
    from .rules import (BoilerplateStep, ChineseRules, EnglishRules, GopherQuality, GopherRepetition, LanguageStep,
                        RuleStep, SensitiveWordStep, gopher_language)

    work = os.path.join(output, WORK)
    rep = os.path.join(work, "report")
    scores = os.path.join(work, "scores")
    kw = dict(report_dir=rep, examples=cfg["report"]["examples"], excerpt_chars=cfg["report"]["excerpt_chars"],
              removed_dir=os.path.join(output, REMOVED) if cfg["output"]["write_removed"] else None)
    labels: dict[str, str] = {}
    counter = [0]

    def key(label: str) -> str:
        k = f"{counter[0]:02d}-{label.replace(' ', '_')}"
        counter[0] += 1
        labels[k] = label
        return k

    root = os.path.commonpath([os.path.dirname(f) for f in files])
    shard_by = cfg["reader"]["shard_by"]
    by_record = shard_by == "record" or (shard_by == "auto" and len(files) < tasks)
    reader = TeleChatReader(files, root, cfg["reader"], key=key("read"), shard_by_record=by_record, **kw)

    steps: list = [reader]
    if cfg["normalize"]["enabled"]:
        steps.append(NormalizeStep(key("normalise"), cfg["normalize"], **kw))
    lang = dict(cfg["language"])
    if not lang["enabled"]:  # still identified: the zh/en rules need it
        lang["keep"] = ["zh", "en", "other"]
    steps.append(LanguageStep(key("language"), lang, **kw))
    if cfg["boilerplate"]["enabled"]:
        steps.append(BoilerplateStep(key("boilerplate"), cfg["boilerplate"], **kw))
    if cfg["rules_zh"]["enabled"]:
        steps.append(RuleStep(key("rules zh"), ChineseRules(cfg["rules_zh"]), languages=("zh",), **kw))
    if cfg["rules_en"]["enabled"]:
        steps.append(RuleStep(key("rules en"), EnglishRules(cfg["rules_en"]), languages=("en",), **kw))
    if cfg["gopher_quality_en"]["enabled"]:
        g = {k: v for k, v in cfg["gopher_quality_en"].items() if k not in ("enabled", "tokenizer")}
        lang_tok = gopher_language(cfg["gopher_quality_en"]["tokenizer"])
        steps.append(RuleStep(key("gopher quality en"), GopherQuality(**g, language=lang_tok), languages=("en",), **kw))
    if cfg["gopher_repetition_en"]["enabled"]:
        g = {k: v for k, v in cfg["gopher_repetition_en"].items() if k not in ("enabled", "tokenizer")}
        g["top_n_grams"] = tuple(tuple(x) for x in g["top_n_grams"])
        g["dup_n_grams"] = tuple(tuple(x) for x in g["dup_n_grams"])
        lang_tok = gopher_language(cfg["gopher_repetition_en"]["tokenizer"])
        steps.append(RuleStep(key("gopher repetition en"), GopherRepetition(**g, language=lang_tok),
                              languages=("en",), **kw))
    if cfg["sensitive_words"]["enabled"]:
        steps.append(SensitiveWordStep(key("sensitive words"), cfg["sensitive_words"], **kw))
    if cfg["pii"]["enabled"]:
        steps.append(PIIStep(key("pii"), cfg["pii"], **kw))

    stages: list[Stage] = []
    seg = [0]
    seg_clear: list[str] = []

    def end_segment(tail: list, name: str) -> str:
        """Close the current shard stage: write its shard (+ `tail`, e.g. signatures); the next
        stage starts by reading it back."""
        folder = os.path.join(work, f"seg{seg[0]}")
        stages.append(Stage(name, tasks, steps + [ShardWriter(folder)] + tail, clear=[folder] + seg_clear))
        seg[0] += 1
        return folder

    info: dict = {"labels": labels, "inputs": files, "tasks": tasks}
    if kw["removed_dir"]:
        info["removed_documents"] = kw["removed_dir"]
    dedup = cfg["dedup"]
    first_name = "filter"
    if dedup["exact"]["enabled"]:
        sigs, dups = os.path.join(work, "exact", "sigs"), os.path.join(work, "exact", "dups")
        ec = exact_config()
        folder = end_segment([ExactDedupSignature(sigs, ec)], first_name)
        stages[-1].clear.append(sigs)
        stages.append(Stage("exact-find", 1, [ExactFindDedups(sigs, dups, ec)], clear=[dups]))
        steps = [RankReader(folder), StreamStep(key("exact dedup"), ExactDedupFilter(dups, ec), "exact_duplicate", **kw)]
        first_name = "exact"
    mh = dedup["minhash"]
    if mh["enabled"]:
        sigs, bk, rm = (os.path.join(work, "minhash", x) for x in ("sigs", "buckets", "remove"))
        mc = minhash_config(mh)
        folder = end_segment([ChineseAwareMinhashSignature(sigs, mh)], first_name)
        stages[-1].clear.append(sigs)
        stages.append(Stage("minhash-buckets", mh["num_buckets"], [MinhashDedupBuckets(sigs, bk, config=mc)], clear=[bk]))
        pairs = bk
        if mh["verify_jaccard"] is not None:
            pairs = os.path.join(work, "minhash", "checked")
            check = MinhashVerify(sigs, bk, pairs, mh["num_buckets"] * mh["hashes_per_bucket"], mh["verify_jaccard"])
            stages.append(Stage("minhash-verify", 1, [check], clear=[pairs]))
        stages.append(Stage("minhash-cluster", 1, [MinhashDedupCluster(pairs, rm, config=mc, save_cluster_id=True)],
                            clear=[rm]))
        steps = [RankReader(folder), StreamStep(key("near dedup"), MinhashDedupFilter(rm, load_cluster_ids=True),
                                                "near_duplicate", detail_key="minhash_cluster_id", **kw)]
        first_name = "near-dup"
        info["dedup"] = {"minhash_threshold": round(lsh_threshold(mh["num_buckets"], mh["hashes_per_bucket"]), 3),
                         "num_buckets": mh["num_buckets"], "hashes_per_bucket": mh["hashes_per_bucket"],
                         "zh_shingles": f"{mh['zh_shingles']} {mh['zh_ngram']}-grams",
                         "en_shingles": f"{mh['en_shingles']} {mh['en_ngram']}-grams",
                         "verify_jaccard": mh["verify_jaccard"]}

    q = cfg["quality"]
    ppl, clf = q["perplexity"], q["classifier"]
    need_select = (ppl["enabled"] and not ppl["cutoffs"]) or (clf["enabled"] and clf["keep_fraction"] is not None)
    if ppl["enabled"]:
        pc = dict(ppl)
        pc["threads"] = ppl["threads"] or max(1, (os.cpu_count() or 1) // max(1, min(workers, tasks)))
        steps.append(PerplexityStep(key("perplexity"), pc, scores, q["sample_per_task"], decide_here=not need_select, **kw))
        seg_clear.append(scores)
    if clf["enabled"]:
        steps.append(ClassifierStep(key("quality classifier"), clf, classifier_model, scores, q["sample_per_task"],
                                    decide_here=clf["keep_fraction"] is None, **kw))
        seg_clear.append(scores)
    if need_select:
        folder = end_segment([], first_name)
        steps = [RankReader(folder), QualitySelectStep(key("quality select"), q, scores, **kw)]
        first_name = "select"
    fields = tuple(cfg["output"]["fields"])
    final = ShardWriter(output, cfg["output"]["compression"],
                        adapter=ptd_adapter(fields, cfg["output"]["keep_input_fields"]))
    stages.append(Stage(first_name, tasks, steps + [final], clear=[]))
    stages.append(Stage("report", 1, [ReportStep(rep, output, info, cfg["report"]["examples"])], always=True))
    return stages, info


# ---- executors -------------------------------------------------------------------------------------------
def make_executor(stage: Stage, kind: str, cfg: dict, work: str, workers: int, depends=None):
    logging_dir = os.path.join(work, "logs", stage.name)
    ecfg = cfg["executor"]
    if kind == "local":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(stage.pipeline, tasks=stage.tasks, workers=max(1, min(workers, stage.tasks)),
                                     logging_dir=logging_dir, skip_completed=not stage.always,
                                     start_method=ecfg["start_method"])
    if kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        s = ecfg["slurm"]
        if not s["partition"]:
            raise DataError("--executor slurm needs executor.slurm.partition in the config")
        return SlurmPipelineExecutor(stage.pipeline, tasks=stage.tasks, time=s["time"], partition=s["partition"],
                                     cpus_per_task=s["cpus_per_task"], mem_per_cpu_gb=s["mem_per_cpu_gb"],
                                     workers=workers if workers > 1 else -1, job_name=f"{s['job_name']}_{stage.name}",
                                     logging_dir=logging_dir, depends=depends, venv_path=s["venv_path"],
                                     sbatch_args=dict(s["sbatch_args"]) or None, skip_completed=not stage.always)
    if kind == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise DataError("--executor ray needs Ray: pip install 'ray[default]'") from None
        from datatrove.executor.ray import RayPipelineExecutor

        r = ecfg["ray"]
        return RayPipelineExecutor(stage.pipeline, tasks=stage.tasks, workers=max(1, min(workers, stage.tasks)),
                                   logging_dir=logging_dir, skip_completed=not stage.always,
                                   cpus_per_task=r["cpus_per_task"], mem_per_cpu_gb=r["mem_per_cpu_gb"],
                                   tasks_per_job=r["tasks_per_job"])
    raise DataError(f"unknown executor {kind!r} (local, slurm or ray)")


def _clear_stage(stage: Stage, work: str) -> None:
    shutil.rmtree(os.path.join(work, "logs", stage.name, "completions"), ignore_errors=True)
    for path in stage.clear:
        shutil.rmtree(path, ignore_errors=True)


def _incomplete(stage: Stage, work: str) -> list[int]:
    done = os.path.join(work, "logs", stage.name, "completions")
    have = set(os.listdir(done)) if os.path.isdir(done) and not stage.always else set()
    return [r for r in range(stage.tasks) if f"{r:05d}" not in have]


# ---- the entry point ---------------------------------------------------------------------------------------
def _prepare_output(output: Path, manifest: dict, restart: bool) -> dict | None:
    """The previous run's manifest (resume), or None for a fresh start; refuses to mix runs."""
    run_file = output / WORK / "run.json"
    if restart and run_file.exists():
        shutil.rmtree(output / WORK)
        shutil.rmtree(output / REMOVED, ignore_errors=True)
        for f in output.iterdir():
            if f.is_file() and (f.name[:5].isdigit() and ".jsonl" in f.name or f.name in ("report.json", "report.md")):
                f.unlink()
    if run_file.exists():
        prev = json.loads(run_file.read_text(encoding="utf-8"))
        if prev.get("config") != manifest["config"]:
            raise DataError(f"{output} holds a run with another configuration; pass --restart to start it "
                            "again or choose another --output")
        if prev.get("inputs") != manifest["inputs"]:
            raise DataError(f"{output} holds a run over other (or changed) input files; pass --restart to start "
                            "it again or choose another --output")
        return prev
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise DataError(f"{output}: exists and is not the output of `telechat data clean`; refusing to write into it")
    return None


def run_clean(inputs: list[str] | str, output: str | Path, config: str | Path | dict | None = None,
              workers: int = 1, executor: str = "local", text_field: str | None = None,
              restart: bool = False, overrides: dict | None = None) -> dict:
    """Clean `inputs` (globs) into PTD jsonl shards in `output`; returns the report (also written as
    OUTPUT/report.json and report.md). A rerun with the same inputs and configuration resumes."""
    ov = dict(overrides or {})
    if text_field:
        ov["reader.text_field"] = text_field
    cfg = load_config(config, **ov)
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    files = expand_inputs(inputs)
    output = Path(output).absolute()
    work = output / WORK
    manifest = {"format": RUN_FORMAT, "config": cfg, "inputs": _fingerprint(files)}
    prev = _prepare_output(output, manifest, restart)
    t = cfg["executor"]["tasks"]
    if prev is not None:
        tasks = prev["tasks"]
    elif t == "auto" or t is None:
        tasks = max(workers, min(len(files), 16))
    else:
        tasks = int(t)
    if tasks < 1:
        raise DataError(f"executor.tasks must be >= 1, got {tasks}")
    manifest["tasks"] = tasks
    work.mkdir(parents=True, exist_ok=True)
    (work / "run.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=1), encoding="utf-8")

    quality_info: dict = {}
    clf = cfg["quality"]["classifier"]
    model_path = None
    if clf["enabled"]:
        model_path = clf["model"] or str(work / "classifier.npz")
        if not os.path.exists(model_path):
            from .quality import train_classifier

            if not clf["train"]["positive"] or not clf["train"]["negative"]:
                raise DataError(f"{model_path}: no classifier model, and no train.positive/negative sources to train one")
            tr = clf["train"]
            quality_info["classifier_training"] = train_classifier(
                tr["positive"], tr["negative"], model_path, cfg["reader"], cfg["normalize"], tr["max_docs_per_class"],
                tr["epochs"], tr["dim"], tr["buckets"], tr["lr"], tr["seed"], tr["holdout"])
            (work / "classifier_training.json").write_text(json.dumps(quality_info["classifier_training"], indent=1))
        elif (work / "classifier_training.json").exists():
            quality_info["classifier_training"] = json.loads((work / "classifier_training.json").read_text())

    stages, info = plan(cfg, files, str(output), tasks, workers, model_path)
    info["executor"] = executor
    if quality_info:
        info["quality"] = quality_info  # the report step holds this same dict
    runs = []
    if executor == "slurm":
        prev_ex = None
        stale = False
        for st in stages:
            if stale and not st.always:
                _clear_stage(st, str(work))
            if _incomplete(st, str(work)) and not st.always:
                stale = True
            prev_ex = make_executor(st, executor, cfg, str(work), workers, depends=prev_ex)
        prev_ex.run()  # submits the chain (each job depends on the one before)
        return {"submitted": [s.name for s in stages], "output": str(output)}

    stale = False
    removed_marker = work / "intermediates_removed"
    if removed_marker.exists() and any(_incomplete(st, str(work)) for st in stages if not st.always):
        stale = True  # the shards an unfinished task would read were removed after the last success
        removed_marker.unlink()
    for st in stages:
        if stale and not st.always:
            _clear_stage(st, str(work))
        todo = _incomplete(st, str(work))
        t0 = time.perf_counter()
        if todo:
            if not st.always:
                stale = True
                for path in st.clear:  # outputs of a stage whose tasks all rerun start empty
                    if len(todo) == st.tasks and path != str(output):
                        shutil.rmtree(path, ignore_errors=True)
            make_executor(st, executor, cfg, str(work), workers).run()
        runs.append({"stage": st.name, "tasks": st.tasks, "ran": len(todo) if not st.always else 1,
                     "skipped": st.tasks - len(todo) if not st.always else 0,
                     "seconds": round(time.perf_counter() - t0, 2)})
        missing = _incomplete(st, str(work)) if not st.always else []
        if missing:
            raise DataError(f"stage {st.name}: tasks {missing[:10]} did not complete; see {work / 'logs' / st.name}")
    from .report import write_report

    report = json.loads((output / "report.json").read_text(encoding="utf-8"))
    report["run"] = {"stages": runs, "workers": workers, "seconds": round(sum(r["seconds"] for r in runs), 2)}
    write_report(report, str(output))
    if not cfg["output"]["keep_intermediate"]:
        for sub in ("exact", "minhash", "scores"):
            shutil.rmtree(work / sub, ignore_errors=True)
        for p in work.glob("seg*"):
            shutil.rmtree(p, ignore_errors=True)
        removed_marker.write_text("intermediate shards and signatures were removed after a complete run\n")
    return report

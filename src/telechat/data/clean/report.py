"""The cleaning report: every step's per-task tallies merged into report.json and report.md."""
from __future__ import annotations

import json
import os

from datatrove.pipeline.base import PipelineStep

FORMAT = "telechat-clean-report-v1"


def _merge_removed(into: dict, part: dict, max_examples: int) -> None:
    for reason, r in part.items():
        t = into.setdefault(reason, {"count": 0, "chars": 0, "examples": []})
        t["count"] += r["count"]
        t["chars"] += r["chars"]
        room = max_examples - len(t["examples"])
        if room > 0:
            t["examples"].extend(r["examples"][:room])


def merge_parts(report_dir: str, max_examples: int = 3) -> list[dict]:
    """One entry per step key (in pipeline order), summed over tasks."""
    base = os.path.join(report_dir, "parts")
    stages = []
    for key in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        total = {"key": key, "docs_in": 0, "docs_out": 0, "chars_in": 0, "chars_out": 0, "modified": 0,
                 "removed": {}, "counters": {}, "tasks": 0}
        files: dict = {}
        for name in sorted(os.listdir(os.path.join(base, key))):
            if not name.endswith(".json") or name.startswith("."):
                continue
            with open(os.path.join(base, key, name), encoding="utf-8") as f:
                part = json.load(f)
            total["tasks"] += 1
            for k in ("docs_in", "docs_out", "chars_in", "chars_out", "modified"):
                total[k] += part[k]
            _merge_removed(total["removed"], part["removed"], max_examples)
            for k, v in part["counters"].items():
                total["counters"][k] = total["counters"].get(k, 0) + v
            for fname, info in part.get("files", {}).items():
                fi = files.setdefault(fname, {"records": 0, "docs": 0, "problems": {}})
                fi["records"] += info["records"]
                fi["docs"] += info["docs"]
                if info.get("truncated"):
                    fi["truncated"] = fi.get("truncated", 0) + info["truncated"]
                for reason, p in info["problems"].items():
                    q = fi["problems"].setdefault(reason, {"count": 0, "lines": []})
                    q["count"] += p["count"]
                    q["lines"] = sorted(q["lines"] + p["lines"])[:10]
        total["removed"] = dict(sorted(total["removed"].items(), key=lambda kv: -kv[1]["count"]))
        if files:
            total["files"] = files
        stages.append(total)
    return stages


def removed_by_rule(stages: list[dict]) -> dict:
    """Every removal reason of every stage, most documents first: {rule: {stage, count, chars,
    examples}} (the reader's bad-input reasons are in bad_input)."""
    out = {}
    for s in stages:
        if s["key"].endswith("-read"):
            continue
        for reason, r in s["removed"].items():
            out[reason] = {"stage": s.get("name", s["key"]), "count": r["count"], "chars": r["chars"],
                           "examples": r["examples"]}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["count"]))


def build_report(report_dir: str, output_dir: str, info: dict, max_examples: int = 3) -> dict:
    stages = merge_parts(report_dir, max_examples)
    labels = info.get("labels", {})
    for s in stages:
        s["name"] = labels.get(s["key"], s["key"].split("-", 1)[-1])
    read = next((s for s in stages if s["key"].endswith("-read")), None)
    bad = {}
    if read:
        for fname, fi in read.get("files", {}).items():
            if fi["problems"] or fi.get("truncated"):
                bad[fname] = {r: p for r, p in fi["problems"].items()}
                if fi.get("truncated"):
                    bad[fname]["truncated"] = {"count": fi["truncated"], "lines": []}
    shards = sorted(f for f in os.listdir(output_dir) if f[:5].isdigit() and ".jsonl" in f) if os.path.isdir(output_dir) else []
    last = stages[-1] if stages else {"docs_out": 0, "chars_out": 0}
    report = {
        "format": FORMAT,
        "input": {"files": len(info.get("inputs", [])), "records": read["docs_in"] if read else 0,
                  "documents": read["docs_out"] if read else 0, "chars": read["chars_out"] if read else 0},
        "output": {"folder": output_dir, "documents": last["docs_out"], "chars": last["chars_out"],
                   "shards": shards,
                   "bytes": sum(os.path.getsize(os.path.join(output_dir, f)) for f in shards)},
        "stages": stages,
        "bad_input": bad,
    }
    report["removed_by_rule"] = removed_by_rule(stages)
    for k in ("dedup", "quality", "config_file", "executor", "tasks", "removed_documents"):
        if k in info:
            report[k] = info[k]
    cut = os.path.join(report_dir, "quality_cutoffs.json")
    if os.path.exists(cut):
        with open(cut) as f:
            report.setdefault("quality", {})["cutoffs"] = json.load(f)
    return report


def _n(x: int) -> str:
    return f"{x:,}"


def render_markdown(report: dict) -> str:
    inp, out = report["input"], report["output"]
    keep = out["documents"] / inp["documents"] if inp["documents"] else 0.0
    lines = ["# Cleaning report", "",
             f"Input: {inp['files']} files, {_n(inp['records'])} records -> {_n(inp['documents'])} documents, "
             f"{_n(inp['chars'])} characters.  ",
             f"Output: {_n(out['documents'])} documents ({keep:.1%}), {_n(out['chars'])} characters, "
             f"{len(out['shards'])} shards, {out['bytes'] / 1e6:.1f} MB in `{out['folder']}`.", "",
             "| stage | docs in | docs out | removed | chars in | chars out | modified | main reasons |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for s in report["stages"]:
        removed = sum(r["count"] for r in s["removed"].values())
        top = ", ".join(f"{k} {v['count']}" for k, v in list(s["removed"].items())[:3])
        lines.append(f"| {s['name']} | {_n(s['docs_in'])} | {_n(s['docs_out'])} | {_n(removed)} | {_n(s['chars_in'])} | "
                     f"{_n(s['chars_out'])} | {_n(s['modified'])} | {top} |")
    lines.append("")
    if report.get("removed_by_rule"):
        lines += ["## Removed documents, by rule", "", "| rule | stage | documents | characters |", "|---|---|---:|---:|"]
        lines += [f"| {k} | {r['stage']} | {_n(r['count'])} | {_n(r['chars'])} |" for k, r in report["removed_by_rule"].items()]
        if report.get("removed_documents"):
            lines.append("")
            lines.append(f"The removed documents, with stage, reason and detail: `{report['removed_documents']}/*.jsonl`.")
        lines.append("")
    for s in report["stages"]:
        if not s["removed"] and not s["counters"]:
            continue
        lines.append(f"## {s['name']}")
        if s["counters"]:
            lines.append("Counts: " + ", ".join(f"{k} {_n(v)}" for k, v in sorted(s["counters"].items())))
            lines.append("")
        for reason, r in s["removed"].items():
            lines.append(f"- **{reason}**: {_n(r['count'])} documents, {_n(r['chars'])} characters")
            for ex in r["examples"]:
                detail = f" ({ex['detail']})" if ex.get("detail") else ""
                text = ex["text"].replace("|", "\\|")
                lines.append(f"  - `{ex['where']}`{detail}: {text}")
        lines.append("")
    if report["bad_input"]:
        lines.append("## Bad input (file: reason count, first lines)")
        for fname, probs in report["bad_input"].items():
            desc = "; ".join(f"{r} {p['count']}" + (f" (lines {', '.join(map(str, p['lines']))})" if p["lines"] else "")
                             for r, p in probs.items())
            lines.append(f"- `{fname}`: {desc}")
        lines.append("")
    if "dedup" in report:
        lines.append("## Deduplication")
        lines.append(", ".join(f"{k}: {v}" for k, v in report["dedup"].items()))
        lines.append("")
    if "quality" in report:
        lines.append("## Quality scoring")
        lines.append("```json")
        lines.append(json.dumps(report["quality"], ensure_ascii=False, indent=1))
        lines.append("```")
        lines.append("")
    if "run" in report:
        lines.append("## This run")
        lines.append("| stage | tasks | ran | already complete | seconds |")
        lines.append("|---|---:|---:|---:|---:|")
        for r in report["run"]["stages"]:
            lines.append(f"| {r['stage']} | {r['tasks']} | {r['ran']} | {r['skipped']} | {r['seconds']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def write_report(report: dict, output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    for name, text in (("report.json", json.dumps(report, ensure_ascii=False, indent=1)), ("report.md", render_markdown(report))):
        tmp = os.path.join(output_dir, f".{name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, os.path.join(output_dir, name))


class ReportStep(PipelineStep):
    """The last stage (one task): merges the tallies into OUTPUT/report.json and report.md, so the
    report is written by the same executor (local, Slurm, Ray) as the rest."""

    type = "📊 - REPORT"
    name = "📊 report"

    def __init__(self, report_dir: str, output_dir: str, info: dict, max_examples: int = 3):
        super().__init__()
        self.report_dir, self.output_dir, self.info, self.max_examples = report_dir, output_dir, info, max_examples

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if data:
            yield from data
        write_report(build_report(self.report_dir, self.output_dir, self.info, self.max_examples), self.output_dir)

"""Peak memory of `telechat quantize`: it should hold about one block, not the model.

Saves random bf16 models of one width (default: TeleChat-1B's hidden 2048, FFN 5632 so that group
size 128 divides it) with a growing number of layers, quantizes each with GPTQ int4 g128 in a fresh
process, and prints the checkpoint size, the model's size in fp32 (what the block-wise pipeline
computes in) and the quantizing process's peak RSS. If the pipeline held the model in fp32, the peak
would grow by the extra layers' fp32 size. Note that peak RSS also counts the checkpoint pages read
through safetensors' memory map: they are file-backed and reclaimable, but they make the peak grow
by up to the extra layers' bf16 size even when only one block is held.

With --memory-limit GIB (needs a writable cgroup memory controller, v1 or v2: root in a container
usually has one), each quantize process runs in its own cgroup capped at that size, swap included
where the kernel accounts it. The checkpoint is dropped from the page cache after it is written, so
the capped process is charged for reading it; page cache is reclaimed under the cap, anonymous memory
is not. A run that finishes under a cap below twice the checkpoint (and below the fp32 model the
pipeline computes in) is the real test of "a 7B model quantizes on a machine that cannot hold it twice".

    python benchmarks/quant_memory.py [--layers 4,16] [--hidden 2048] [--ffn 5632] [--memory-limit 2.5]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(os.environ.get("TELECHAT_SHARED", Path(__file__).resolve().parents[2] / "shared"))

_MEASURE = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
            "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def calib_file(work: Path) -> Path:
    found = sorted((SHARED / "data" / "eval" / "wikitext2").rglob("wikitext-validation.arrow"))
    if found:
        return found[0]
    # no shared data: varied text from the tokenizer's own vocabulary is enough to drive GPTQ
    import telechat

    tok = telechat.load("default").tokenizer
    g = torch.Generator().manual_seed(0)
    lines = [tok.decode(torch.randint(100, 20000, (400,), generator=g).tolist()) for _ in range(64)]
    path = work / "calib.txt"
    path.write_text("\n\n".join(lines), encoding="utf-8")
    return path


class MemoryCap:
    """A fresh cgroup capped at `limit` bytes: `enter` (a preexec_fn) moves the child into it."""

    def __init__(self, limit: int):
        v2, v1 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")
        name = f"telechat-quant-memory-{os.getpid()}"
        if (v2 / "cgroup.controllers").exists():
            self.dir, files = v2 / name, {"memory.max": limit, "memory.swap.max": 0}
            self.peak_file = "memory.peak"
        elif v1.is_dir():
            self.dir, files = v1 / name, {"memory.limit_in_bytes": limit, "memory.memsw.limit_in_bytes": limit}
            self.peak_file = "memory.max_usage_in_bytes"
        else:
            sys.exit("--memory-limit: no cgroup memory controller at /sys/fs/cgroup")
        try:
            self.dir.mkdir()
        except OSError as e:
            sys.exit(f"--memory-limit: cannot create a cgroup ({e}); run as root or with a delegated cgroup")
        for fname, value in files.items():
            try:
                (self.dir / fname).write_text(str(value))
            except OSError:
                if fname.startswith(("memory.max", "memory.limit")):
                    raise
                # no swap accounting in this kernel: the cap then leaves swap out of the count
        self.procs = str(self.dir / "cgroup.procs")

    def enter(self) -> None:
        with open(self.procs, "w") as f:
            f.write(str(os.getpid()))

    def peak(self) -> int | None:
        try:
            return int((self.dir / self.peak_file).read_text())
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        try:
            self.dir.rmdir()
        except OSError:
            pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="4,16")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--method", default="gptq", choices=["gptq", "rtn"])
    ap.add_argument("--memory-limit", type=float, help="GiB: run each quantize process in a cgroup capped at this")
    args = ap.parse_args()
    limit = int(args.memory_limit * 2 ** 30) if args.memory_limit else None

    import telechat

    tok = telechat.load("default").tokenizer
    rows = []
    with tempfile.TemporaryDirectory(prefix="quant-memory-") as tmp:
        work = Path(tmp)
        calib = calib_file(work)
        for n_layer in (int(x) for x in args.layers.split(",")):
            src, out = work / f"model-{n_layer}", work / f"int4-{n_layer}"
            llm = telechat.from_preset("1B", tokenizer=tok, vocab_size=len(tok), hidden_size=args.hidden,
                                       n_head=args.heads, ffn_hidden_size=args.ffn, n_layer=n_layer,
                                       dtype=torch.bfloat16)
            params = sum(p.numel() for p in llm.model.parameters())
            llm.save(src)
            del llm
            for f in src.glob("*.safetensors"):  # out of the page cache, so the quantizing process reads (and is
                with open(f, "rb") as fh:         # charged for) the checkpoint itself
                    os.fsync(fh.fileno())
                    os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            ckpt = sum(f.stat().st_size for f in src.glob("*.safetensors"))
            cmd = [sys.executable, "-c", _MEASURE, sys.executable, "-m", "telechat.cli", "quantize", "--model", str(src),
                   "--bits", "4", "--group-size", "128", "--method", args.method, "--calib", str(calib),
                   "--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len),
                   "--output", str(out)]
            cap = MemoryCap(limit) if limit else None
            t = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cap.enter if cap else None)
                cap_peak = cap.peak() if cap else None
            finally:
                if cap:
                    cap.close()
            seconds = time.perf_counter() - t
            if proc.returncode:
                killed = " (killed: over the memory limit)" if proc.returncode in (-9, 137) and cap else ""
                sys.exit(f"quantize failed for {n_layer} layers{killed}:\n{proc.stderr[-3000:]}")
            peak = int(proc.stdout.split("PEAK_KB")[-1].split()[0]) * 1024
            qsize = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            rows.append((n_layer, params, ckpt, 4 * params, peak, qsize, seconds, cap_peak))
            for d in (src, out):
                for f in d.iterdir():
                    f.unlink()
                d.rmdir()

    gib = 2 ** 30
    print(f"GPTQ int4 g128 ({args.method}), hidden {args.hidden}, FFN {args.ffn}, vocab {len(tok)}, "
          f"{args.calib_samples} x {args.calib_seq_len} calibration tokens, {torch.get_num_threads()} threads")
    capped = f" | cgroup peak (cap {args.memory_limit:g} GiB)" if limit else ""
    print(f"| layers | params | bf16 checkpoint | fp32 model | peak RSS quantizing | int4 checkpoint | time{capped} |")
    print("|---|---|---|---|---|---|---|" + ("---|" if limit else ""))
    for n_layer, params, ckpt, fp32, peak, qsize, seconds, cap_peak in rows:
        extra = "" if not limit else f" {cap_peak / gib:.2f} GiB |" if cap_peak else " n/a |"
        print(f"| {n_layer} | {params / 1e6:.0f}M | {ckpt / gib:.2f} GiB | {fp32 / gib:.2f} GiB | {peak / gib:.2f} GiB | "
              f"{qsize / gib:.2f} GiB | {seconds:.0f} s |{extra}")
    if limit:
        over = [r[0] for r in rows if r[2] > limit]
        print(f"finished under a {args.memory_limit:g} GiB cap (page cache counted; swap, if any, within the cap)"
              + (f"; the bf16 checkpoint alone is larger than the cap for {over} layers" if over else ""))
    if len(rows) < 2:
        return 0
    (l0, *_, p0, _, _, _), (l1, *_, p1, _, _, _) = rows[0], rows[-1]
    print(f"peak RSS grows {(p1 - p0) / gib:.2f} GiB from {l0} to {l1} layers "
          f"(the extra layers are {(rows[-1][3] - rows[0][3]) / gib:.2f} GiB in fp32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed of `telechat data prepare` (SFT) on the shared TeleChat dialogue examples.

Prints tokens/s with 1 and 2 workers (and the ratio), and for one worker the share of the
wall time spent inside the tokenizer's encode calls (timed around each call).

    python benchmarks/data_bench.py                       # official 12B SentencePiece tokenizer
    python benchmarks/data_bench.py --tokenizer DIR --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

SHARED = Path(os.environ.get("TELECHAT_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=str(SHARED / "telechat-official" / "12B"))
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3, help="best of N per worker count")
    args = ap.parse_args()
    files = sorted((SHARED / "data" / "sft" / "telechat").glob("*_example.jsonl")) + \
        sorted((SHARED / "data" / "sft" / "telechat2" / "sft").glob("*.jsonl"))
    if not files or not Path(args.tokenizer).exists():
        raise SystemExit(f"needs ../shared (SFT examples and the tokenizer {args.tokenizer}); not found")

    from telechat.data import prepare
    from telechat.tokenizer import Tokenizer

    tmp = Path(tempfile.mkdtemp())
    data_json = tmp / "data.json"
    data_json.write_text(json.dumps({str(f): 1 for f in files}))
    mb = sum(f.stat().st_size for f in files) / 1e6

    # Time inside encode (one worker runs in this process).
    spent = [0.0]
    encode = Tokenizer.encode

    def timed(self, text):
        t = time.perf_counter()
        try:
            return encode(self, text)
        finally:
            spent[0] += time.perf_counter() - t

    best, share = {}, None
    for _ in range(args.rounds):
        for workers in (1, 2):
            Tokenizer.encode = timed if workers == 1 else encode
            spent[0] = 0.0
            t = time.perf_counter()
            m = prepare.prepare_sft(data_json, args.tokenizer, args.max_seq_len, tmp / f"out{workers}",
                                    num_workers=workers, seed=0)
            wall = time.perf_counter() - t
            if workers not in best or wall < best[workers][0]:
                best[workers] = (wall, m["tokens"])
                if workers == 1:
                    share = spent[0] / wall
    Tokenizer.encode = encode
    same = all((tmp / "out1" / f).read_bytes() == (tmp / "out2" / f).read_bytes()
               for f in ("input_ids.npy", "loss_mask.npy", "segment_ids.npy", "manifest.json"))

    print(f"\ndata prepare (sft): {len(files)} files, {mb:.1f} MB, tokenizer {args.tokenizer}, "
          f"max_seq_len {args.max_seq_len}, {os.cpu_count()} CPUs, best of {args.rounds}")
    print("| workers | wall s | tokens | tokens/s | vs 1 worker |")
    print("|---:|---:|---:|---:|---:|")
    for w, (wall, tokens) in best.items():
        print(f"| {w} | {wall:.2f} | {tokens:,} | {tokens / wall:,.0f} | {best[1][0] / wall:.2f}x |")
    print(f"time inside the tokenizer's encode calls (1 worker): {share:.0%}; "
          f"outputs byte-identical for 1 and 2 workers: {same}")


if __name__ == "__main__":
    main()

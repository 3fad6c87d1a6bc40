#!/usr/bin/env bash
# A small bilingual TeleChat end to end on one CPU machine: tokenizer, pre-training, SFT, chat.
# Needs ../shared (corpora and TeleChat's dialogue examples). Scale with STEPS_PT / STEPS_SFT.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/demo}
SHARED=${SHARED:-../shared}
STEPS_PT=${STEPS_PT:-600}
STEPS_SFT=${STEPS_SFT:-150}
BATCH=${BATCH:-8}
mkdir -p "$RUN"

# 1. Corpus (Chinese reviews + MSRA news, NLTK English; 20 MB) and a 16000-token BPE tokenizer.
python benchmarks/tokenizer_bench.py --shared "$SHARED" --size-mb 20 --vocab-size 16000 --work-dir "$RUN" \
    --no-default-model | tee "$RUN/tokenizer.txt"
python - "$RUN" <<'PY'
import json, sys
run = sys.argv[1]
# one document per line; the corpus file is chunked by bytes, so a line may end mid-character
with open(f"{run}/train.txt", "rb") as f, open(f"{run}/corpus.jsonl", "w", encoding="utf-8") as out:
    for raw in f:
        line = raw.decode("utf-8", errors="ignore").strip()
        if line:
            out.write(json.dumps({"data": line}, ensure_ascii=False) + "\n")
PY

# 2. Pre-training blocks, then pre-train the 30M preset.
telechat data prepare --mode pretrain --input "$RUN/corpus.jsonl" --tokenizer "$RUN/tokenizer" \
    --max-seq-len 256 --val-fraction 0.005 --num-workers 2 --output "$RUN/pt-data"
telechat train --stage pretrain --data "$RUN/pt-data" --preset 30M --output "$RUN/pt" --max-steps "$STEPS_PT" \
    --per-device-batch-size "$BATCH" --learning-rate 1e-3 --warmup-proportion 0.05 --eval-steps 40 --save-steps 200 --no-progress --overwrite

# 3. SFT on TeleChat's own dialogue examples.
cat > "$RUN/data.json" <<JSON
{"$(realpath "$SHARED")/data/sft/telechat/single_turn_example.jsonl": 1,
 "$(realpath "$SHARED")/data/sft/telechat/multi_turn_example.jsonl": 1}
JSON
telechat data prepare --data-json "$RUN/data.json" --tokenizer "$RUN/tokenizer" --max-seq-len 256 \
    --num-workers 2 --output "$RUN/sft-data"
telechat train --stage sft --data "$RUN/sft-data" --model "$RUN/pt/$(cat "$RUN/pt/latest")" \
    --output "$RUN/sft" --max-steps "$STEPS_SFT" --per-device-batch-size "$BATCH" --learning-rate 5e-4 --eval-steps 20 --no-progress --overwrite

# 4. Chat.
for q in "你好" "北京是中国的首都吗？" "What is machine learning?"; do
    echo "Q: $q"; telechat chat --model "$RUN/sft/$(cat "$RUN/sft/latest")" --prompt "$q" --max-new-tokens 48
    echo
done

#!/usr/bin/env bash
# LoRA fine-tuning of the default model (SmolLM2-135M-Instruct) on LLaMA-Factory's English alpaca demo
# (999 instructions), then a chat with the result. Prints the held-out loss before and after.
# Needs ../shared for the data. Scale with STEPS, BATCH, SEQ; the defaults run in minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/lora_default}
SHARED=${SHARED:-../shared}
STEPS=${STEPS:-40}
BATCH=${BATCH:-4}
SEQ=${SEQ:-384}
RANK=${RANK:-8}
LR=${LR:-1e-3}
mkdir -p "$RUN"

# 1. SFT samples in the default model's own chat template (ChatML), loss on the answers only.
cat > "$RUN/data.json" <<JSON
{"$(realpath "$SHARED")/data/sft/llama-factory/alpaca_en_demo.json": 1}
JSON
telechat data prepare --data-json "$RUN/data.json" --tokenizer default --max-seq-len "$SEQ" --output "$RUN/data"

# 2. Held-out loss of the model as it is: one step at learning rate 0 (LoRA's B starts at zero).
COMMON=(--stage sft --data "$RUN/data" --model default --per-device-batch-size "$BATCH" --lora-dim "$RANK"
        --lora-scaling $((2 * RANK)) --only-optimize-lora --no-progress --overwrite)
telechat train "${COMMON[@]}" --output "$RUN/before" --max-steps 1 --learning-rate 0 | tee "$RUN/before.txt"

# 3. LoRA r=$RANK on every attention and MLP projection; the checkpoint is a PEFT adapter.
telechat train "${COMMON[@]}" --output "$RUN/lora" --max-steps "$STEPS" --learning-rate "$LR" \
    --warmup-proportion 0.1 | tee "$RUN/after.txt"
CKPT="$RUN/lora/$(cat "$RUN/lora/latest")"

# 4. Merge into an official-layout folder and chat with it.
telechat merge --model default --adapter "$CKPT" --output "$RUN/merged"
for q in "Give three tips for staying healthy." "What is the capital of France?"; do
    echo "Q: $q"; telechat chat --model "$RUN/merged" --prompt "$q" --max-new-tokens 64
    echo
done
python - "$RUN" <<'PY'
import json, sys
run = sys.argv[1]
def val(name):
    return [json.loads(x) for x in open(f"{run}/{name}/log.jsonl")][-1]["val_loss"]
print(f"held-out loss: before {val('before'):.4f}, after {val('lora'):.4f}")
PY

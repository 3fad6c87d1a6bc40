#!/usr/bin/env bash
# Long context measured as TeleChat's tutorial does (perplexity by input length per RoPE scaling, and
# passkey retrieval): the default model (trained to 8K) at 2K-32K, and a small model pre-trained here
# at 128 tokens at 1x-16x its training length. Needs ../shared (NLTK corpora). Scale with STEPS.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/long}
SHARED=${SHARED:-../shared}
STEPS=${STEPS:-600}
MODES=${MODES:-none,ntk,ntk-mscale,dynamic,yarn}
mkdir -p "$RUN"

# 1. The long text: NLTK's 59 US inaugural addresses, 1789-2021, in order (~160K tokens of the default
#    tokenizer); the training text of the small model: NLTK's other English corpora (no inaugural).
python - "$SHARED/data/corpus/en-nltk" "$RUN" <<'PY'
import json, sys, zipfile
from pathlib import Path
src, run = Path(sys.argv[1]), Path(sys.argv[2])
with zipfile.ZipFile(src / "inaugural.zip") as z:
    names = sorted(n for n in z.namelist() if n.endswith(".txt"))
    (run / "inaugural.txt").write_text("\n\n".join(z.read(n).decode("latin-1").strip() for n in names),
                                       encoding="utf-8")
with open(run / "corpus.jsonl", "w", encoding="utf-8") as out:
    for corpus in ("state_union", "brown", "webtext", "abc"):
        with zipfile.ZipFile(src / f"{corpus}.zip") as z:
            for n in sorted(z.namelist()):
                if n.endswith("/") or "README" in n or n.endswith((".csv", ".pl")):
                    continue
                text = z.read(n).decode("latin-1")
                if corpus == "brown":  # word/TAG tokens -> words
                    text = " ".join(w.rsplit("/", 1)[0] for w in text.split())
                if len(text) > 200:
                    out.write(json.dumps({"data": text}) + "\n")
PY

# 2. The default model, 2K-32K.
telechat eval --tasks longppl --long-text "$RUN/inaugural.txt" --lengths 2048,4096,8192,16384,32768 \
    --rope-scaling "$MODES" --no-progress --output "$RUN/default-ppl.json"
telechat eval --tasks passkey --lengths 4096,16384,32768 --rope-scaling none,ntk-mscale,yarn \
    --passkey-trials 3 --no-progress --output "$RUN/default-passkey.json"

# 3. A small model (4 layers, 256 wide, the default tokenizer) pre-trained at 128 tokens, then 1x-16x.
python - "$RUN" <<'PY'
import sys, telechat
run = sys.argv[1]
base = telechat.load("default", dtype="float32")
c = base.config
llm = telechat.from_preset("small", tokenizer=base.tokenizer, vocab_size=c.vocab_size, hidden_size=256, n_layer=4,
                           n_head=4, num_key_value_heads=4, ffn_hidden_size=688, training_seqlen=128, seq_length=128,
                           base_seqlen=128, rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=c.bos_token_id,
                           eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, unk_token_id=c.unk_token_id)
llm.generation_config = dict(base.generation_config)
llm.save(f"{run}/small-init")
PY
telechat data prepare --mode pretrain --input "$RUN/corpus.jsonl" --tokenizer default --max-seq-len 128 \
    --val-fraction 0.01 --num-workers 2 --output "$RUN/pt-data"
telechat train --stage pretrain --data "$RUN/pt-data" --model "$RUN/small-init" --output "$RUN/small" \
    --max-steps "$STEPS" --per-device-batch-size 32 --learning-rate 2e-3 --warmup-proportion 0.05 \
    --precision bf16 --eval-steps 100 --save-steps 0 --no-progress --overwrite
telechat eval --model "$RUN/small/$(cat "$RUN/small/latest")" --tasks longppl,passkey \
    --long-text "$RUN/inaugural.txt" --lengths 128,256,512,1024,2048 --ppl-tail 64 --rope-scaling "$MODES" \
    --passkey-trials 5 --no-progress --output "$RUN/small.json"

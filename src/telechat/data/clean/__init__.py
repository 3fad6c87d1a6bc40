"""Pre-training data cleaning on datatrove: `telechat data clean` and `telechat data build-corpus`.

`run_clean(inputs, output, config)` reads PTD jsonl / jsonl / parquet / plain text (plain, .gz,
.zst), normalises, identifies zh/en, applies Chinese and English rules, masks PII, removes exact
and near duplicates (MinHash LSH) and scores quality, writing PTD jsonl shards and a report.
"""
from .config import default_config, load_config
from .pipeline import expand_inputs, run_clean

__all__ = ["default_config", "expand_inputs", "load_config", "run_clean"]

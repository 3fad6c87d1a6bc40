"""The cleaning configuration: the shipped clean.yaml with a user's YAML merged over it."""
from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

from ..prepare import DataError

DEFAULT_CONFIG = "clean.yaml"

_CHOICES = {
    ("reader", "text_unit"): ("file", "paragraph", "line"),
    ("reader", "on_long_doc"): ("truncate", "skip"),
    ("reader", "on_bad_utf8"): ("skip", "replace"),
    ("reader", "shard_by"): ("auto", "file", "record"),
    ("executor", "start_method"): ("fork", "spawn", "forkserver"),
    ("normalize", "nfkc"): ("safe", "full", "off"),
    ("normalize", "punctuation"): ("contextual", "halfwidth", "keep"),
    ("dedup", "minhash", "zh_shingles"): ("char", "jieba"),
    ("dedup", "minhash", "en_shingles"): ("char", "word"),
    ("gopher_quality_en", "tokenizer"): ("regex", "spacy"),
    ("gopher_repetition_en", "tokenizer"): ("regex", "spacy"),
    ("output", "compression"): (None, "gzip", "zstd"),
}
# keys whose values are free-form mappings (not checked against the defaults)
_FREE = {("executor", "slurm", "sbatch_args"), ("quality", "perplexity", "cutoffs"), ("pii", "replacements")}


def _yaml():
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml is a dependency of the clean extra
        raise DataError("telechat data clean needs PyYAML: pip install pyyaml") from None
    return yaml


def default_config() -> dict:
    text = resources.files(__package__).joinpath(DEFAULT_CONFIG).read_text(encoding="utf-8")
    return _yaml().safe_load(text)


def merge(base: dict, override: dict, path: tuple = ()) -> dict:
    """`override` merged into a copy of `base`: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        where = path + (key,)
        if key not in base:
            raise DataError(f"config: unknown key {'.'.join(map(str, where))!r}")
        if isinstance(base[key], dict) and where not in _FREE:
            if not isinstance(value, dict):
                raise DataError(f"config: {'.'.join(where)} must be a mapping, got {value!r}")
            out[key] = merge(base[key], value, where)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(config: str | Path | dict | None = None, **overrides: Any) -> dict:
    """The default configuration, merged with a YAML file or a dict, then with dotted `overrides`
    ({"reader.text_field": "text"})."""
    cfg = default_config()
    if isinstance(config, (str, Path)):
        p = Path(config)
        if not p.is_file():
            raise DataError(f"{p}: config file not found")
        try:
            user = _yaml().safe_load(p.read_text(encoding="utf-8")) or {}
        except Exception as e:  # yaml.YAMLError and decoding errors
            raise DataError(f"{p}: not valid YAML ({e})") from None
        if not isinstance(user, dict):
            raise DataError(f"{p}: expected a mapping at the top level")
        cfg = merge(cfg, user)
    elif isinstance(config, dict):
        cfg = merge(cfg, config)
    for dotted, value in overrides.items():
        keys = dotted.split(".")
        nested: dict = value
        for k in reversed(keys):
            nested = {k: nested}
        cfg = merge(cfg, nested)
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    for path, choices in _CHOICES.items():
        value = cfg
        for k in path:
            value = value[k]
        if value not in choices:
            raise DataError(f"config: {'.'.join(path)} must be one of {list(choices)}, got {value!r}")
    lang = cfg["language"]
    bad = [x for x in lang["keep"] if x not in ("zh", "en")]
    if bad:
        raise DataError(f"config: language.keep may hold zh and en, got {bad}")
    tpj = cfg["executor"]["ray"]["tasks_per_job"]
    if not isinstance(tpj, int) or isinstance(tpj, bool) or tpj < 1:
        raise DataError(f"config: executor.ray.tasks_per_job must be a positive integer, got {tpj!r}")
    mh = cfg["dedup"]["minhash"]
    for k in ("num_buckets", "hashes_per_bucket", "zh_ngram", "en_ngram"):
        if not isinstance(mh[k], int) or mh[k] < 1:
            raise DataError(f"config: dedup.minhash.{k} must be a positive integer, got {mh[k]!r}")
    vj = mh.get("verify_jaccard")
    if vj is not None and (isinstance(vj, bool) or not isinstance(vj, (int, float)) or not 0 < vj <= 1):
        raise DataError(f"config: dedup.minhash.verify_jaccard must be a number in (0, 1] or null, got {vj!r}")
    ppl = cfg["quality"]["perplexity"]
    if not set(ppl["keep_buckets"]) <= {"head", "middle", "tail"}:
        raise DataError(f"config: quality.perplexity.keep_buckets may hold head, middle, tail, got {ppl['keep_buckets']}")
    q = ppl["bucket_quantiles"]
    if len(q) != 2 or not 0 < q[0] < q[1] < 1:
        raise DataError(f"config: quality.perplexity.bucket_quantiles must be two increasing numbers in (0, 1), got {q}")
    clf = cfg["quality"]["classifier"]
    if clf["keep_fraction"] is not None and not 0 < clf["keep_fraction"] <= 1:
        raise DataError(f"config: quality.classifier.keep_fraction must be in (0, 1], got {clf['keep_fraction']}")
    if clf["enabled"] and not clf["model"] and not clf["train"]["positive"]:
        raise DataError("config: quality.classifier needs a model file or train.positive/train.negative sources")
    for sec in ("rules_zh", "gopher_repetition_en"):
        for key in (("top_ngrams", "dup_ngrams") if sec == "rules_zh" else ("top_n_grams", "dup_n_grams")):
            for pair in cfg[sec][key]:
                if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], int) and pair[0] > 0):
                    raise DataError(f"config: {sec}.{key} entries must be [n, fraction], got {pair!r}")
    if cfg["reader"]["max_doc_chars"] is not None and cfg["reader"]["max_doc_chars"] < 1:
        raise DataError("config: reader.max_doc_chars must be >= 1 or null")

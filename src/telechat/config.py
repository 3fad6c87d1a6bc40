"""TeleChat model configuration, read from and written to the official `config.json` field names."""
from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

# Field aliases found in published and transformers-style configs -> our field.
_ALIASES = {
    "num_hidden_layers": "n_layer",
    "num_attention_heads": "n_head",
    "intermediate_size": "ffn_hidden_size",
    "rms_norm_eps": "layer_norm_epsilon",
}
TELECHAT_7B_VOCAB = 160256

# How rotary tables are scaled past the training length (TeleChatConfig.rope_scaling_type):
# none: plain; ntk: TeleChat's NTK base; ntk-mscale: that plus attention scaling (TeleChat's published
# code, the default); dynamic: transformers' dynamic NTK; yarn: YaRN (per-frequency interpolation).
ROPE_SCALING_TYPES = ("none", "ntk", "ntk-mscale", "dynamic", "yarn")


class RopeScaling(NamedTuple):
    """The rotary tables of one total length: frequencies of `base` (YaRN-interpolated for a
    factor > 1) with cos/sin multiplied by `mscale`."""
    base: float
    mscale: float = 1.0
    yarn_factor: float = 1.0


class ConfigError(ValueError):
    """A config.json that cannot describe a TeleChat model."""


# JSON side files of a checkpoint are small (the largest, a weight index, is ~100 KB); a bigger one is
# not what it claims to be, and reading it whole could exhaust memory.
MAX_JSON_BYTES = 64 * 1024 * 1024


def check_regular_file(path: str | Path, error: type[Exception] = ConfigError) -> os.stat_result:
    """Raise `error` unless `path` is (a link to) a regular file: a FIFO would block its reader forever,
    a device like /dev/zero never ends, a directory or a symlink loop cannot be read."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise error(f"{path}: is {kind}, not a regular file")
    return st


def read_json(path: str | Path, error: type[Exception] = ConfigError, expect: type | None = dict):
    """The JSON value of a small side file (config, index, generation config), or `error` naming the file.

    FileNotFoundError passes through, for callers with their own wording of "missing"."""
    path = Path(path)
    if not os.path.lexists(path):
        raise FileNotFoundError(path)
    st = check_regular_file(path, error)
    if st.st_size > MAX_JSON_BYTES:
        raise error(f"{path}: {st.st_size:,} bytes is too large for a JSON side file (limit {MAX_JSON_BYTES:,})")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
        value = json.loads(data.decode("utf-8"))
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise error(f"{path}: not valid JSON ({e})") from None
    if expect is not None and not isinstance(value, expect):
        raise error(f"{path}: expected a JSON {_JSON_NAMES.get(expect, expect.__name__)}, "
                    f"got {_json_type(value)}")
    return value


_JSON_NAMES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}


def _json_type(value) -> str:
    if value is None:
        return "null"
    return next((name for t, name in _JSON_NAMES.items() if type(value) is t), type(value).__name__)


def _short(value) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def check_int(name: str, value, minimum: int | None = None, optional: bool = False) -> None:
    """ConfigError unless `value` is an int (not a bool) >= minimum (or None when optional)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ConfigError(f"{name} must be an integer{bound}{' or null' if optional else ''}, got {_short(value)}")


def check_number(name: str, value, low: float | None = None, high: float | None = None,
                 low_open: bool = False, optional: bool = False) -> None:
    """ConfigError unless `value` is a finite number within [low, high] ((low, high] with low_open)."""
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        rng = "" if low is None else f" {'>' if low_open else '>='} {low}" if high is None else \
            f" in {'(' if low_open else '['}{low}, {high}]"
        raise ConfigError(f"{name} must be a finite number{rng}, got {_short(value)}")


@dataclass
class TeleChatConfig:
    vocab_size: int = 120000
    hidden_size: int = 5120
    n_layer: int = 38
    n_head: int = 32
    ffn_hidden_size: int = 12288
    layer_norm_epsilon: float = 1e-5
    training_seqlen: int = 8192
    seq_length: int = 8192
    base_seqlen: int | None = None
    tie_word_embeddings: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    embed_layernorm: bool = False
    rope_theta: float = 10000.0
    num_key_value_heads: int | None = None
    # Imported (non-TeleChat) models may carry no biases on dense/down_proj; TeleChat always does.
    bias: bool = True
    # Biases on query/key_value: not in TeleChat, but in imported Qwen2-style models.
    qkv_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 3
    unk_token_id: int | None = 0
    torch_dtype: str | None = None
    rope_scaling_type: str = "ntk-mscale"
    # Every other field of the original config.json, written back unchanged on save.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        # Types and ranges first: a zero or negative size would fail deep inside torch, or not at all.
        for name in ("vocab_size", "hidden_size", "n_layer", "n_head", "ffn_hidden_size", "training_seqlen",
                     "seq_length"):
            check_int(name, getattr(self, name), 1)
        check_int("base_seqlen", self.base_seqlen, 1, optional=True)
        check_int("num_key_value_heads", self.num_key_value_heads, 1, optional=True)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
            check_int(name, getattr(self, name), optional=True)
        check_number("layer_norm_epsilon", self.layer_norm_epsilon, 0)
        check_number("rope_theta", self.rope_theta, 0, low_open=True)
        for name in ("hidden_dropout", "attention_dropout"):
            check_number(name, getattr(self, name), 0, 1)
        for name in ("tie_word_embeddings", "embed_layernorm", "bias", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {_short(getattr(self, name))}")
        if self.rope_scaling_type not in ROPE_SCALING_TYPES:
            raise ConfigError(f"rope_scaling_type must be one of {', '.join(ROPE_SCALING_TYPES)}, "
                              f"got {_short(self.rope_scaling_type)}")
        if self.torch_dtype is not None and not isinstance(self.torch_dtype, str):
            raise ConfigError(f"torch_dtype must be a string such as \"float16\", got {_short(self.torch_dtype)}")
        if not isinstance(self.extra, dict):
            raise ConfigError(f"extra must be a dict, got {type(self.extra).__name__}")
        if self.hidden_size % self.n_head:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by n_head {self.n_head}")
        if self.n_kv_head <= 0 or self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head {self.n_head} is not divisible by num_key_value_heads {self.num_key_value_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head

    @property
    def n_kv_head(self) -> int:
        return self.num_key_value_heads or self.n_head

    @property
    def rope_base_seqlen(self) -> int:
        """B of the NTK rule: `base_seqlen`, else 4096 for the 7B family and 8192 otherwise."""
        if self.base_seqlen:
            return self.base_seqlen
        return 4096 if self.vocab_size == TELECHAT_7B_VOCAB else 8192

    def rope_scaling(self, total_len: int) -> RopeScaling:
        """The rotary scaling for a sequence whose total length (past + current) is `total_len`,
        by `rope_scaling_type`. With L = max(total_len, training_seqlen) and s = L / training_seqlen:
        ntk: base theta * alpha^(d/(d-2)), alpha = 2^ceil(log2(L / base_seqlen) + 1) - 1;
        ntk-mscale: also mscale 0.1 ln(s) + 1 for s > 1; dynamic: base theta * s^(d/(d-2));
        yarn: YaRN with factor s and mscale 0.1 ln(s) + 1; none: base theta."""
        mode, d = self.rope_scaling_type, self.head_dim
        length = max(total_len, self.training_seqlen)
        s = length / self.training_seqlen
        mscale = 0.1 * math.log(s) + 1.0 if s > 1 else 1.0
        if mode == "none":
            return RopeScaling(self.rope_theta)
        if mode == "dynamic":
            return RopeScaling(self.rope_theta * s ** (d / (d - 2)))
        if mode == "yarn":
            return RopeScaling(self.rope_theta, mscale, s)
        alpha = max(1, 2 ** math.ceil(math.log2(length / self.rope_base_seqlen) + 1) - 1)
        return RopeScaling(self.rope_theta * alpha ** (d / (d - 2)), mscale if mode == "ntk-mscale" else 1.0)

    def num_parameters(self) -> int:
        H, F, V, L = self.hidden_size, self.ffn_hidden_size, self.vocab_size, self.n_layer
        kv = 2 * self.n_kv_head * self.head_dim
        per_layer = H * H + kv * H + H * H + 3 * H * F + 2 * H + (2 * H if self.bias else 0) + \
            (H + kv if self.qkv_bias else 0)
        return V * H * (1 if self.tie_word_embeddings else 2) + L * per_layer + H

    # ---- official config.json ------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TeleChatConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"expected a JSON object, got {_json_type(d)}")
        d = dict(d)
        for alias, name in _ALIASES.items():
            if alias in d and name not in d:
                d[name] = d[alias]
        model_type = d.get("model_type", "telechat")
        if not isinstance(model_type, str) or model_type != "telechat":
            raise ConfigError(f"unknown model_type {model_type!r}: expected 'telechat'")
        own = {f.name for f in fields(cls)} - {"extra"}
        missing = [k for k in ("vocab_size", "hidden_size", "n_layer", "n_head") if d.get(k) is None]
        if missing:
            raise ConfigError(f"config is missing required field(s): {', '.join(missing)}")
        kwargs = {k: d[k] for k in own if d.get(k) is not None}
        check_int("hidden_size", d["hidden_size"], 1)
        if "ffn_hidden_size" not in d:
            kwargs["ffn_hidden_size"] = d.get("n_inner") or 4 * d["hidden_size"]
        # A config.json without tie_word_embeddings means tied (the 7B case).
        tie = d.get("tie_word_embeddings")
        kwargs["tie_word_embeddings"] = True if tie is None else tie
        if "seq_length" not in d and "training_seqlen" in d:
            kwargs["seq_length"] = d["training_seqlen"]
        if "training_seqlen" not in d:
            kwargs["training_seqlen"] = d.get("seq_length", 8192)
        if isinstance(kwargs.get("eos_token_id"), list):
            if not kwargs["eos_token_id"]:
                raise ConfigError("eos_token_id must be an integer or a non-empty list of integers, got []")
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        extra = {k: v for k, v in d.items() if k not in own and k not in _ALIASES}
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        for f in fields(self):
            if f.name in ("extra",):
                continue
            v = getattr(self, f.name)
            if f.name in ("base_seqlen", "num_key_value_heads", "torch_dtype") and v is None:
                continue
            if f.name == "rope_scaling_type" and v == "ntk-mscale":
                continue
            if f.name == "rope_theta" and v == 10000.0 and "rope_theta" not in self.extra:
                continue
            if (f.name == "bias" and v) or (f.name == "qkv_bias" and not v):
                continue
            out[f.name] = v
        out["model_type"] = "telechat"
        out.setdefault("architectures", ["TelechatForCausalLM"])
        # transformers reads these aliases (generate caches, num_parameters, ...).
        out["num_hidden_layers"] = self.n_layer
        out["num_attention_heads"] = self.n_head
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> "TeleChatConfig":
        path = Path(path)
        try:
            d = read_json(path)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json in this folder") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _preset(**kw) -> dict[str, Any]:
    return kw


# Published sizes (spec section 1) and small ones for tests and benchmarks.
PRESETS: dict[str, dict[str, Any]] = {
    "1B": _preset(vocab_size=120000, hidden_size=2048, n_layer=16, n_head=32, ffn_hidden_size=5460,
                  tie_word_embeddings=False, torch_dtype="bfloat16"),
    "7B": _preset(vocab_size=TELECHAT_7B_VOCAB, hidden_size=4096, n_layer=30, n_head=32, ffn_hidden_size=12288,
                  tie_word_embeddings=True, pad_token_id=3, bos_token_id=160132, eos_token_id=160133,
                  torch_dtype="float16"),
    "12B": _preset(vocab_size=120000, hidden_size=5120, n_layer=38, n_head=32, ffn_hidden_size=12288,
                   tie_word_embeddings=False, torch_dtype="float16"),
    "12B-V2": _preset(vocab_size=120000, hidden_size=5120, n_layer=38, n_head=32, ffn_hidden_size=12288,
                      tie_word_embeddings=False, torch_dtype="float16"),
    "tiny": _preset(vocab_size=512, hidden_size=64, n_layer=2, n_head=4, ffn_hidden_size=176,
                    training_seqlen=32, seq_length=32, base_seqlen=32, tie_word_embeddings=False),
    "small": _preset(vocab_size=4096, hidden_size=256, n_layer=4, n_head=8, ffn_hidden_size=704,
                     training_seqlen=512, seq_length=512, tie_word_embeddings=True),
    "30M": _preset(vocab_size=16000, hidden_size=512, n_layer=8, n_head=8, ffn_hidden_size=1408,
                   training_seqlen=512, seq_length=512, tie_word_embeddings=True),
    "100M": _preset(vocab_size=32000, hidden_size=768, n_layer=12, n_head=12, ffn_hidden_size=2048,
                    training_seqlen=2048, seq_length=2048, tie_word_embeddings=True),
}


def preset(name: str, **overrides) -> TeleChatConfig:
    """A named preset (`1B`, `7B`, `12B`, `12B-V2`, `tiny`, `small`, `100M`) with optional overrides."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}") from None
    d = {**base, **overrides}
    d.setdefault("training_seqlen", 8192)
    d.setdefault("seq_length", d["training_seqlen"])
    return TeleChatConfig(**d)

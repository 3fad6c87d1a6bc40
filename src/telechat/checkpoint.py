"""Reading and writing checkpoints in the official TeleChat layout.

Keys are the published ones, with or without the `transformer.` prefix (the 7B drops it);
shards are `pytorch_model*.bin` (+ index) or `model*.safetensors` (+ index).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError, TeleChatConfig
from .model import TeleChat

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
# Buffers some published checkpoints carry that are recomputed, not loaded.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded as asked; the message names the problem."""


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return None if dtype == "auto" else dtype
    try:
        return DTYPES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_internal_key(key: str) -> str:
    """Official key (with or without `transformer.`) -> our state_dict key."""
    if key.startswith("transformer.") or key.startswith("lm_head."):
        return key
    return "transformer." + key


def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint folder, in index order."""
    # Safetensors first: a folder saved over an official .bin checkpoint holds both.
    for index_name in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index_name == "model.safetensors" and index.exists():
            return [index]
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: unreadable weight index ({e!r})") from None
            files = list(dict.fromkeys(weight_map.values()))
            missing = [f for f in files if not (path / f).exists()]
            if missing:
                raise CheckpointError(f"{index}: shard file(s) missing from {path}: {', '.join(missing)}")
            return [path / f for f in files]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return [path / name]
    found = sorted(p.name for p in path.glob("*.safetensors")) + sorted(p.name for p in path.glob("*.bin"))
    if found:
        return [path / f for f in found]
    raise CheckpointError(f"{path}: no weights found (expected model.safetensors, pytorch_model.bin or an index)")


def iter_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of one weight file; a shard is read lazily and dropped when done."""
    try:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
            return
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except CheckpointError:
        raise
    except Exception as e:  # truncated, corrupt, or not a weights file at all
        raise CheckpointError(f"{file}: unreadable or truncated weight file ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{file}: expected a state dict, found {type(sd).__name__}")
    for key in list(sd):
        yield key, sd.pop(key)


def lazy_tensors(path: Path) -> dict[str, Callable[[], torch.Tensor]]:
    """Our key -> a loader of that tensor alone, to read a checkpoint a few tensors at a time.

    Safetensors and zip-format .bin shards are memory-mapped; a legacy .bin shard is read whole."""
    out: dict[str, Callable[[], torch.Tensor]] = {}
    for file in weight_files(path):
        try:
            if file.suffix == ".safetensors":
                handle = safe_open(str(file), framework="pt")
                keys, get = list(handle.keys()), handle.get_tensor
            else:
                try:
                    sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:
                    if "mmap" not in str(e):
                        raise
                    sd = torch.load(file, map_location="cpu", weights_only=True)
                if not isinstance(sd, dict):
                    raise CheckpointError(f"{file}: expected a state dict, found {type(sd).__name__}")
                keys, get = list(sd), sd.__getitem__
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{file}: unreadable or truncated weight file ({type(e).__name__}: {e})") from None
        for key in keys:
            if not key.endswith(_IGNORED_SUFFIXES):
                out[to_internal_key(key)] = functools.partial(get, key)
    return out


def _first_float_dtype(files: list[Path]) -> torch.dtype:
    f = files[0]
    if f.suffix == ".safetensors":
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                dt = parse_dtype({"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(
                    sf.get_slice(key).get_dtype(), None))
                if dt is not None:
                    return dt
    else:
        for _, t in iter_tensors(f):
            if t.is_floating_point():
                return t.dtype
    return torch.float32


@contextlib.contextmanager
def _skip_init():
    """Construct modules without running their random init (the weights are about to be loaded).

    On the meta device the init ops would also pull in torch._dynamo (~70 MB, ~1 s) for nothing.
    """
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def load_model(path: str | Path, device="cpu", dtype=None, config: TeleChatConfig | None = None) -> TeleChat:
    """Build the model of a checkpoint folder and fill it shard by shard (peak memory ~ model + one shard)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    try:
        config = config or TeleChatConfig.from_json(path / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    files = weight_files(path)
    dtype = parse_dtype(dtype) or parse_dtype(config.torch_dtype) or _first_float_dtype(files)
    with torch.device("meta"), _skip_init():
        model = TeleChat(config)
    model = model.to(dtype=dtype)  # still on meta: shapes only, no memory
    quant = _quantization(path, model)
    # A quantized model run in fp32 on CPU keeps its embedding and lm_head at the checkpoint's 16 bits:
    # half the memory, and the lm_head's decode matmul reads half the bytes (exact: fp32 holds them).
    keep_16bit = {"transformer.word_embeddings.weight", "lm_head.weight"} \
        if quant is not None and dtype == torch.float32 and torch.device(device).type == "cpu" else set()
    params = model.state_dict(keep_vars=True)
    if config.tie_word_embeddings:
        params.pop("lm_head.weight")
    seen: set[str] = set()
    unexpected: list[str] = []
    for file in files:
        for key, tensor in iter_tensors(file):
            name = to_internal_key(key)
            if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and config.tie_word_embeddings):
                continue
            target = params.get(name)
            if target is None:
                if quant is not None and quant.ignorable(model, name, tensor):
                    continue
                unexpected.append(f"{key} ({file.name})")
                continue
            if tuple(target.shape) != tuple(tensor.shape):
                raise CheckpointError(f"{file}: shape mismatch for {key}: expected {tuple(target.shape)} "
                                      f"from config.json, found {tuple(tensor.shape)}")
            # The loaded tensor becomes the parameter: peak memory is the model plus one tensor.
            # (Quantized layers' buffers keep their own dtypes: int32 codes, fp16 scales.)
            keep = name in keep_16bit and tensor.dtype in (torch.float16, torch.bfloat16)
            t = tensor.to(device=device, dtype=tensor.dtype if keep else target.dtype)
            if t is tensor and file.suffix != ".safetensors":
                t = t.clone()  # detach from the memory-mapped .bin shard
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            if attr in module._buffers:
                module._buffers[attr] = t
            else:
                setattr(module, attr, torch.nn.Parameter(t))
            seen.add(name)
    missing = [k for k in params if k not in seen]
    if missing or unexpected:
        msg = [f"{path}: checkpoint does not match config.json"]
        if missing:
            msg.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        raise CheckpointError("; ".join(msg))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.transformer.word_embeddings.weight
    config.torch_dtype = dtype_name(dtype)
    if quant is not None:
        quant.use_kernel(model)
    return model.eval()


def _quantization(path: Path, model: TeleChat):
    """For a GPTQ folder: swap the model's projections for QuantLinear layers (on meta) and return
    the `telechat.quant` module; None for a float checkpoint."""
    from . import quant

    try:
        qcfg = quant.read_quant_config(path)
        if qcfg is None:
            return None
        quant.quantize_modules(model, qcfg)
    except quant.QuantError as e:
        raise CheckpointError(str(e)) from None
    model.config.extra["quantization_config"] = qcfg.to_hf()
    return quant


def _listing(keys: list[str], limit: int = 12) -> str:
    return ", ".join(keys[:limit]) + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


def save_model(model: TeleChat, path: str | Path, max_shard_bytes: int = 2 * 1024**3) -> list[Path]:
    """Write safetensors shards (+ index when several) and config.json in the official key layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t.detach().to("cpu").contiguous()
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for stale in list(path.glob("model*.safetensors")) + [path / "model.safetensors.index.json"]:
        if stale.exists() and stale.name not in names:
            stale.unlink()
    for name, shard in zip(names, shards):
        tmp = path / (name + ".tmp")
        save_file(shard, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path / name)
    if n > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    model.config.torch_dtype = dtype_name(next(iter(sd.values())).dtype)
    model.config.save(path / "config.json")
    if "quantization_config" in model.config.extra:  # a GPTQ model: AutoGPTQ's own config file too
        from .quant import QuantConfig, write_quant_config

        write_quant_config(path, QuantConfig.from_dict(model.config.extra["quantization_config"], str(path)))
    return [path / name for name in names]

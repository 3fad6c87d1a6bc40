"""Reading and writing checkpoints in the official TeleChat layout.

Keys are the published ones, with or without the `transformer.` prefix (the 7B drops it);
shards are `pytorch_model*.bin` (+ index) or `model*.safetensors` (+ index).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError, TeleChatConfig, check_regular_file, read_json
from .model import TeleChat

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
# Buffers some published checkpoints carry that are recomputed, not loaded.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# The files of a folder that loading opens: each must be a regular file when present.
FOLDER_FILES = ("config.json", "generation_config.json", "quantize_config.json", "model.safetensors.index.json",
                "pytorch_model.bin.index.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "specail_tokens_map.json")
_LAYER_KEY = re.compile(r"^(?:transformer\.)?h\.(\d+)\.")


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
    """The weight files of a checkpoint folder, in index order (each checked to be a regular file)."""
    files, _ = _weights_and_index(path)
    return files


def _weights_and_index(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    # Safetensors first: a folder saved over an official .bin checkpoint holds both.
    for index_name in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index_name == "model.safetensors" and os.path.lexists(index):
            return [_regular(index)], None
        if os.path.lexists(index):
            weight_map = _read_index(index)
            files = list(dict.fromkeys(weight_map.values()))
            missing = [f for f in files if not os.path.lexists(path / f)]
            if missing:
                raise CheckpointError(f"{index}: shard file(s) missing from {path}: {', '.join(missing)}")
            return [_regular(path / f) for f in files], weight_map
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.lexists(path / name):
            return [_regular(path / name)], None
    found = sorted(p.name for p in path.glob("*.safetensors")) + sorted(p.name for p in path.glob("*.bin"))
    if found:
        return [_regular(path / f) for f in found], None
    raise CheckpointError(f"{path}: no weights found (expected model.safetensors, pytorch_model.bin or an index)")


def _regular(file: Path) -> Path:
    check_regular_file(file, CheckpointError)
    return file


def _read_index(index: Path) -> dict[str, str]:
    try:
        d = read_json(index, CheckpointError)
    except FileNotFoundError:
        raise CheckpointError(f"{index}: cannot be read (dangling link)") from None
    weight_map = d.get("weight_map")
    if not isinstance(weight_map, dict):
        got = "nothing" if weight_map is None else type(weight_map).__name__
        raise CheckpointError(f"{index}: unreadable weight index (\"weight_map\" must be an object of "
                              f"tensor name -> shard file, got {got})")
    for key, name in weight_map.items():
        # A shard is a file of this folder: no paths, which could point anywhere on the machine.
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
            raise CheckpointError(f"{index}: weight_map[{key!r}] must be a shard file name in this folder, "
                                  f"got {name!r}")
    return weight_map


def weight_keys(path: Path) -> list[str] | None:
    """The tensor names of a checkpoint folder, read from its index or safetensors headers without
    loading any tensor; None when only reading the (.bin) weights would tell."""
    files, weight_map = _weights_and_index(path)
    if weight_map is not None:
        return list(weight_map)
    if not all(f.suffix == ".safetensors" for f in files):
        return None
    keys: list[str] = []
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                keys += list(sf.keys())
        except Exception as e:
            raise CheckpointError(f"{f}: unreadable or truncated weight file ({type(e).__name__}: {e})") from None
    return keys


def check_layer_count(config: TeleChatConfig, keys, source: Path) -> None:
    """A config.json asking for more layers than the weights hold is refused before the model is built
    (building a billion empty layers would never end)."""
    layers = {int(m.group(1)) for k in keys if (m := _LAYER_KEY.match(k))}
    found = max(layers) + 1 if layers else 0
    if config.n_layer > found:
        raise CheckpointError(f"{source / 'config.json'}: n_layer is {config.n_layer} but the weights hold "
                              f"{found} layer(s)")


def parameter_bytes(config: TeleChatConfig, dtype: torch.dtype, bits: int | None = None) -> int:
    """Bytes of a model's parameters in `dtype`, the blocks' linear layers at `bits` when quantized."""
    size = torch.tensor([], dtype=dtype).element_size()
    total = config.num_parameters()
    if bits is None:
        return total * size
    H, F = config.hidden_size, config.ffn_hidden_size
    linear = config.n_layer * (2 * H * H + 2 * config.n_kv_head * config.head_dim * H + 3 * H * F)
    return (total - linear) * size + linear * bits // 8


def available_memory(device) -> int | None:
    """Bytes that a new allocation on `device` may take (None when unknown): free GPU memory, or on
    CPU MemAvailable plus free swap, capped by a cgroup limit."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except Exception:
            return None
    if device.type != "cpu":
        return None
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        avail = (int(info["MemAvailable"].split()[0]) + int(info.get("SwapFree", "0 kB").split()[0])) * 1024
    except (OSError, KeyError, ValueError):
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return avail


def check_memory(config: TeleChatConfig, dtype: torch.dtype, device, source: Path, bits: int | None = None) -> None:
    """Refuse, before allocating anything, a model whose parameters alone exceed the memory available.

    TELECHAT_NO_MEMORY_CHECK=1 skips this (e.g. when memory will be freed by others meanwhile)."""
    if os.environ.get("TELECHAT_NO_MEMORY_CHECK") == "1":
        return
    need = parameter_bytes(config, dtype, bits)
    avail = available_memory(device)
    if avail is not None and need > avail:
        raise CheckpointError(
            f"{source / 'config.json'}: the model it describes (n_layer={config.n_layer}, "
            f"hidden_size={config.hidden_size}, vocab_size={config.vocab_size}) needs {need / 2**30:,.1f} GiB "
            f"for its parameters in {dtype_name(dtype)}, more than the {avail / 2**30:,.1f} GiB of memory "
            f"available on {torch.device(device)} (TELECHAT_NO_MEMORY_CHECK=1 skips this check)")


def check_folder_files(path: Path) -> None:
    """Every file loading will open exists as a regular file (or not at all): never a FIFO, device,
    directory or symlink loop, which would hang the reader or fail deep inside a library."""
    for name in FOLDER_FILES:
        if os.path.lexists(path / name):
            check_regular_file(path / name, CheckpointError)


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
    check_folder_files(path)
    try:
        config = config or TeleChatConfig.from_json(path / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    files = weight_files(path)
    keys = weight_keys(path)
    if keys is not None:
        check_layer_count(config, keys, path)
    try:
        config_dtype = parse_dtype(config.torch_dtype)
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: torch_dtype: {e}") from None
    qcfg = _quant_config(path)
    if isinstance(dtype, str) and dtype == "auto":  # this machine's best; a quantized model keeps its format
        from .device import resolve_dtype

        dtype = None if qcfg is not None else resolve_dtype("auto", torch.device(device))
    dtype = parse_dtype(dtype) or config_dtype or _first_float_dtype(files)
    check_memory(config, dtype, device, path, bits=qcfg.bits if qcfg is not None else None)
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
            if target.is_floating_point() != tensor.is_floating_point() or \
                    (not target.is_floating_point() and target.dtype != tensor.dtype):
                want = "a floating-point tensor" if target.is_floating_point() else dtype_name(target.dtype)
                raise CheckpointError(f"{file}: {key} has dtype {dtype_name(tensor.dtype)}, expected {want}")
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
    from .linear import swap_linears

    return swap_linears(model).eval()  # decode-speed kernels; a 16-bit lm_head under fp32 compute


def _quantization(path: Path, model: TeleChat):
    """For a GPTQ folder: swap the model's projections for QuantLinear layers (on meta) and return
    the `telechat.quant` module; None for a float checkpoint."""
    from . import quant

    try:
        qcfg = _quant_config(path)
        if qcfg is None:
            return None
        quant.quantize_modules(model, qcfg)
    except quant.QuantError as e:
        raise CheckpointError(str(e)) from None
    model.config.extra["quantization_config"] = qcfg.to_hf()
    return quant


def _quant_config(path: Path):
    from . import quant

    try:
        return quant.read_quant_config(path)
    except quant.QuantError as e:
        raise CheckpointError(str(e)) from None


def _listing(keys: list[str], limit: int = 12) -> str:
    return ", ".join(keys[:limit]) + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


# ---- temporary files and folders ----------------------------------------------------------------------
# A killed write leaves its temporary behind. Its name says who made it, so the next run can tell a
# dead owner's leftovers (removed) from a running writer's work (kept).
_TEMP = re.compile(r"^\.(?P<name>.+)\.telechat-tmp\.(?P<pid>\d+)\.(?P<start>\d+)\.[0-9a-f]{8}\.(?P<host>[^/]+)$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), 0 where /proc does not tell, None
    when there is no such process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[19])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return 0


def temp_name(name: str) -> str:
    """A hidden name beside `name` that records this process (host, pid, start time)."""
    start = _start_time(os.getpid()) or 0
    return f".{name}.telechat-tmp.{os.getpid()}.{start}.{secrets.token_hex(4)}.{_host()}"


def is_stale_temp(entry: Path) -> bool:
    """A temporary of ours whose owner is gone (a dead pid, or a reused one with another start time).
    Another host's temporaries are never judged."""
    m = _TEMP.match(entry.name)
    if m is None or m["host"] != _host():
        return False
    start = _start_time(int(m["pid"]))
    return start is None or (start != 0 and int(m["start"]) != 0 and start != int(m["start"]))


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporaries that killed runs left in `folder`; returns what was removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        if is_stale_temp(entry):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()
            removed.append(entry)
    return removed


def make_temp_dir(parent: Path, name: str) -> Path:
    """A new temporary folder for `name` in `parent`, with the modes `mkdir` gives (the umask's), unlike
    mkdtemp's 0700, since it becomes the output."""
    while True:
        tmp = Path(parent) / temp_name(name)
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells (/proc), else by setting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_tensors(tensors: dict[str, torch.Tensor], file: str | Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with the file mode a plain open() gives (safetensors writes 0600)."""
    save_file(tensors, str(file), metadata=metadata)
    os.chmod(file, 0o666 & ~current_umask())


def save_model(model: TeleChat, path: str | Path, max_shard_bytes: int = 2 * 1024**3) -> list[Path]:
    """Write safetensors shards (+ index when several) and config.json in the official key layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
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
        tmp = path / temp_name(name)
        try:
            save_tensors(shard, tmp, metadata={"format": "pt"})
            os.replace(tmp, path / name)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
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

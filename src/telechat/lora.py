"""LoRA adapters on PEFT: add them to a model, save and load them in PEFT's format, merge them.

The adapter folder is PEFT's own (`adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.<module>.lora_A.weight`), so `peft.PeftModel.from_pretrained` loads it over the
transformers model of the base folder (`AutoModelForCausalLM`, trust_remote_code), whose module names
are ours. The flags follow TeleChat's fine-tuning scripts (DeepSpeed-Chat's LoRA):

  --lora-dim R            the rank
  --lora-scaling S        the update is (S / R) * B @ A, so PEFT's lora_alpha is S
  --lora-module-name P    comma-separated substrings of the module names that get LoRA
  --only-optimize-lora    train the LoRA matrices alone (else the rest of the model trains too,
                          all but the weights LoRA wraps, as in TeleChat's scripts)

A GPTQ base (`telechat quantize`) stays quantized (QLoRA): its layers get a LoRA wrapper whose
frozen matmul keeps no dequantized weight for the backward pass (it dequantizes again there).
"""
from __future__ import annotations

import contextlib
import json
import math
import warnings
from pathlib import Path

import torch
from torch import nn

DEFAULT_MODULES = "self_attention.,mlp."  # every attention and MLP projection
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_ADAPTER = "default"  # PEFT's adapter name inside the model; not part of the saved keys


class AdapterError(ValueError):
    """A LoRA adapter folder or option that cannot be used; the message names the file and field."""


def is_adapter_folder(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def _lora_classes():
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """The layers LoRA may wrap: the linear and GPTQ projections inside the blocks."""
    from .quant import QuantLinear

    return {n: m for n, m in model.named_modules()
            if n.startswith("transformer.h.") and isinstance(m, (nn.Linear, QuantLinear))}


def target_modules(model: nn.Module, pattern: str) -> list[str]:
    """Full names of the block projections whose name contains one of the comma-separated parts."""
    parts = [p.strip() for p in pattern.split(",") if p.strip()]
    if not parts:
        raise AdapterError(f"--lora-module-name {pattern!r}: give one or more comma-separated parts of module "
                           f"names, e.g. {DEFAULT_MODULES}")
    names = [n for n in _candidates(model) if any(p in n for p in parts)]
    if not names:
        example = ", ".join(list(_candidates(model))[:4])
        raise AdapterError(f"--lora-module-name {pattern!r} matches none of the model's projections (e.g. {example})")
    return names


def lora_config(names: list[str], r: int, scaling: float, base: str | None = None):
    from peft import LoraConfig

    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterError(f"--lora-dim must be an integer >= 1, got {r!r}")
    if not (isinstance(scaling, (int, float)) and 0 < scaling < math.inf):
        raise AdapterError(f"--lora-scaling must be a finite number > 0, got {scaling!r}")
    # exact module names: PEFT matches a list entry against the end of each name
    return LoraConfig(r=r, lora_alpha=float(scaling), target_modules=list(names), lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM", base_model_name_or_path=base)


# ---- QLoRA: LoRA beside a frozen GPTQ layer --------------------------------------------------------
class FrozenQuantMatmul(torch.autograd.Function):
    """y = layer(x) for a GPTQ layer that never trains: the backward dequantizes the weight again
    instead of keeping it (a kept fp32 copy per layer would cost more than the unquantized model)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        with torch.no_grad():
            return layer(x)

    @staticmethod
    def backward(ctx, grad):
        w = ctx.layer.dequantize(torch.float32)  # [N, K], the layer's own column order
        return (grad.float() @ w).to(grad.dtype), None


def quant_lora_class():
    """PEFT's LoRA layer for telechat's QuantLinear (registered as a custom module)."""
    from peft.tuners.lora import LoraLayer

    class QuantLoraLinear(nn.Module, LoraLayer):
        def __init__(self, base_layer, adapter_name, config, r=0, lora_alpha=1, **kwargs):
            super().__init__()
            with warnings.catch_warnings():  # PEFT warns about any layer type it does not know
                warnings.simplefilter("ignore")
                LoraLayer.__init__(self, base_layer)
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)
            device = base_layer.g_idx.device
            for name in ("lora_A", "lora_B"):
                getattr(self, name).to(device)

        def forward(self, x):
            base = self.get_base_layer()
            y = FrozenQuantMatmul.apply(x, base) if torch.is_grad_enabled() and x.requires_grad else base(x)
            if self.disable_adapters:
                return y
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                a, b = self.lora_A[name], self.lora_B[name]
                y = y + (b(a(self.lora_dropout[name](x.to(a.weight.dtype)))) * self.scaling[name]).to(y.dtype)
            return y

    return QuantLoraLinear


@contextlib.contextmanager
def _device_hint(model: nn.Module):
    """PEFT places new LoRA matrices on the device of a layer's `qweight` (or first parameter); a GPTQ
    layer in its rows layout has neither, so it shows its codes under that name while PEFT looks."""
    from .quant import QuantLinear

    shown = [m for m in model.modules() if isinstance(m, QuantLinear) and "qweight" not in m._buffers
             and "qweight" not in m.__dict__]
    for m in shown:
        m.__dict__["qweight"] = m.qrows
    try:
        yield
    finally:
        for m in shown:
            m.__dict__.pop("qweight", None)


# ---- adding, saving, loading ---------------------------------------------------------------------
def add_lora(model: nn.Module, r: int, scaling: float = 1.0, pattern: str = DEFAULT_MODULES,
             only_lora: bool = False, base: str | None = None):
    """Wrap the matching projections with LoRA (B = 0: the model computes what it did); returns the
    LoraConfig. only_lora: nothing else trains; else everything but the wrapped weights does."""
    from peft import inject_adapter_in_model

    from .quant import QuantLinear

    config = lora_config(target_modules(model, pattern), r, scaling, base)
    names = set(config.target_modules)
    quantized = any(isinstance(m, QuantLinear) for n, m in _candidates(model).items() if n in names)
    if quantized:
        config._register_custom_module({QuantLinear: quant_lora_class()})
    with warnings.catch_warnings(), _device_hint(model):
        warnings.simplefilter("ignore")
        inject_adapter_in_model(config, model)
    if quantized:  # PEFT's custom-module path keeps the config's mapping; the saved file must not hold it
        config._custom_modules = None
    if not only_lora:
        wrapped = {id(layer.get_base_layer().weight) for layer in lora_layers(model)
                   if isinstance(getattr(layer.get_base_layer(), "weight", None), torch.Tensor)}
        for p in model.parameters():
            if id(p) not in wrapped and p.is_floating_point():
                p.requires_grad_(True)
    return config


def lora_layers(model: nn.Module) -> list[nn.Module]:
    LoraLayer = _lora_classes()
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA matrices under PEFT's saved key names."""
    out = {}
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            out[_PREFIX + name.replace(f".{_ADAPTER}.", ".")] = p.detach()
    return out


def save_adapter(model: nn.Module, config, folder: str | Path) -> Path:
    """Write PEFT's adapter folder (the config and the LoRA matrices in safetensors)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    save_file(sd, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config.save_pretrained(str(folder))
    return folder


def read_adapter_config(folder: str | Path):
    """PEFT's LoraConfig from `folder`, with the problem named when it cannot be used."""
    from peft import LoraConfig

    folder = Path(folder)
    f = folder / ADAPTER_CONFIG
    if not folder.exists():
        raise AdapterError(f"--adapter {folder}: no such folder")
    if not folder.is_dir():
        raise AdapterError(f"--adapter {folder}: not a folder (give the folder holding {ADAPTER_CONFIG})")
    if not f.is_file():
        raise AdapterError(f"{folder}: no {ADAPTER_CONFIG} (not a LoRA adapter folder: written by `telechat train "
                           "--lora-dim` or PEFT's save_pretrained)")
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AdapterError(f"{f}: not readable JSON ({e})") from None
    if not isinstance(d, dict):
        raise AdapterError(f"{f}: expected a JSON object, got {type(d).__name__}")
    if d.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{f}: peft_type is {d.get('peft_type')!r}; only LORA adapters are supported")
    r, alpha, targets = d.get("r"), d.get("lora_alpha"), d.get("target_modules")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterError(f"{f}: field 'r' must be an integer >= 1, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha < math.inf:
        raise AdapterError(f"{f}: field 'lora_alpha' must be a number > 0, got {alpha!r}")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets
                                         and all(isinstance(t, str) for t in targets))):
        raise AdapterError(f"{f}: field 'target_modules' must be a module-name regex or a list of names, "
                           f"got {targets!r:.80}")
    for key in ("use_dora", "use_rslora"):
        if d.get(key):
            raise AdapterError(f"{f}: {key} adapters are not supported")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{folder}: no {ADAPTER_WEIGHTS} beside {ADAPTER_CONFIG}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return LoraConfig.from_pretrained(str(folder))
        except (TypeError, ValueError) as e:
            raise AdapterError(f"{f}: not a valid LoRA config ({e})") from None


def load_adapter_weights(model: nn.Module, folder: str | Path) -> None:
    """Copy the saved LoRA matrices into a model that already carries the same adapter layout."""
    from safetensors import SafetensorError, safe_open

    f = Path(folder) / ADAPTER_WEIGHTS
    own = dict(model.named_parameters())
    expected = {_PREFIX + n.replace(f".{_ADAPTER}.", "."): p for n, p in own.items()
                if ".lora_A." in n or ".lora_B." in n}
    try:
        with safe_open(str(f), framework="pt") as sf:
            keys = set(sf.keys())
            missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
            if missing or extra:
                what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
                raise AdapterError(f"{f}: does not fit this model ({what}; {len(missing)} missing, {len(extra)} "
                                   "unexpected): trained for another base model?")
            with torch.no_grad():
                for k, p in expected.items():
                    t = sf.get_tensor(k)
                    if tuple(t.shape) != tuple(p.shape):
                        raise AdapterError(f"{f}: {k} has shape {list(t.shape)}, this model needs {list(p.shape)} "
                                           "(trained for another base model?)")
                    if not torch.isfinite(t).all():
                        raise AdapterError(f"{f}: {k} holds NaN or Inf values")
                    p.copy_(t.to(p.dtype))
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{f}: not a readable safetensors file ({e})") from None


def load_adapter(model: nn.Module, folder: str | Path):
    """Add the adapter of `folder` to `model` (frozen, for inference) and fill it; returns its config."""
    from peft import inject_adapter_in_model

    from .quant import QuantLinear

    config = read_adapter_config(folder)
    if any(isinstance(m, QuantLinear) for m in _candidates(model).values()):
        config._register_custom_module({QuantLinear: quant_lora_class()})
    with warnings.catch_warnings(), _device_hint(model):
        warnings.simplefilter("ignore")
        try:
            inject_adapter_in_model(config, model)
        except ValueError as e:  # target modules not found in the model
            raise AdapterError(f"{Path(folder) / ADAPTER_CONFIG}: does not fit this model ({e})") from None
    config._custom_modules = None
    load_adapter_weights(model, folder)
    for p in model.parameters():
        p.requires_grad_(False)
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):  # the model's compute dtype (PEFT makes the matrices fp32)
        for layer in lora_layers(model):
            layer.lora_A.to(dtype)
            layer.lora_B.to(dtype)
    return config


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its weight (W += scaling * B @ A, in fp32) and unwrap the layers;
    returns how many were merged. A GPTQ layer cannot take the update: an AdapterError."""
    from .quant import QuantLinear

    n = 0
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, _lora_classes())]:
        base = layer.get_base_layer()
        if isinstance(base, QuantLinear):
            raise AdapterError(f"{name} is a GPTQ layer: a LoRA update cannot be merged into quantized weights "
                               "(merge into the float model, then quantize the result)")
        with torch.no_grad():
            delta = torch.zeros(base.weight.shape, dtype=torch.float32, device=base.weight.device)
            for a in layer.active_adapters:
                if a in layer.lora_A:
                    delta += (layer.lora_B[a].weight.float() @ layer.lora_A[a].weight.float()) * layer.scaling[a]
            base.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, base)
        n += 1
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(model, attr):
            delattr(model, attr)
    return n


@contextlib.contextmanager
def unwrapped(model: nn.Module):
    """Within the block the model holds its base layers where LoRA wraps them (its state_dict has the
    official key names: to save or load the base weights), LoRA layers back afterwards."""
    swaps = [(n, m) for n, m in model.named_modules() if isinstance(m, _lora_classes())]
    try:
        for name, layer in swaps:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, layer.get_base_layer())
        yield model
    finally:
        for name, layer in swaps:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, layer)


# ---- whole models ----------------------------------------------------------------------------------
def check_adapter_for(base: str | Path, adapter: str | Path):
    """The adapter's config, checked before the base loads: a readable LoRA adapter folder, and not one
    that carries trained base weights of its own (trained without --only-optimize-lora) over another base."""
    config = read_adapter_config(adapter)
    adapter, base = Path(adapter), Path(base)
    if (adapter / "config.json").exists() and base.resolve() != adapter.resolve():
        raise AdapterError(f"{adapter} holds trained base weights beside the adapter (trained without "
                           f"--only-optimize-lora): use it as the base too (--model {adapter}), not {base}")
    return config


def apply_adapter(llm, folder: str | Path, merge: bool | None = None):
    """`llm` with the adapter of `folder` applied, for chat and serve: merged into the weights (no cost
    per token) for a float model, kept beside the layers of a GPTQ model. Returns `llm`."""
    from .quant import quantized_layers

    load_adapter(llm.model, folder)
    if merge is None:
        merge = not quantized_layers(llm.model)
    if merge:
        merge_lora(llm.model)
    llm.model.eval()
    return llm


def merge(model: str | Path, adapter: str | Path, output: str | Path) -> Path:
    """base + adapter -> an official-layout folder with the merged weights (`telechat.load` reads it)."""
    from .llm import load

    from .default_model import resolve_model

    read_adapter_config(adapter)  # a bad adapter fails before the base is loaded
    base = Path(resolve_model(model))
    check_adapter_for(base, adapter)
    llm = load(base)
    dtype = llm.dtype
    load_adapter(llm.model, adapter)
    merge_lora(llm.model)
    if llm.model.dtype != dtype:
        llm.model.to(dtype)
    out = Path(output)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").exists())):
        raise AdapterError(f"--output {out} exists and is not an empty folder or a checkpoint folder")
    return llm.save(out)


def trainable_summary(model: nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{n / 1e6:.2f}M of {total / 1e6:.1f}M parameters train ({100 * n / max(total, 1):.2f}%)"


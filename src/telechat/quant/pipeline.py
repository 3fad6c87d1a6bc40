"""`telechat quantize`: a float checkpoint -> a GPTQ (or round-to-nearest) checkpoint, block by block.

The calibration tokens are embedded once; then each block is read from the checkpoint files alone,
its layers are quantized in the published order (each group's Hessian comes from inputs that
already went through the quantized groups before it), and the block's outputs, computed with its
quantized weights, become the next block's inputs. Memory: one float block, the calibration
activations, and the quantized model being built; the float model is never whole in memory.
"""
from __future__ import annotations

import gc
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoint import (CheckpointError, _skip_init, check_folder_files, check_layer_count, check_memory,
                          lazy_tensors, parse_dtype)
from ..config import ConfigError, TeleChatConfig
from ..default_model import resolve_model
from ..model import Block, RMSNorm, TeleChat
from ..rope import rope_cos_sin
from .calib import calibration_samples
from .format import MODULE_ORDER, QUANTIZED_MODULES, SINK_WEIGHTED_MODULES, QuantConfig, QuantError, read_quant_config
from .gptq import HessianCollector, gptq, rtn
from .linear import QuantLinear, quantize_modules


def quantize(model: str | Path, output: str | Path, qcfg: QuantConfig, calib: str | Path | None = None,
             calib_samples: int = 128, calib_seq_len: int = 512, dtype: str | torch.dtype = "float16",
             device: str = "cpu", batch_size: int = 8, seed: int = 0, progress: bool = True) -> Path:
    """Quantize the checkpoint `model` (a folder or "default") into the folder `output`.

    Every check (settings, layer widths, checkpoint keys, calibration text, output folder) runs
    before the first block is read. `dtype` is that of the tensors left in floating point
    (embeddings, norms, lm_head, biases); fp16 as published.
    """
    from ..convert import _atomic_folder
    from ..llm import LLM, _read_generation_config, default_generation_config
    from ..tokenizer import has_tokenizer, load_tokenizer

    src = resolve_model(model)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a checkpoint folder")
    check_folder_files(src)
    try:
        config = TeleChatConfig.from_json(src / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if read_quant_config(src) is not None:
        raise QuantError(f"{src}: is already quantized; quantize its float checkpoint")
    out_dtype = parse_dtype(dtype) or torch.float16
    if batch_size < 1:
        raise QuantError(f"batch_size must be >= 1, got {batch_size}")
    tensors = lazy_tensors(src)
    check_layer_count(config, tensors, src)  # before building the (meta) model it describes
    check_memory(config, out_dtype, "cpu", src, bits=qcfg.bits)  # the quantized model is built on CPU

    with torch.device("meta"), _skip_init():
        out = TeleChat(config)
    expected = [k for k in out.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")]
    out = out.to(dtype=out_dtype)
    quantize_modules(out, qcfg)  # raises on a layer width the settings cannot store
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise CheckpointError(f"{src}: checkpoint lacks {len(missing)} tensor(s) config.json implies: "
                              f"{', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''}")
    tokenizer = load_tokenizer(src) if has_tokenizer(src) else None
    ids = None
    if qcfg.method == "gptq":
        if calib is None:
            raise QuantError("GPTQ needs calibration text: pass --calib FILE_OR_DIR (or use --method rtn)")
        if tokenizer is None:
            raise QuantError(f"{src}: has no tokenizer files, needed to tokenize the calibration text")
        if calib_seq_len > config.seq_length:
            raise QuantError(f"--calib-seq-len {calib_seq_len} is longer than the model's context {config.seq_length}")
        ids = calibration_samples(tokenizer, calib, calib_samples, calib_seq_len, seed)
    gen = default_generation_config(config, tokenizer)
    gen.update(_read_generation_config(src) or {})

    output = Path(output)
    with _atomic_folder(output) as tmp, torch.inference_mode():
        _fill_outside_blocks(out, tensors, out_dtype)
        _quantize_blocks(out, tensors, qcfg, ids, out_dtype, torch.device(device), batch_size, progress)
        out.config.extra["quantization_config"] = qcfg.to_hf()
        LLM(out.eval(), tokenizer, gen).save(tmp)
    return output


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(tensor, requires_grad=False))


def _fill_outside_blocks(out: TeleChat, tensors: dict, dtype: torch.dtype) -> None:
    """Embeddings, final norm and an untied lm_head: copied in `dtype`."""
    for name, _ in list(out.named_parameters()):
        if not name.startswith("transformer.h."):
            _assign(out, name, tensors[name]().to(dtype=dtype).clone())
    if out.config.tie_word_embeddings:
        out.lm_head.weight = out.transformer.word_embeddings.weight


def _float_block(config: TeleChatConfig, tensors: dict, i: int, device: torch.device) -> Block:
    with torch.device("meta"), _skip_init():
        block = Block(config)
    prefix = f"transformer.h.{i}."
    sd = {k: tensors[prefix + k]().to(device=device, dtype=torch.float32) for k in block.state_dict()}
    block.load_state_dict(sd, strict=True, assign=True)
    return block.eval()


def _embed(config: TeleChatConfig, tensors: dict, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    h = F.embedding(ids.to(device), tensors["transformer.word_embeddings.weight"]().to(device, torch.float32))
    if config.embed_layernorm:
        norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon).to(device)
        norm.weight.data = tensors["transformer.word_embeddings_layernorm.weight"]().to(device, torch.float32)
        h = norm(h)
    return h


def _quantize_blocks(out: TeleChat, tensors: dict, qcfg: QuantConfig, ids: torch.Tensor | None,
                     dtype: torch.dtype, device: torch.device, batch_size: int, progress: bool) -> None:
    config = out.config
    h = rope = None
    if ids is not None:
        T = ids.shape[1]
        h = _embed(config, tensors, ids, device)
        rope = rope_cos_sin(config, torch.arange(T, device=device), T)
    groups = MODULE_ORDER if qcfg.true_sequential else (QUANTIZED_MODULES,)
    bar = tqdm(range(config.n_layer), desc=f"quantize {qcfg.describe()}", unit="block", disable=not progress)
    for i in bar:
        block = _float_block(config, tensors, i, device)

        def forward(x):
            return block(x, rope[0], rope[1])

        for group in groups:
            layers = {name: block.get_submodule(name) for name in group}
            if h is not None:
                hessians = HessianCollector(layers)
                hessians.run(forward, h.split(batch_size))
            for name, lin in layers.items():
                full = f"transformer.h.{i}.{name}"
                bar.set_postfix_str(name)
                if h is None:
                    qw = rtn(lin.weight, qcfg)
                else:
                    sink = qcfg.sink_weight if name in SINK_WEIGHTED_MODULES else 0.0
                    damp_scale = max(1.0, lin.in_features / config.hidden_size)
                    qw = gptq(lin.weight, hessians.hessian(name, sink), qcfg, full, damp_scale)
                lin.weight.data = qw.dequantize().to(lin.weight.dtype)  # what later groups and blocks will see
                layer = QuantLinear.from_weight(qw.to("cpu"), lin.bias, dtype)
                parent, _, attr = name.rpartition(".")
                setattr(out.transformer.h[i].get_submodule(parent), attr, layer)
        for name, p in block.named_parameters():  # norms and biases
            if not any(name.startswith(q + ".") for q in QUANTIZED_MODULES):
                _assign(out.transformer.h[i], name, p.detach().to("cpu", dtype).clone())
        if h is not None:  # the next block's inputs: this block's outputs with its quantized weights
            h = torch.cat([forward(x) for x in h.split(batch_size)])
        del block
        _release_freed_memory()


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps it otherwise, and each block's float weights,
    Hessians and GPTQ temporaries leave fragments that add up to hundreds of MB of resident memory."""
    from ..device import release_heap

    gc.collect()
    release_heap()

"""Import LLaMA-family models into the TeleChat layout: GGUF files and HF LLaMA-style folders.

A LLaMA block is TeleChat math with `num_key_value_heads`, `rope_theta`, zero biases on
`dense`/`down_proj` and (often) a tied head, so the result is an ordinary TeleChat checkpoint.
The tokenizer travels as `tokenizer.json` and the chat template in `tokenizer_config.json`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .checkpoint import (CheckpointError, iter_tensors, make_temp_dir, remove_stale_temps, save_tensors,
                         weight_files)
from .config import ConfigError, TeleChatConfig, check_regular_file, read_json
from .hf import AUTO_MAP, merge_key_value, write_remote_code


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, leave=False)


def _llama_config(*, vocab_size, hidden_size, n_layer, n_head, n_kv_head, ffn, eps, rope_theta, context,
                  tied, bos, eos, pad, unk, qkv_bias=False) -> TeleChatConfig:
    return TeleChatConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, n_layer=n_layer, n_head=n_head, ffn_hidden_size=ffn,
        layer_norm_epsilon=eps, training_seqlen=context, seq_length=context, base_seqlen=context,
        tie_word_embeddings=tied, rope_theta=float(rope_theta),
        num_key_value_heads=n_kv_head, qkv_bias=qkv_bias, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, unk_token_id=unk,
        torch_dtype="float32", extra={"architectures": ["TelechatForCausalLM"]})


@contextlib.contextmanager
def _atomic_folder(out: Path):
    """Yield a temporary folder beside `out` that replaces `out` only if the block succeeds.

    The folder is hidden, named after this process, and gets the umask's modes like `mkdir`;
    temporaries of killed runs in the same parent folder are removed first.

    An existing `out` is replaced only when it is empty or a checkpoint folder (has config.json),
    and never when it holds the working directory.
    """
    out = out.expanduser().resolve()
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").exists()):
            raise CheckpointError(f"{out}: exists and is not a checkpoint folder; refusing to replace it")
        if Path.cwd().resolve().is_relative_to(out):
            raise CheckpointError(f"{out}: is (or contains) the working directory; choose another --output")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent)  # what killed imports and quantizations left here
    tmp = make_temp_dir(out.parent, out.name)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_checkpoint(out: Path, config: TeleChatConfig, tensors: dict[str, torch.Tensor], tokenizer_json: str | None,
                      tokenizer_config: dict, generation_config: dict, qcfg=None) -> None:
    """A failed import leaves nothing half-made."""
    config.extra["auto_map"] = dict(AUTO_MAP)
    with _atomic_folder(Path(out)) as tmp:
        save_tensors(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        config.save(tmp / "config.json")
        if qcfg is not None:
            from .quant import write_quant_config

            write_quant_config(tmp, qcfg)
        if tokenizer_json is not None:
            (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
        write_remote_code(tmp)  # transformers' Auto classes read it like a saved folder


def _block_tensors(config: TeleChatConfig, i: int, q, k, v, o, gate, up, down, attn_norm, ffn_norm,
                   o_bias=None, q_bias=None, k_bias=None, v_bias=None) -> dict[str, torch.Tensor]:
    p = f"transformer.h.{i}."
    zeros = torch.zeros(config.hidden_size, dtype=torch.float32)
    extra = {}
    if config.qkv_bias:
        extra = {p + "self_attention.query.bias": q_bias,
                 p + "self_attention.key_value.bias": merge_key_value(k_bias, v_bias, config)}
    return extra | {
        p + "input_layernorm.weight": attn_norm,
        p + "self_attention.query.weight": q,
        p + "self_attention.key_value.weight": merge_key_value(k, v, config),
        p + "self_attention.dense.weight": o,
        p + "self_attention.dense.bias": zeros.clone() if o_bias is None else o_bias,
        p + "post_attention_layernorm.weight": ffn_norm,
        p + "mlp.gate_proj.weight": gate,
        p + "mlp.up_proj.weight": up,
        p + "mlp.down_proj.weight": down,
        p + "mlp.down_proj.bias": zeros.clone(),
    }


# ---- GGUF ------------------------------------------------------------------------------------------
def _gguf_field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k rows (pairs interleaved) back to HF's rotate-half layout."""
    out_dim, in_dim = w.shape
    d = out_dim // n_head
    return w.reshape(n_head, d // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def gguf_tokenizer(reader) -> tuple[str, dict]:
    """A `tokenizer.json` (byte-level BPE) and `tokenizer_config.json` built from GGUF metadata."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    kind = _gguf_field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(f"GGUF tokenizer model {kind!r} is not supported (expected 'gpt2' byte-level BPE)")
    tokens = list(_gguf_field(reader, "tokenizer.ggml.tokens"))
    types = list(_gguf_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _gguf_field(reader, "tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = _gguf_field(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # llama.cpp's pre-tokenizer rules that are the GPT-2 regex, with or without single digits first.
    if pre in ("smollm", "starcoder", "refact"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt-2", "gpt2"):
        tok.pre_tokenizer = byte_level
    else:
        raise CheckpointError(f"GGUF pre-tokenizer {pre!r} is not supported (known: smollm, starcoder, refact, gpt-2)")
    tok.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken(t, special=types[i] == 3, normalized=False)
                    for i, t in enumerate(tokens) if types[i] in (3, 4)])

    def name(key):
        i = _gguf_field(reader, key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "bos_token": name("tokenizer.ggml.bos_token_id"), "eos_token": name("tokenizer.ggml.eos_token_id"),
           "pad_token": name("tokenizer.ggml.padding_token_id"), "unk_token": name("tokenizer.ggml.unknown_token_id"),
           "add_bos_token": bool(_gguf_field(reader, "tokenizer.ggml.add_bos_token", False)),
           "model_max_length": int(_gguf_field(reader, "llama.context_length", 2048))}
    template = _gguf_field(reader, "tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    return tok.to_str(), {k: v for k, v in cfg.items() if v is not None}


def _gguf_config(reader, path: Path) -> tuple[TeleChatConfig, int, int]:
    g = lambda key, default=None: _gguf_field(reader, f"llama.{key}", default)  # noqa: E731
    n_head = int(g("attention.head_count"))
    n_kv = int(g("attention.head_count_kv", n_head))
    hidden = int(g("embedding_length"))
    if int(g("rope.dimension_count", hidden // n_head)) != hidden // n_head:
        raise CheckpointError(f"{path}: partial rotary dimensions are not supported")
    names = {t.name for t in reader.tensors}
    scaling = _gguf_field(reader, "llama.rope.scaling.type")
    if (scaling not in (None, "none")) or "rope_freqs.weight" in names:
        raise CheckpointError(f"{path}: rope scaling ({scaling or 'rope_freqs.weight'}) is not supported")
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    tok_id = lambda key: (int(v) if (v := _gguf_field(reader, key)) is not None else None)  # noqa: E731
    config = _llama_config(
        vocab_size=int(g("vocab_size", len(tokens) if tokens is not None else 0)), hidden_size=hidden,
        n_layer=int(g("block_count")), n_head=n_head, n_kv_head=n_kv, ffn=int(g("feed_forward_length")),
        eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=float(g("rope.freq_base", 10000.0)),
        context=int(g("context_length", 2048)), tied="output.weight" not in names,
        bos=tok_id("tokenizer.ggml.bos_token_id"), eos=tok_id("tokenizer.ggml.eos_token_id"),
        pad=tok_id("tokenizer.ggml.padding_token_id"), unk=tok_id("tokenizer.ggml.unknown_token_id"))
    return config, n_head, n_kv


# GGML block types a linear layer can keep: name -> (bits, zero point kind, bytes per block of 32)
KEEPABLE = {"Q4_0": (4, "int", 18), "Q4_1": (4, "float", 20), "Q8_0": (8, "int", 34)}
_GGUF_LINEARS = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate",
                 "up": "ffn_up", "down": "ffn_down"}


def _gguf_array(t) -> np.ndarray:
    """A GGUF tensor dequantized to fp32, in torch's dimension order."""
    from gguf.quants import dequantize

    arr = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    return arr.reshape([int(x) for x in reversed(t.shape)]) if arr.ndim != len(t.shape) else arr


def gguf_linear_types(reader) -> set[str]:
    """The GGML types of the blocks' linear layers."""
    suffixes = tuple(f".{n}.weight" for n in _GGUF_LINEARS.values())
    return {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and t.name.endswith(suffixes)}


def _gguf_codes(t) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Q4_0/Q4_1/Q8_0 weight [N, K] as codes [N, K] (uint8), scales [N, K/32] and offsets [N, K/32]
    (fp16; w = scale * code + offset), exactly: Q4_0 offsets are -8 scale, Q8_0's -128 scale."""
    bits, _, size = KEEPABLE[t.tensor_type.name]
    K, N = (int(x) for x in t.shape)
    b = np.ascontiguousarray(t.data, dtype=np.uint8).reshape(N, K // 32, size)
    d = b[..., 0:2].copy().view(np.float16)[..., 0]
    if t.tensor_type.name == "Q8_0":
        codes = (b[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return codes.reshape(N, K), d, (d.astype(np.float32) * -128).astype(np.float16)
    qs = b[..., size - 16:]
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(N, K)  # low nibbles: columns 0..15 of the block
    if t.tensor_type.name == "Q4_1":
        return codes, d, b[..., 2:4].copy().view(np.float16)[..., 0]
    return codes, d, (d.astype(np.float32) * -8).astype(np.float16)


def _quantized_linear(prefix: str, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, bits: int,
                      float_zero: bool) -> dict[str, torch.Tensor]:
    """AutoGPTQ tensors for codes [N, K], fp16 scales/offsets [N, G] (group 32): fp16 `mins` for Q4_1
    (see quant/format.py), else the fixed zero point of Q4_0 (8) or Q8_0 (128)."""
    from .quant import pack

    K = codes.shape[1]
    out = {prefix + "qweight": pack(codes.t().to(torch.int64), bits, 0), prefix + "scales": scales.t().contiguous(),
           prefix + "g_idx": (torch.arange(K, dtype=torch.int32) // 32)}
    if float_zero:
        out[prefix + "mins"] = offsets.t().contiguous()
    else:
        zero = 2 ** (bits - 1)  # Q4_0: 8, Q8_0: 128 (offsets -zero * scale, exact in fp16)
        out[prefix + "qzeros"] = pack(torch.full((K // 32, codes.shape[0]), zero - 1, dtype=torch.int64), bits, 1)
    return out


def _keep_plan(reader, path: Path, keep_quantized: bool | None) -> tuple[int, str, str] | None:
    """(bits, zero point kind, GGML types) when the linear layers stay quantized, None to dequantize."""
    types = gguf_linear_types(reader)
    bits = {KEEPABLE[t][0] for t in types if t in KEEPABLE}
    ok = bool(types) and types <= set(KEEPABLE) and len(bits) == 1
    if keep_quantized is False or (keep_quantized is None and not ok):
        return None
    if not ok:
        raise CheckpointError(f"{path}: --keep-quantized takes linear layers all Q4_0/Q4_1 or all Q8_0; this file "
                              f"has {', '.join(sorted(types)) or 'none'} (import without it to dequantize)")
    zero = "float" if "Q4_1" in types else "int"
    return bits.pop(), zero, "+".join(sorted(types))


def import_gguf(path: str | Path, output: str | Path, progress: bool = True, keep_quantized: bool | None = None) -> Path:
    """Convert a GGUF file of a LLaMA-family model. Linear layers in Q4_0/Q4_1/Q8_0 stay quantized
    (`keep_quantized` None: where every layer allows it; True: or fail; False: never); everything
    else, and every other GGML type, is dequantized (to fp32; a kept model's embedding to fp16)."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (expected 'llama')")
    try:
        config, n_head, n_kv = _gguf_config(reader, path)
    except CheckpointError:
        raise
    except (ConfigError, TypeError, ValueError, ZeroDivisionError) as e:  # metadata missing or of the wrong type
        raise CheckpointError(f"{path}: missing or malformed GGUF metadata ({type(e).__name__}: {e})") from None
    plan = _keep_plan(reader, path, keep_quantized)
    if plan is not None:
        return _import_gguf_quantized(reader, path, Path(output), config, n_head, n_kv, plan, progress)
    raw: dict[str, torch.Tensor] = {}
    bar = _progress(len(reader.tensors), f"importing {path.name}", progress)
    for t in reader.tensors:
        arr = _gguf_array(t)
        if t.name.endswith("attn_q.weight"):
            arr = _unpermute_rope(arr, n_head)
        elif t.name.endswith("attn_k.weight"):
            arr = _unpermute_rope(arr, n_kv)
        raw[t.name] = torch.from_numpy(np.array(arr, dtype=np.float32))  # a writable copy
        bar.update()
    bar.close()
    tensors = _assemble(config, lambda n: raw.pop(n), {
        "embed": "token_embd.weight", "norm": "output_norm.weight", "head": "output.weight",
        "q": "blk.{i}.attn_q.weight", "k": "blk.{i}.attn_k.weight", "v": "blk.{i}.attn_v.weight",
        "o": "blk.{i}.attn_output.weight", "gate": "blk.{i}.ffn_gate.weight", "up": "blk.{i}.ffn_up.weight",
        "down": "blk.{i}.ffn_down.weight", "attn_norm": "blk.{i}.attn_norm.weight",
        "ffn_norm": "blk.{i}.ffn_norm.weight"}, str(path))
    if raw:
        raise CheckpointError(f"{path}: tensors this import cannot express: {', '.join(sorted(raw)[:10])}")
    tokenizer_json, tokenizer_config = gguf_tokenizer(reader)
    _write_checkpoint(Path(output), config, tensors, tokenizer_json, tokenizer_config,
                      _generation_config(config, tokenizer_config, tokenizer_json))
    return Path(output)


def _import_gguf_quantized(reader, path: Path, output: Path, config: TeleChatConfig, n_head: int, n_kv: int,
                           plan: tuple[int, str, str], progress: bool) -> Path:
    from .quant import QuantConfig

    bits, zero, types = plan
    qcfg = QuantConfig(bits=bits, group_size=32, sym=zero == "int", method="rtn", zero_point=zero,
                       source=f"gguf {types}")
    by_name = {t.name: t for t in reader.tensors}

    def dense(name: str, dtype=torch.float32) -> torch.Tensor:
        if name not in by_name:
            raise CheckpointError(f"{path}: missing tensor {name}")
        return torch.from_numpy(np.array(_gguf_array(by_name.pop(name)), dtype=np.float32)).to(dtype)

    def linear(i: int, key: str) -> tuple[torch.Tensor, ...]:
        name = f"blk.{i}.{_GGUF_LINEARS[key]}.weight"
        if name not in by_name:
            raise CheckpointError(f"{path}: missing tensor {name}")
        codes, s, m = (torch.from_numpy(np.ascontiguousarray(a)) for a in _gguf_codes(by_name.pop(name)))
        if key in ("q", "k"):  # llama.cpp's rotary row order, undone on codes and per-row scales alike
            heads = n_head if key == "q" else n_kv
            codes, s, m = (torch.from_numpy(np.ascontiguousarray(_unpermute_rope(a.numpy(), heads)))
                           for a in (codes, s, m))
        return codes, s, m

    tensors = {"transformer.word_embeddings.weight": dense("token_embd.weight", torch.float16),
               "transformer.ln_f.weight": dense("output_norm.weight")}
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = dense("output.weight", torch.float16)
    float_zero = zero == "float"
    bar = _progress(config.n_layer, f"importing {path.name} ({types} kept)", progress)
    zeros = torch.zeros(config.hidden_size, dtype=torch.float32)
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        parts = {key: linear(i, key) for key in _GGUF_LINEARS}
        kv = tuple(merge_key_value(a, b, config) for a, b in zip(parts["k"], parts["v"]))
        for module, part in (("self_attention.query", parts["q"]), ("self_attention.key_value", kv),
                             ("self_attention.dense", parts["o"]), ("mlp.gate_proj", parts["gate"]),
                             ("mlp.up_proj", parts["up"]), ("mlp.down_proj", parts["down"])):
            qcfg.check_layer(p + module, part[0].shape[1], part[0].shape[0])
            tensors.update(_quantized_linear(p + module + ".", *part, bits, float_zero))
        tensors.update({p + "input_layernorm.weight": dense(f"blk.{i}.attn_norm.weight"),
                        p + "post_attention_layernorm.weight": dense(f"blk.{i}.ffn_norm.weight"),
                        p + "self_attention.dense.bias": zeros.clone(), p + "mlp.down_proj.bias": zeros.clone()})
        bar.update()
    bar.close()
    if by_name:
        raise CheckpointError(f"{path}: tensors this import cannot express: {', '.join(sorted(by_name)[:10])}")
    tokenizer_json, tokenizer_config = gguf_tokenizer(reader)
    config.torch_dtype = "float32"  # activations; the codes stay codes and the embedding fp16
    config.extra["quantization_config"] = qcfg.to_hf()
    _write_checkpoint(output, config, tensors, tokenizer_json, tokenizer_config,
                      _generation_config(config, tokenizer_config, tokenizer_json), qcfg)
    return output


def _generation_config(config: TeleChatConfig, tokenizer_config: dict, tokenizer_json: str | None) -> dict:
    gen = {"max_length": config.seq_length, "do_sample": False, "bos_token_id": config.bos_token_id,
           "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id}
    if tokenizer_json and tokenizer_config.get("eos_token"):
        vocab = {t["content"]: t["id"] for t in json.loads(tokenizer_json).get("added_tokens", [])}
        eos = vocab.get(tokenizer_config["eos_token"])
        if eos is not None:
            gen["eos_token_id"] = eos
    return {k: v for k, v in gen.items() if v is not None}


def _assemble(config: TeleChatConfig, take, names: dict[str, str], source: str) -> dict[str, torch.Tensor]:
    def get(key, i=None):
        name = names[key].format(i=i)
        try:
            return take(name)
        except KeyError:
            raise CheckpointError(f"{source}: missing tensor {name}") from None

    out = {"transformer.word_embeddings.weight": get("embed"), "transformer.ln_f.weight": get("norm")}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = get("head")
    for i in range(config.n_layer):
        biases = {arg: get(key, i) for arg, key in (("q_bias", "qb"), ("k_bias", "kb"), ("v_bias", "vb"),
                                                     ("o_bias", "ob")) if key in names}
        out.update(_block_tensors(config, i, get("q", i), get("k", i), get("v", i), get("o", i), get("gate", i),
                                  get("up", i), get("down", i), get("attn_norm", i), get("ffn_norm", i), **biases))
    return {k: v.float().contiguous() for k, v in out.items()}


# ---- HF LLaMA-style folders ------------------------------------------------------------------------
def import_hf(path: str | Path, output: str | Path, progress: bool = True) -> Path:
    """Convert an HF LLaMA-style folder (Llama, Mistral without sliding window, Qwen2; safetensors or bin)."""
    path = Path(path)
    cfg_file = path / "config.json"
    try:
        hf = read_json(cfg_file, CheckpointError)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no config.json") from None
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size") if hf.get(k) is None]
    if missing:
        raise CheckpointError(f"{cfg_file}: missing required field(s): {', '.join(missing)}")
    for k in ("hidden_size", "num_attention_heads"):
        if isinstance(hf[k], bool) or not isinstance(hf[k], int) or hf[k] < 1:
            raise CheckpointError(f"{cfg_file}: {k} must be an integer >= 1, got {hf[k]!r:.60}")
    if not isinstance(hf.get("rope_parameters") or {}, dict):
        raise CheckpointError(f"{cfg_file}: rope_parameters must be an object")
    model_type = hf.get("model_type")
    if model_type not in ("llama", "mistral", "qwen2"):
        raise CheckpointError(f"{path}: model_type {model_type!r} is not supported "
                              "(expected a LLaMA-style model: llama, mistral or qwen2)")
    if hf.get("mlp_bias"):
        raise CheckpointError(f"{path}: mlp_bias=true (biases on gate/up) cannot be expressed in the TeleChat layout")
    if hf.get("use_sliding_window") or (model_type == "mistral" and hf.get("sliding_window")):
        raise CheckpointError(f"{path}: sliding-window attention is not supported")
    attention_bias = bool(hf.get("attention_bias"))  # LLaMA: biases on q, k, v and o
    qkv_bias = attention_bias or model_type == "qwen2"  # Qwen2: biases on q, k, v only
    rope = dict(hf.get("rope_parameters") or {})  # transformers 5 keeps rope_theta here
    scaling = hf.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"}
                                         if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        raise CheckpointError(f"{path}: rope scaling {scaling!r} is not supported")
    rope_theta = hf.get("rope_theta") or rope.get("rope_theta") or 10000.0
    n_head = hf["num_attention_heads"]
    hidden = hf["hidden_size"]
    if hf.get("head_dim", hidden // n_head) != hidden // n_head:
        raise CheckpointError(f"{path}: head_dim != hidden_size / num_attention_heads is not supported")

    def one(v):
        return v[0] if isinstance(v, list) else v

    try:
        config = _llama_config(
            vocab_size=hf["vocab_size"], hidden_size=hidden, n_layer=hf["num_hidden_layers"], n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head, ffn=hf["intermediate_size"],
            eps=hf.get("rms_norm_eps", 1e-6), rope_theta=rope_theta,
            context=hf.get("max_position_embeddings", 2048), tied=bool(hf.get("tie_word_embeddings", False)),
            bos=one(hf.get("bos_token_id")), eos=one(hf.get("eos_token_id")), pad=one(hf.get("pad_token_id")),
            unk=None, qkv_bias=qkv_bias)
    except (ConfigError, TypeError, ValueError) as e:  # float(rope_theta="x"), a bad size, ...
        raise CheckpointError(f"{cfg_file}: {e}") from None
    raw: dict[str, torch.Tensor] = {}
    files = weight_files(path)
    bar = _progress(len(files), f"importing {path.name}", progress)
    for f in files:
        raw.update({k.removeprefix("model.") if k.startswith("model.") else k: v for k, v in iter_tensors(f)})
        bar.update()
    bar.close()
    if config.tie_word_embeddings:
        raw.pop("lm_head.weight", None)
    tensors = _assemble(config, lambda n: raw.pop(n), {
        "embed": "embed_tokens.weight", "norm": "norm.weight", "head": "lm_head.weight",
        "q": "layers.{i}.self_attn.q_proj.weight", "k": "layers.{i}.self_attn.k_proj.weight",
        "v": "layers.{i}.self_attn.v_proj.weight", "o": "layers.{i}.self_attn.o_proj.weight",
        "gate": "layers.{i}.mlp.gate_proj.weight", "up": "layers.{i}.mlp.up_proj.weight",
        "down": "layers.{i}.mlp.down_proj.weight", "attn_norm": "layers.{i}.input_layernorm.weight",
        "ffn_norm": "layers.{i}.post_attention_layernorm.weight",
        **({"qb": "layers.{i}.self_attn.q_proj.bias", "kb": "layers.{i}.self_attn.k_proj.bias",
            "vb": "layers.{i}.self_attn.v_proj.bias"} if qkv_bias else {}),
        **({"ob": "layers.{i}.self_attn.o_proj.bias"} if attention_bias else {})}, str(path))
    leftover = [k for k in raw if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise CheckpointError(f"{path}: unexpected tensors: {', '.join(leftover[:10])}")
    tokenizer_json = None
    if os.path.lexists(path / "tokenizer.json"):
        check_regular_file(path / "tokenizer.json", CheckpointError)
        tokenizer_json = (path / "tokenizer.json").read_text(encoding="utf-8")
    tokenizer_config = {}
    if os.path.lexists(path / "tokenizer_config.json"):
        tokenizer_config = read_json(path / "tokenizer_config.json", CheckpointError)
        tokenizer_config = {k: v for k, v in tokenizer_config.items() if k != "auto_map"}
    if "chat_template" not in tokenizer_config and (path / "chat_template.jinja").exists():
        tokenizer_config["chat_template"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
    gen = _generation_config(config, tokenizer_config, tokenizer_json)
    if os.path.lexists(path / "generation_config.json"):
        gen.update({k: v for k, v in read_json(path / "generation_config.json", CheckpointError).items()
                    if k in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "eos_token_id",
                             "max_new_tokens")})
    _write_checkpoint(Path(output), config, tensors, tokenizer_json, tokenizer_config, gen)
    return Path(output)


def import_model(source: str | Path, output: str | Path, progress: bool = True,
                 keep_quantized: bool | None = None) -> Path:
    """Import a `.gguf` file or an HF LLaMA-style folder into the TeleChat layout at `output`
    (`keep_quantized`: see `import_gguf`; GGUF only)."""
    source = Path(source).expanduser()
    if source.is_file() and source.suffix == ".gguf":
        return import_gguf(source, output, progress, keep_quantized)
    if keep_quantized and source.is_dir():
        raise CheckpointError(f"{source}: --keep-quantized applies to GGUF files, not to HF folders")
    if source.is_dir():
        return import_hf(source, output, progress)
    if not source.exists():
        raise CheckpointError(f"{source}: no such file or folder")
    raise CheckpointError(f"{source}: expected a .gguf file or an HF model folder")


# ---- export --------------------------------------------------------------------------------------
def export_vllm(source: str | Path, output: str | Path) -> Path:
    """A copy of a checkpoint that vLLM's built-in TeleChat support serves with the same math.

    vLLM's `TeleChat2ForCausalLM` reads `transformer.`-prefixed keys, de-interleaves `key_value`
    per head, needs an explicit `lm_head`, and applies plain RoPE with `rope_theta`. TeleChat's
    NTK rule is constant up to `training_seqlen`, so its effective base there is baked into
    `rope_theta` and the context is capped at `training_seqlen` (`max_position_embeddings`).
    """
    from .checkpoint import load_model
    from .default_model import resolve_model

    src = resolve_model(source)
    model = load_model(src)
    c = model.config
    if c.qkv_bias or not c.bias:
        raise CheckpointError(f"{src}: vLLM's TeleChat2 layout has biases on dense/down_proj only; this model "
                              f"has qkv_bias={c.qkv_bias}, bias={c.bias}")
    base, mscale, _ = c.rope_scaling(c.training_seqlen)
    assert mscale == 1.0  # by construction of the rule at L' = training_seqlen
    sd = model.state_dict()
    tensors = {k: v.contiguous() for k, v in sd.items() if k != "lm_head.weight"}
    tensors["lm_head.weight"] = sd["lm_head.weight"].clone()  # explicit, even when tied
    cfg = c.to_dict()
    cfg.pop("auto_map", None)  # vLLM's own config class for model_type "telechat"
    cfg.update({"architectures": ["TeleChat2ForCausalLM"], "rope_theta": base, "tie_word_embeddings": False,
                "max_position_embeddings": c.training_seqlen, "seq_length": c.training_seqlen,
                "hidden_act": "silu", "num_key_value_heads": c.n_kv_head})
    out = Path(output)
    with _atomic_folder(out) as tmp:
        save_tensors(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for name in ("generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                     "special_tokens_map.json", "specail_tokens_map.json", "tokenization_telechat.py"):
            if (src / name).exists():
                shutil.copyfile(src / name, tmp / name)
    return out

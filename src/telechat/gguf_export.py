"""Export a TeleChat checkpoint as a GGUF file for llama.cpp (and Ollama) under the "llama" architecture.

TeleChat at lengths up to `training_seqlen` is LLaMA math (RMSNorm, SwiGLU, rotary attention with
one fixed base) plus biases on `dense` and `down_proj`, which llama.cpp's llama loader accepts as
optional `attn_output.bias` / `ffn_down.bias` tensors. The weights are taken under HF Llama names
(`telechat.hf.llama_state_dict`: key/value de-interleaved) and renamed to llama.cpp's; Q/K rows are
reordered because llama.cpp rotates adjacent pairs where HF rotates halves. The NTK base the model
uses up to `training_seqlen` is baked into `rope.freq_base` and the context is capped there.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointError, remove_stale_temps, temp_name
from .config import TeleChatConfig

OUTTYPES = ("f32", "bf16", "f16", "q8_0")

# TeleChat's own chat format (chat.build_chat_ids) as a Jinja template, for checkpoints without one.
TELECHAT_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}<_system>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<_user>{{ m['content'] }}"
    "{% else %}<_bot>{{ m['content'] }}<_end>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<_bot>{% endif %}")


def rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half row order -> llama.cpp's adjacent-pair order, per head (weights [out, in] or biases [out])."""
    shape = w.shape
    d = shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def gguf_tensors(model) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's llama tensor names (the model's dtype, rope rows permuted)."""
    from .hf import llama_state_dict

    c: TeleChatConfig = model.config
    sd = llama_state_dict(model)
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not c.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(c.n_layer):
        for hf_name, name in names.items():
            for kind in ("weight", "bias"):
                t = sd.get(f"model.layers.{i}.{hf_name}.{kind}")
                if t is None:
                    continue
                if kind == "bias" and not t.any():
                    continue  # the zeros llama_state_dict fills in where TeleChat has no bias
                if name == "attn_q":
                    t = rope_permute(t, c.n_head)
                elif name == "attn_k":
                    t = rope_permute(t, c.n_kv_head)
                out[f"blk.{i}.{name}.{kind}"] = t
    return {k: v.detach().contiguous() for k, v in out.items()}


# ---- tokenizer ---------------------------------------------------------------------------------------
def _pad_tokens(tokens: list, scores: list, types: list, n_vocab: int, source: str) -> None:
    if len(tokens) > n_vocab:
        raise CheckpointError(f"{source}: the tokenizer has {len(tokens)} tokens but the model's vocab_size is "
                              f"{n_vocab}; llama.cpp needs one embedding row per token")
    for i in range(len(tokens), n_vocab):  # embedding rows no token uses
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(5)  # UNUSED


def sentencepiece_vocab(path: Path, n_vocab: int) -> dict:
    """tokens/scores/types and flags of a SentencePiece BPE model, for llama.cpp's "llama" (SPM) tokenizer."""
    from sentencepiece import sentencepiece_model_pb2

    m = sentencepiece_model_pb2.ModelProto()
    try:
        m.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError
        raise CheckpointError(f"{path}: not a readable SentencePiece model ({e})") from None
    if m.trainer_spec.model_type != 2:  # BPE
        raise CheckpointError(f"{path}: SentencePiece model type {m.trainer_spec.model_type} is not supported "
                              f"(expected 2, BPE, as TeleChat's)")
    norm = m.normalizer_spec
    if norm.name not in ("identity", "") or norm.remove_extra_whitespaces:  # TeleChat's own is "identity"
        warnings.warn(f"{path}: llama.cpp does not apply this SentencePiece normalization ({norm.name}, "
                      f"remove_extra_whitespaces={norm.remove_extra_whitespaces}); text it would change "
                      f"(e.g. full-width forms, repeated spaces) may tokenize differently there", stacklevel=2)
    tokens, scores, types = [], [], []
    for p in m.pieces:
        tokens.append(p.piece)
        scores.append(float(p.score))
        kind = int(p.type)
        # SentencePiece matches user-defined pieces inside the text; llama.cpp would also restart its space
        # prefix after each one, so plain ones ("0".."9", "\n", "_") stay ordinary single-character pieces.
        if kind == 4 and not (p.piece.startswith("<") and p.piece.endswith(">")):
            kind = 1
        types.append(kind)
    _pad_tokens(tokens, scores, types, n_vocab, str(path))
    return {"model": "llama", "tokens": tokens, "scores": scores, "types": types,
            "add_space_prefix": bool(m.normalizer_spec.add_dummy_prefix)}


def _pre_tokenizer_name(pre: dict | None, source: str) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer of tokenizer.json."""
    def byte_level(p):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) and not p.get("add_prefix_space", False)

    if pre and byte_level(pre):
        return "gpt-2"
    if pre and pre.get("type") == "Sequence":
        seq = pre.get("pretokenizers", [])
        if len(seq) == 2 and seq[0].get("type") == "Digits" and seq[0].get("individual_digits") and byte_level(seq[1]):
            return "smollm"  # single digits, then the GPT-2 regex
    raise CheckpointError(f"{source}: pre_tokenizer {json.dumps(pre)[:200]} has no llama.cpp equivalent (supported: "
                          f"ByteLevel with the GPT-2 regex, optionally after single-digit splitting)")


def bpe_vocab(path: Path, n_vocab: int) -> dict:
    """tokens/types/merges of a byte-level BPE tokenizer.json, for llama.cpp's "gpt2" tokenizer."""
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable tokenizer.json ({e})") from None
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise CheckpointError(f"{path}: tokenizer model {model.get('type')!r} is not supported (expected BPE)")
    if tj.get("normalizer"):
        raise CheckpointError(f"{path}: a tokenizer.json normalizer has no llama.cpp equivalent")
    pre = _pre_tokenizer_name(tj.get("pre_tokenizer"), str(path))
    by_id: dict[int, tuple[str, int]] = {int(i): (t, 1) for t, i in model.get("vocab", {}).items()}
    for a in tj.get("added_tokens", []):
        by_id[int(a["id"])] = (a["content"], 3 if a.get("special") else 4)  # CONTROL / USER_DEFINED
    size = max(by_id) + 1 if by_id else 0
    if size > n_vocab:
        raise CheckpointError(f"{path}: the tokenizer has ids up to {size - 1} but the model's vocab_size is "
                              f"{n_vocab}; llama.cpp needs one embedding row per token")
    tokens, types = [], []
    for i in range(size):
        t, kind = by_id.get(i, (f"[PAD{i}]", 5))
        tokens.append(t)
        types.append(kind)
    scores = [0.0] * size
    _pad_tokens(tokens, scores, types, n_vocab, str(path))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "merges": merges}


def tokenizer_vocab(folder: Path, n_vocab: int) -> tuple[dict, object]:
    """The GGUF vocabulary of a checkpoint's tokenizer (the file telechat itself loads) and that tokenizer."""
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(folder)
    if tok.kind == "sentencepiece":
        return sentencepiece_vocab(tok.path, n_vocab), tok
    return bpe_vocab(tok.path, n_vocab), tok


# ---- writing -----------------------------------------------------------------------------------------
def _tensor_data(name: str, t: torch.Tensor, outtype: str):
    """(array, raw GGML type or None) for one tensor; 1-D tensors (norms, biases) stay f32 as llama.cpp expects."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    arr = t.float().numpy()
    if arr.ndim == 1 or outtype == "f32":
        return arr.astype(np.float32, copy=False), None
    if outtype == "f16":
        return arr.astype(np.float16), None
    if outtype == "q8_0" and arr.shape[-1] % 32 == 0:
        return quantize(arr, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    if outtype == "q8_0":  # rows that are not whole Q8_0 blocks, as llama.cpp's converter does
        return arr.astype(np.float16), None
    return quantize(arr, GGMLQuantizationType.BF16), GGMLQuantizationType.BF16


def export_gguf(source: str | Path, output: str | Path, outtype: str = "f32") -> Path:
    """Write `source` (a checkpoint folder or "default") as one GGUF file that llama.cpp loads.

    The file is written beside `output` under a temporary name and renamed into place when complete.
    """
    import gguf

    from .checkpoint import load_model
    from .default_model import resolve_model

    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    out = Path(output).expanduser()
    if out.is_dir():
        raise CheckpointError(f"{out}: is a folder; --output for GGUF names a file (e.g. model.gguf)")
    src = resolve_model(source)
    model = load_model(src)
    c = model.config
    if c.embed_layernorm:
        raise CheckpointError(f"{src}: embed_layernorm (a norm after the embedding) has no llama.cpp llama equivalent")
    base, mscale, _ = c.rope_scaling(c.training_seqlen)
    assert mscale == 1.0  # the NTK rule is constant up to training_seqlen
    vocab, tok = tokenizer_vocab(src, c.vocab_size)
    tok_cfg = tok.tokenizer_config
    template = tok.chat_template
    if template is None and tok.user_id is not None and tok.bot_id is not None and tok.eos_id is not None:
        template = TELECHAT_CHAT_TEMPLATE
    tensors = gguf_tensors(model)
    del model

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent)  # what killed exports left here
    tmp = out.with_name(temp_name(out.name))
    try:
        w = gguf.GGUFWriter(str(tmp), "llama", use_temp_file=True)
        w.add_name(src.name if str(source) != "default" else "default")
        w.add_context_length(c.training_seqlen)
        w.add_embedding_length(c.hidden_size)
        w.add_block_count(c.n_layer)
        w.add_feed_forward_length(c.ffn_hidden_size)
        w.add_head_count(c.n_head)
        w.add_head_count_kv(c.n_kv_head)
        w.add_rope_dimension_count(c.head_dim)
        w.add_rope_freq_base(float(base))
        w.add_layer_norm_rms_eps(float(c.layer_norm_epsilon))
        w.add_vocab_size(c.vocab_size)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
        w.add_tokenizer_model(vocab["model"])
        if "pre" in vocab:
            w.add_tokenizer_pre(vocab["pre"])
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        if vocab["model"] == "llama":
            w.add_token_scores(vocab["scores"])
            w.add_add_space_prefix(vocab["add_space_prefix"])
        else:
            w.add_token_merges(vocab["merges"])
        for name, i in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id), ("unk", tok.unk_id)):
            if i is not None and 0 <= i < c.vocab_size:
                getattr(w, f"add_{name}_token_id")(int(i))
        # TeleChat adds no BOS/EOS when encoding (tokenizer_config's add_bos_token/add_eos_token).
        w.add_add_bos_token(bool(tok_cfg.get("add_bos_token", False)))
        w.add_add_eos_token(bool(tok_cfg.get("add_eos_token", False)))
        if template:
            w.add_chat_template(template)
        for name in list(tensors):
            arr, raw = _tensor_data(name, tensors.pop(name), outtype)
            w.add_tensor(name, arr, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def requantize_gguf(source: str | Path, output: str | Path, ggml_type: str) -> Path:
    """A copy of the GGUF file `source` whose blocks' Q4_0/Q4_1/Q8_0 weights are re-quantized to `ggml_type`
    (one of those three) by gguf-py; metadata and every other tensor as they were. Dequantizing first,
    so each step adds its own rounding: for comparing engines on the same model at another type."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize, quantize

    kept = ("Q4_0", "Q4_1", "Q8_0")
    if ggml_type not in kept:
        raise ValueError(f"ggml_type must be one of {', '.join(kept)}, got {ggml_type!r}")
    reader = GGUFReader(str(source))
    out = Path(output)
    tmp = out.with_name(temp_name(out.name))
    try:
        w = GGUFWriter(str(tmp), arch=reader.fields["general.architecture"].contents())
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or name == "general.architecture":
                continue
            sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            w.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
        target = GGMLQuantizationType[ggml_type]
        for t in reader.tensors:
            if t.name.startswith("blk.") and t.tensor_type.name in kept:
                dense = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)
                w.add_tensor(t.name, quantize(dense, target), raw_dtype=target)
            else:
                w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out

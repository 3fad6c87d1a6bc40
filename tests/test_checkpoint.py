"""Checkpoints in the official layout (spec section 2): safetensors and pickled shards, dtypes, errors, memory."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import telechat
from telechat import CheckpointError
from telechat.checkpoint import load_model, save_model

IDS = torch.tensor([[5, 17, 300, 42, 7, 511, 0, 3, 250, 99, 1, 2]])


def logits(llm_or_model, ids=IDS):
    model = getattr(llm_or_model, "model", llm_or_model)
    with torch.no_grad():
        return model(ids)


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def random_llm(seed=1, **overrides) -> telechat.LLM:
    llm = telechat.from_preset("tiny", seed=seed, **overrides)
    with torch.no_grad():
        for name, p in llm.model.named_parameters():
            if name.endswith("bias") or "layernorm" in name or "ln_f" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return llm


def write_official_bin(model: telechat.TeleChat, folder: Path, *, prefix: bool = True, lm_head: bool = True,
                       n_shards: int = 2, config: dict | None = None, dtype=None) -> dict:
    """Write `pytorch_model-0000k-of-0000n.bin` shards (torch.save) and `pytorch_model.bin.index.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and not lm_head:
            continue
        key = k if prefix or not k.startswith("transformer.") else k[len("transformer."):]
        sd[key] = (v.to(dtype) if dtype is not None else v).clone()
    keys = list(sd)
    per = -(-len(keys) // n_shards)
    weight_map = {}
    for i in range(n_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = {k: sd[k] for k in keys[i * per:(i + 1) * per]}
        torch.save(part, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
         "weight_map": weight_map}))
    cfg = config if config is not None else model.config.to_dict()
    (folder / "config.json").write_text(json.dumps(cfg))
    return sd


# ---- safetensors round trip ----------------------------------------------------------------------
def test_save_load_bit_identical(tiny_dir, tmp_path):
    llm = telechat.load(tiny_dir)
    out = llm.save(tmp_path / "copy")
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    for name in ("config.json", "generation_config.json", "tokenizer.model"):
        assert (out / name).exists(), name
    back = telechat.load(out)
    assert_same_state(llm.model, back.model)
    assert torch.equal(logits(llm), logits(back))
    assert back.config == llm.config
    assert back.generation_config == llm.generation_config
    assert back.tokenizer is not None and back.tokenizer.encode("你好") == llm.tokenizer.encode("你好")


def test_save_load_tied_model(tmp_path):
    llm = random_llm(tie_word_embeddings=True)
    llm.save(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "transformer.word_embeddings.weight" in keys
    back = telechat.load(tmp_path, dtype=None)
    assert back.model.lm_head.weight is back.model.transformer.word_embeddings.weight
    assert torch.equal(logits(llm), logits(back))


def test_saved_keys_are_official(tmp_path):
    llm = random_llm()
    llm.save(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        kv = f.get_tensor("transformer.h.0.self_attention.key_value.weight")
    assert "transformer.h.1.mlp.down_proj.bias" in keys and "lm_head.weight" in keys
    assert kv.shape == (2 * 64, 64)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "telechat" and cfg["n_layer"] == 2 and cfg["torch_dtype"] == "float32"


def test_sharded_save(tiny_dir, tmp_path):
    llm = telechat.load(tiny_dir)
    llm.save(tmp_path, max_shard_bytes=150_000)
    files = sorted(tmp_path.glob("model*.safetensors"))
    n = len(files)
    assert n >= 3
    assert [f.name for f in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(llm.model.state_dict())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in llm.model.state_dict().values())
    back = telechat.load(tmp_path)
    assert_same_state(llm.model, back.model)
    assert torch.equal(logits(llm), logits(back))
    # Saving again unsharded into the same folder removes the shards and the index.
    llm.save(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model[.-]*")) == ["model.safetensors"]
    assert torch.equal(logits(telechat.load(tmp_path)), logits(llm))


def test_save_model_returns_files(tmp_path):
    llm = random_llm()
    files = save_model(llm.model, tmp_path, max_shard_bytes=100_000)
    assert len(files) > 1 and all(f.exists() for f in files)
    assert torch.equal(logits(load_model(tmp_path)), logits(llm))


# ---- official pickled shards ---------------------------------------------------------------------
def test_official_bin_shards_with_prefix(tmp_path):
    llm = random_llm()
    sd = write_official_bin(llm.model, tmp_path, prefix=True, lm_head=True)
    assert all(k.startswith(("transformer.", "lm_head.")) for k in sd)
    back = telechat.load(tmp_path)
    assert back.tokenizer is None
    assert back.dtype == torch.float32
    assert_same_state(llm.model, back.model)
    assert torch.equal(logits(llm), logits(back))


def test_official_bin_7b_style(tmp_path):
    """No `transformer.` prefix, no lm_head, config.json without tie_word_embeddings, fp16 weights."""
    llm = random_llm(tie_word_embeddings=True)
    cfg = llm.config.to_dict()
    for k in ("tie_word_embeddings", "torch_dtype"):
        cfg.pop(k, None)
    sd = write_official_bin(llm.model, tmp_path, prefix=False, lm_head=False, n_shards=3, config=cfg,
                            dtype=torch.float16)
    assert "word_embeddings.weight" in sd and "h.0.self_attention.query.weight" in sd
    assert not any(k.startswith(("transformer.", "lm_head")) for k in sd)
    back = telechat.load(tmp_path, dtype=None)
    assert back.config.tie_word_embeddings is True
    assert back.dtype == torch.float16  # stored dtype kept
    m = back.model
    assert m.lm_head.weight is m.transformer.word_embeddings.weight
    for k, v in sd.items():
        assert torch.equal(m.state_dict()["transformer." + k], v), k
    # Same forward as the original with fp16-rounded weights.
    back32 = telechat.load(tmp_path, dtype="float32")
    ref = random_llm(tie_word_embeddings=True)
    ref.model.to(torch.float16).to(torch.float32)
    assert torch.equal(logits(back32), logits(ref))


def test_official_bin_single_file(tmp_path):
    llm = random_llm()
    torch.save(llm.model.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(llm.config.to_dict()))
    assert torch.equal(logits(telechat.load(tmp_path)), logits(llm))


def test_ignored_rotary_buffers(tmp_path):
    llm = random_llm()
    sd = dict(llm.model.state_dict())
    sd["transformer.h.0.self_attention.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(llm.config.to_dict()))
    assert torch.equal(logits(telechat.load(tmp_path)), logits(llm))


def test_tied_checkpoint_with_lm_head_key(tmp_path):
    """A tied model whose file still carries lm_head.weight loads (the copy is ignored)."""
    llm = random_llm(tie_word_embeddings=True)
    write_official_bin(llm.model, tmp_path, lm_head=True)
    back = telechat.load(tmp_path)
    assert torch.equal(logits(back), logits(llm))


# ---- dtypes --------------------------------------------------------------------------------------
@pytest.fixture()
def bf16_dir(tmp_path):
    llm = random_llm()
    llm.model.to(torch.bfloat16)
    llm.save(tmp_path / "bf16")
    return tmp_path / "bf16", llm


def test_dtype_none_keeps_bf16(bf16_dir):
    path, llm = bf16_dir
    back = telechat.load(path, dtype=None)
    assert back.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in back.model.parameters())
    assert_same_state(llm.model, back.model)
    assert back.config.torch_dtype == "bfloat16"


@pytest.mark.parametrize("dtype,expected", [("float32", torch.float32), (torch.float16, torch.float16),
                                            ("fp16", torch.float16), ("torch.float32", torch.float32)])
def test_dtype_converts(bf16_dir, dtype, expected):
    path, llm = bf16_dir
    back = telechat.load(path, dtype=dtype)
    assert back.dtype == expected
    ref = llm.model.state_dict()
    for k, v in back.model.state_dict().items():
        assert v.dtype == expected, k
        assert torch.equal(v, ref[k].to(expected)), k
    assert back.config.torch_dtype == str(expected).removeprefix("torch.")


def test_dtype_none_without_torch_dtype_in_config(tmp_path):
    llm = random_llm()
    cfg = llm.config.to_dict()
    cfg.pop("torch_dtype", None)
    write_official_bin(llm.model, tmp_path, config=cfg, dtype=torch.bfloat16)
    assert telechat.load(tmp_path, dtype=None).dtype == torch.bfloat16


def test_bad_dtype(tiny_dir):
    with pytest.raises(ValueError, match="int3"):
        telechat.load(tiny_dir, dtype="int3")


# ---- errors --------------------------------------------------------------------------------------
def _tiny_copy(tiny_dir, dest) -> Path:
    shutil.copytree(tiny_dir, dest)
    return dest


def _rewrite_safetensors(folder: Path, fn):
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    sd = load_file(str(f))
    fn(sd)
    save_file(sd, str(f), metadata={"format": "pt"})


def test_missing_key_named(tiny_dir, tmp_path):
    d = _tiny_copy(tiny_dir, tmp_path / "m")
    _rewrite_safetensors(d, lambda sd: sd.pop("transformer.h.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError) as e:
        telechat.load(d)
    msg = str(e.value)
    assert "missing" in msg and "transformer.h.1.mlp.up_proj.weight" in msg
    assert "unexpected" not in msg


def test_unexpected_key_named(tiny_dir, tmp_path):
    d = _tiny_copy(tiny_dir, tmp_path / "u")
    _rewrite_safetensors(d, lambda sd: sd.__setitem__("transformer.h.9.mlp.extra.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError) as e:
        telechat.load(d)
    msg = str(e.value)
    assert "unexpected" in msg and "transformer.h.9.mlp.extra.weight" in msg
    assert "missing" not in msg


def test_checkpoint_with_more_layers_than_config(tiny_dir, tmp_path):
    d = _tiny_copy(tiny_dir, tmp_path / "l")
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_layer"] = cfg["num_hidden_layers"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"transformer\.h\.1\."):
        telechat.load(d)


def test_shape_mismatch_named(tiny_dir, tmp_path):
    d = _tiny_copy(tiny_dir, tmp_path / "s")
    key = "transformer.h.0.mlp.gate_proj.weight"
    _rewrite_safetensors(d, lambda sd: sd.__setitem__(key, torch.zeros(100, 64)))
    with pytest.raises(CheckpointError) as e:
        telechat.load(d)
    msg = str(e.value)
    assert key in msg and "(176, 64)" in msg and "(100, 64)" in msg


def test_config_size_mismatch(tiny_dir, tmp_path):
    d = _tiny_copy(tiny_dir, tmp_path / "v")
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] = 1000
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        telechat.load(d)
    msg = str(e.value)
    assert ("word_embeddings.weight" in msg or "lm_head.weight" in msg) and "(1000, 64)" in msg and "(512, 64)" in msg


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_shard_named(tmp_path, fmt):
    llm = random_llm()
    if fmt == "safetensors":
        llm.save(tmp_path, max_shard_bytes=150_000)
        shards = sorted(tmp_path.glob("model-*.safetensors"))
        assert len(shards) >= 3
        victim = shards[1]
    else:
        write_official_bin(llm.model, tmp_path, n_shards=2)
        victim = tmp_path / "pytorch_model-00002-of-00002.bin"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        telechat.load(tmp_path)
    assert victim.name in str(e.value)


def test_garbage_weight_file_named(tmp_path):
    llm = random_llm()
    llm.save(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        telechat.load(tmp_path)


def test_index_names_missing_shard(tmp_path):
    llm = random_llm()
    llm.save(tmp_path, max_shard_bytes=150_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=re.escape(victim.name)):
        telechat.load(tmp_path)


def test_unknown_model_type(tiny_dir, tmp_path):
    d = _tiny_copy(tiny_dir, tmp_path / "t")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="llama"):
        telechat.load(d)


def test_missing_config(tiny_dir, tmp_path):
    d = _tiny_copy(tiny_dir, tmp_path / "c")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        telechat.load(d)


def test_folder_without_weights(tiny_dir, tmp_path):
    d = _tiny_copy(tiny_dir, tmp_path / "w")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        telechat.load(d)
    assert str(d) in str(e.value) and "weights" in str(e.value)


def test_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="nonexistent"):
        telechat.load(tmp_path / "nonexistent")


def test_errors_are_value_errors():
    assert issubclass(CheckpointError, ValueError)


def test_folder_without_tokenizer(tiny_dir, tmp_path):
    d = _tiny_copy(tiny_dir, tmp_path / "nt")
    (d / "tokenizer.model").unlink()
    llm = telechat.load(d)
    assert llm.tokenizer is None
    assert llm.chat_format == "none"
    assert torch.equal(logits(llm), logits(telechat.load(tiny_dir)))


# ---- memory: shard-by-shard loading ---------------------------------------------------------------
# ru_maxrss survives fork+exec (Linux keeps the parent's high-water mark), so the measuring process is
# started by a small launcher process, not by pytest directly.
MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys
    import torch, telechat
    torch.set_num_threads(1)
    # One-off lazy imports, not proportional to the model: building any model on the meta device
    # makes torch import torch._dynamo (~70 MB). Pay them before the baseline.
    with torch.device("meta"):
        telechat.TeleChat(telechat.preset("tiny"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    llm = telechat.load(sys.argv[1])
    # Weights may be memory-mapped from the shards: touch every one so they are really resident.
    with torch.no_grad():
        for p in llm.model.parameters():
            p.sum()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    print(before, after, n)
""")
LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c'] + sys.argv[1:]))"


@pytest.mark.slow
def test_peak_memory_shard_by_shard(tmp_path):
    llm = telechat.from_preset("small", vocab_size=16000, hidden_size=512, n_layer=7, n_head=8,
                               ffn_hidden_size=1408, tie_word_embeddings=False)
    nbytes = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    assert 140e6 < nbytes < 170e6
    llm.save(tmp_path, max_shard_bytes=nbytes // 4 + 4 * 1024 * 1024)
    files = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(files) == 4, [f.name for f in files]
    del llm
    r = subprocess.run([sys.executable, "-c", LAUNCHER, MEMORY_SCRIPT, str(tmp_path)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    before, after, n = map(int, r.stdout.split())
    assert n == nbytes
    growth = (after - before) * 1024  # ru_maxrss is in KiB on Linux
    assert growth > 0.8 * nbytes, (before, after)  # the weights really are in memory (and measured)
    assert growth < 1.5 * nbytes, f"peak RSS grew by {growth / 1e6:.0f} MB for a {nbytes / 1e6:.0f} MB model"


def test_safetensors_win_over_a_stale_bin_index(tiny_dir, tmp_path):
    # Saving over an official .bin checkpoint leaves its index behind; the new weights must load.
    d = _tiny_copy(tiny_dir, tmp_path / "mixed")
    llm = telechat.load(d)
    sd = {k: v.clone() for k, v in llm.model.state_dict().items()}
    torch.save({k: torch.zeros_like(v) for k, v in sd.items()}, d / "pytorch_model-00001-of-00001.bin")
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: "pytorch_model-00001-of-00001.bin" for k in sd}}))
    assert torch.equal(logits(telechat.load(d)), logits(llm))

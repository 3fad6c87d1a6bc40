"""Rotary scaling modes (against transformers and float64 formulas) and the long-context tasks
(`telechat eval --tasks longppl,passkey`) against plain whole-sequence forwards."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import telechat
from telechat.cli import main
from telechat.config import ROPE_SCALING_TYPES, ConfigError
from telechat.eval.long import PASSKEY_FILLER, PASSKEY_INTRO, greedy, passkey_prompt, rope_scaling, tail_perplexity
from telechat.rope import inv_frequencies, rope_cos_sin


def _config(head_dim=64, theta=100000.0, train=8192, mode="yarn"):
    return telechat.TeleChatConfig(vocab_size=64, hidden_size=2 * head_dim, n_layer=1, n_head=2, ffn_hidden_size=8,
                                   training_seqlen=train, seq_length=train, base_seqlen=train, rope_theta=theta,
                                   rope_scaling_type=mode)


def _yarn_float64(d: int, theta: float, train: int, s: float) -> tuple[np.ndarray, float]:
    """YaRN from its formulas, in float64: the correction dimension of b rotations over the training
    length is d ln(L / (2 pi b)) / (2 ln theta); between floor(dim(32)) and ceil(dim(1)) a linear ramp
    mixes the original frequency (below) with the frequency divided by s (above); mscale 0.1 ln s + 1."""
    theta_i = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    dim_of = lambda b: d * math.log(train / (2 * math.pi * b)) / (2 * math.log(theta))  # noqa: E731
    lo, hi = max(math.floor(dim_of(32)), 0), min(math.ceil(dim_of(1)), d - 1)
    gamma = np.clip((np.arange(d // 2) - lo) / max(hi - lo, 1e-3), 0, 1)  # 0: keep, 1: interpolate
    return theta_i * (1 - gamma) + theta_i / s * gamma, 0.1 * math.log(s) + 1


@pytest.mark.parametrize("d, theta, train", [(64, 100000.0, 8192), (128, 10000.0, 4096), (16, 10000.0, 256)])
@pytest.mark.parametrize("s", [1.5, 2.0, 4.0, 8.25])
def test_yarn_is_exact_to_float64_and_matches_transformers(d, theta, train, s):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    c = _config(d, theta, train)
    total = round(s * train)
    scaling = c.rope_scaling(total)
    assert scaling.yarn_factor == total / train and scaling.base == theta
    ours = inv_frequencies(c, scaling).double().numpy()
    ref, mscale = _yarn_float64(d, theta, train, total / train)
    np.testing.assert_allclose(ours, ref, rtol=1e-7, atol=0)
    assert scaling.mscale == pytest.approx(mscale, rel=1e-15)
    hf = LlamaConfig(hidden_size=2 * d, num_attention_heads=2, head_dim=d, max_position_embeddings=total,
                     rope_parameters={"rope_type": "yarn", "rope_theta": theta, "factor": total / train,
                                      "original_max_position_embeddings": train})
    inv, factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    np.testing.assert_allclose(ours, inv.double().numpy(), rtol=2e-6)
    assert factor == pytest.approx(scaling.mscale, rel=1e-12)
    # cos/sin carry mscale on both (q and k: logits scale by mscale^2, as in the paper's sqrt(1/t))
    pos = torch.tensor([0, 1, 100, train - 1])
    cos, sin = rope_cos_sin(c, pos, total)
    angle = pos.double()[:, None] * torch.from_numpy(ref)[None]
    ang = torch.cat([angle, angle], -1)
    torch.testing.assert_close(cos.double(), ang.cos() * mscale, atol=2e-4 * mscale, rtol=0)
    torch.testing.assert_close(sin.double(), ang.sin() * mscale, atol=2e-4 * mscale, rtol=0)


@pytest.mark.parametrize("s", [1.25, 3.0])
def test_dynamic_matches_transformers_dynamic_ntk(s):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    c = _config(64, 10000.0, 2048, mode="dynamic")
    total = round(s * 2048)
    hf = LlamaConfig(hidden_size=128, num_attention_heads=2, head_dim=64, max_position_embeddings=2048,
                     rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 1.0})
    inv, factor = ROPE_INIT_FUNCTIONS["dynamic"](hf, "cpu", seq_len=total)
    torch.testing.assert_close(inv_frequencies(c, c.rope_scaling(total)), inv.float(), rtol=1e-6, atol=0)
    assert factor == 1.0 and c.rope_scaling(total).mscale == 1.0


def test_modes_agree_within_the_training_length_and_differ_past_it():
    tables = {}
    for mode in ROPE_SCALING_TYPES:
        c = _config(32, 10000.0, 512, mode=mode)
        within = rope_cos_sin(c, torch.arange(512), 512)
        past = rope_cos_sin(c, torch.arange(2048), 2048)
        tables[mode] = (within, past)
    for mode in ROPE_SCALING_TYPES:
        torch.testing.assert_close(tables[mode][0], tables["none"][0], rtol=0, atol=0)
    past = {m: torch.cat(t[1]) for m, t in tables.items()}
    for a in ROPE_SCALING_TYPES:
        for b in ROPE_SCALING_TYPES:
            if a < b:
                assert not torch.allclose(past[a], past[b]), (a, b)
    # ntk and ntk-mscale share the base; mscale is TeleChat's 0.1 ln(L / T) + 1
    c = _config(32, 10000.0, 512, mode="ntk-mscale")
    assert c.rope_scaling(2048).mscale == pytest.approx(0.1 * math.log(4) + 1)
    assert c.rope_scaling(2048).base == _config(32, 10000.0, 512, mode="ntk").rope_scaling(2048).base


def test_rope_scaling_type_in_config_json_and_load(tiny_dir, tmp_path):
    assert "rope_scaling_type" not in telechat.TeleChatConfig.from_json(tiny_dir / "config.json").to_dict()
    c = _config(mode="yarn")
    assert c.to_dict()["rope_scaling_type"] == "yarn"
    assert telechat.TeleChatConfig.from_dict(c.to_dict()).rope_scaling_type == "yarn"
    with pytest.raises(ConfigError, match="rope_scaling_type must be one of none, ntk, ntk-mscale, dynamic, yarn"):
        _config(mode="linear")
    assert telechat.load(tiny_dir, dtype="float32", rope_scaling="yarn").config.rope_scaling_type == "yarn"
    assert telechat.load(tiny_dir, dtype="float32").info()["rope_scaling"] == "ntk-mscale"
    with pytest.raises(ValueError, match="rope_scaling must be one of"):
        telechat.load(tiny_dir, rope_scaling="ntk_mscale")


# ---- longppl -------------------------------------------------------------------------------------
def _tail_ppl_whole(model, ids, tail):
    """The reference: one forward over the whole prefix (its rotary tables scaled for its length)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0].double()
    L = len(ids)
    return math.exp(F.cross_entropy(logits[L - tail - 1:L - 1], torch.tensor(ids[L - tail:]), reduction="mean"))


def _sharpened(llm):
    """Random weights attend almost uniformly, so positions would hardly matter: sharpen attention
    and outputs so that a wrong rotary table changes the perplexity."""
    with torch.no_grad():
        for block in llm.model.transformer.h:
            block.self_attention.query.weight.mul_(6)
            block.self_attention.key_value.weight.mul_(6)
        llm.model.lm_head.weight.mul_(8)
    return llm


@pytest.mark.parametrize("mode", ROPE_SCALING_TYPES)
def test_tail_perplexity_in_chunks_equals_one_forward(tiny_dir, mode, monkeypatch):
    llm = _sharpened(telechat.load(tiny_dir, dtype="float32", rope_scaling=mode))
    ids = torch.randint(4, llm.config.vocab_size, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    want = _tail_ppl_whole(llm.model, ids, 100)  # 300 tokens: past the tiny model's 32-token training length
    assert tail_perplexity(llm.model, ids, 100) == pytest.approx(want, rel=1e-5)
    import telechat.eval.long as long_mod

    monkeypatch.setattr(long_mod, "prefill_chunk", lambda context, n_head: 37)  # many chunks, ragged last one
    assert tail_perplexity(llm.model, ids, 100) == pytest.approx(want, rel=1e-5)


def test_rope_scaling_context_restores_the_mode(tiny_dir):
    llm = telechat.load(tiny_dir, dtype="float32")
    with rope_scaling(llm.model, "yarn"):
        assert llm.config.rope_scaling_type == "yarn"
    assert llm.config.rope_scaling_type == "ntk-mscale"
    with pytest.raises(ValueError, match="rope scaling must be one of"):
        with rope_scaling(llm.model, "linear"):
            pass


# ---- passkey -------------------------------------------------------------------------------------
def test_passkey_prompt_length_and_depth(tiny_dir):
    tok = telechat.load(tiny_dir, dtype="float32").tokenizer
    for length in (1000, 3000):
        for depth in (0.1, 0.5, 0.9):
            ids = passkey_prompt(tok, length, depth, "12345")
            assert abs(len(ids) - length) <= 0.05 * length + 8
            text = tok.decode(ids)
            at = text.index("The pass key is 12345.")
            before, total = text[:at].count(PASSKEY_FILLER), text.count(PASSKEY_FILLER)
            assert total >= 2 and abs(before - depth * total) <= 0.5
            assert text.startswith(PASSKEY_INTRO.strip()) and text.endswith("What is the pass key? The pass key is")


def test_engine_greedy_past_the_context_grows_its_pool_and_matches_plain_forwards(tiny_dir):
    llm = _sharpened(telechat.load(tiny_dir, dtype="float32", rope_scaling="yarn"))
    prompts = [passkey_prompt(llm.tokenizer, n, 0.5, "54321") for n in (150, 400)]  # past seq_length (32)
    out = greedy(llm, prompts, 4)
    assert len({t for row in out for t in row}) >= 2  # not one token repeated
    for p, got in zip(prompts, out):
        ids = list(p)
        for _ in range(4):  # the same rule: the prompt scaled for its length, each new token for its own
            with torch.no_grad():
                ids.append(int(llm.model(torch.tensor([ids]))[0, -1].argmax()) if len(ids) == len(p) else
                           int(_next_token(llm.model, ids, len(p))))
        assert got == ids[len(p):]


def _next_token(model, ids, prompt_len):
    """Greedy next token where the prompt's keys were rotated for the prompt's length and each
    generated token's for the positions existing when it was made (the engine's rule)."""
    from telechat.kv import DenseKV

    c = model.config
    cache = DenseKV(c, 1, len(ids), model.dtype)
    pos = torch.arange(prompt_len)
    model(torch.tensor([ids[:prompt_len]]), cache=cache.at(pos, prompt_len), rope=rope_cos_sin(c, pos, prompt_len))
    logits = None
    for i in range(prompt_len, len(ids)):
        p = torch.tensor([i])
        logits = model(torch.tensor([[ids[i]]]), cache=cache.at(p, i + 1), rope=rope_cos_sin(c, p, i + 1))
    return logits[0, -1].argmax()


# ---- the command ---------------------------------------------------------------------------------
def test_eval_longppl_and_passkey_command(tiny_dir, tmp_path, capsys):
    text = tmp_path / "book.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. 今天天气很好，我们去公园散步吧。\n" * 200,
                    encoding="utf-8")
    out = tmp_path / "r.json"
    rc = main(["eval", "--model", str(tiny_dir), "--dtype", "float32", "--tasks", "longppl,passkey",
               "--long-text", str(text), "--lengths", "300,600", "--rope-scaling", "none,ntk-mscale,yarn",
               "--ppl-tail", "64", "--passkey-trials", "2", "--no-progress", "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| longppl (ppl) | none | ntk-mscale | yarn |" in printed and "| passkey (accuracy) |" in printed
    report = json.loads(out.read_text())
    rows = report["results"]["longppl"]["rows"]
    assert [(r["length"], r["rope_scaling"]) for r in rows] == \
        [(n, m) for n in (300, 600) for m in ("none", "ntk-mscale", "yarn")]
    llm = telechat.load(tiny_dir, dtype="float32")
    ids = llm.tokenizer.encode(text.read_text(encoding="utf-8"))
    for r in rows:
        llm.config.rope_scaling_type = r["rope_scaling"]
        assert r["ppl"] == pytest.approx(_tail_ppl_whole(llm.model, ids[:r["length"]], 64), rel=1e-4)
        assert f"{r['ppl']:.3f}" in printed
    keys = report["results"]["passkey"]["rows"]
    assert [(r["length"], r["rope_scaling"]) for r in keys] == [(n, m) for n in (300, 600)
                                                                for m in ("none", "ntk-mscale", "yarn")]
    for r in keys:
        assert r["accuracy"] == sum(i["correct"] for i in r["items"]) / 2
        assert all(i["correct"] == (i["key"] in i["answer"][:8]) or not i["correct"] for i in r["items"])


@pytest.mark.parametrize("args, message", [
    (["--tasks", "longppl"], "longppl needs --long-text FILE"),
    (["--tasks", "longppl", "--long-text", "/nonexistent.txt"], "--long-text file not found"),
    (["--tasks", "passkey", "--lengths", "100,abc"], "--lengths must be comma-separated integers"),
    (["--tasks", "passkey", "--lengths", "200"], "--lengths must exceed the scored tail of 256 tokens"),
    (["--tasks", "passkey", "--rope-scaling", "none,linear"], "--rope-scaling: linear unknown"),
    (["--tasks", "passkey,mmlu", "--rope-scaling", "none,yarn"], "--data-dir is needed for mmlu"),
    (["--tasks", "mmlu", "--data-dir", ".", "--rope-scaling", "none,yarn"], "several --rope-scaling modes"),
])
def test_eval_long_errors_before_loading(args, message, capsys, tmp_path):
    assert main(["eval", "--model", str(tmp_path / "never-loaded"), *args]) != 0
    assert message in capsys.readouterr().err


def test_eval_long_text_too_short(tiny_dir, tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("only a few words", encoding="utf-8")
    assert main(["eval", "--model", str(tiny_dir), "--tasks", "longppl", "--long-text", str(text),
                 "--lengths", "300", "--no-progress"]) != 0
    assert "fewer than the longest --lengths (300)" in capsys.readouterr().err


@pytest.mark.slow
def test_default_model_finds_the_passkey_within_its_context(default_llm):
    """The task can succeed: the default model (trained to 8K) recalls every passkey of 1K-token prompts,
    and a prompt without the passkey sentence gives no 5-digit answer that matches."""
    from telechat.eval.long import run_passkey

    rows = run_passkey(default_llm, [1024], [None], trials=3, seed=1)
    assert rows[0]["accuracy"] == 1.0, rows[0]["items"]
    assert all(i["answer"].strip().startswith(i["key"]) for i in rows[0]["items"])
    tok = default_llm.tokenizer
    blank = tok.encode(tok.decode(passkey_prompt(tok, 1024, 0.5, "12345")).replace("12345", "the number"))
    assert "12345" not in tok.decode(greedy(default_llm, [blank], 8)[0])

"""Against the published TeleChat code: tests/data/oracle_v12 is a tiny checkpoint in the official
12B layout (untied, two .bin shards and their index) with the logits and greedy tokens that code
computed (copied from ../shared/oracle/v12, so the parity checks run on any clone and never skip)."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import telechat

ORACLE = Path(__file__).parent / "data" / "oracle_v12"


@pytest.fixture(scope="module")
def oracle():
    return telechat.load(ORACLE, dtype="float32"), load_file(str(ORACLE / "vectors.safetensors"))


def rel_err(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("name", ["short", "long"])
def test_logits_match_published_code(oracle, name):
    llm, v = oracle
    ref = v[f"logits_{name}"]
    with torch.inference_mode():
        out = llm.model(v[f"ids_{name}"])
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-3
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_long_sequence_uses_ntk_scaling(oracle):
    # 80 tokens with training_seqlen 32: alpha 7 and mscale > 1 must be applied to match.
    llm, v = oracle
    base, mscale, _ = llm.config.rope_scaling(80)
    assert mscale > 1 and base > llm.config.rope_theta
    with torch.inference_mode():
        out = llm.model(v["ids_long"])
        cfg = llm.config
        saved = cfg.training_seqlen, cfg.base_seqlen
        cfg.training_seqlen, cfg.base_seqlen = 10**6, 10**6  # scaling off: must no longer match
        try:
            unscaled = llm.model(v["ids_long"])
        finally:
            cfg.training_seqlen, cfg.base_seqlen = saved
    assert rel_err(out, v["logits_long"]) < 1e-3 < rel_err(unscaled, v["logits_long"])


def test_greedy_with_kv_cache_matches(oracle):
    llm, v = oracle
    out = llm.generate(v["gen_prompt"], max_new_tokens=v["gen_greedy"].shape[1] - v["gen_prompt"].shape[1],
                       do_sample=False, eos_token_id=-1)
    assert torch.equal(out, v["gen_greedy"])


def test_published_shards_and_index_are_read(oracle):
    llm, _ = oracle
    assert llm.config.tie_word_embeddings is False
    assert llm.tokenizer is None
    assert not torch.equal(llm.model.lm_head.weight, llm.model.transformer.word_embeddings.weight)

"""TeleChatConfig: the official config.json files, the NTK/mscale rule, presets (spec sections 1 and 3)."""
from __future__ import annotations

import json
import math

import pytest
import torch

import telechat
from telechat import ConfigError, TeleChatConfig
from telechat.checkpoint import to_internal_key

from conftest import shared_path

# Spec section 1: n_layer, hidden, n_head, head_dim, ffn, vocab, tied.
SIZES = {
    "1B": (16, 2048, 32, 64, 5460, 120000, False),
    "7B": (30, 4096, 32, 128, 12288, 160256, True),
    "12B": (38, 5120, 32, 160, 12288, 120000, False),
    "12B-V2": (38, 5120, 32, 160, 12288, 120000, False),
}


def official(name: str) -> TeleChatConfig:
    return TeleChatConfig.from_json(shared_path("telechat-official", name, "config.json"))


def official_dict(name: str) -> dict:
    return json.loads(shared_path("telechat-official", name, "config.json").read_text())


def sizes(c: TeleChatConfig) -> tuple:
    return (c.n_layer, c.hidden_size, c.n_head, c.head_dim, c.ffn_hidden_size, c.vocab_size, c.tie_word_embeddings)


# ---- official configs ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["7B", "12B", "12B-V2"])
def test_official_config_sizes(name):
    c = official(name)
    assert sizes(c) == SIZES[name]
    assert c.layer_norm_epsilon == 1e-5
    assert c.training_seqlen == 8192
    assert c.embed_layernorm is False
    assert c.n_kv_head == c.n_head  # no GQA in TeleChat v1


def test_official_config_via_from_dict_matches_from_json():
    for name in ("7B", "12B"):
        assert TeleChatConfig.from_dict(official_dict(name)) == official(name)


def test_7b_tie_absent_means_tied_12b_untied():
    d7 = official_dict("7B")
    assert "tie_word_embeddings" not in d7  # the premise of the rule
    assert official("7B").tie_word_embeddings is True
    assert official_dict("12B")["tie_word_embeddings"] is False
    assert official("12B").tie_word_embeddings is False
    assert official("12B-V2").tie_word_embeddings is False


def test_7b_dropouts_are_read():
    c = official("7B")
    assert c.hidden_dropout == 0.1 and c.attention_dropout == 0.1
    assert official("12B").hidden_dropout == 0.0


@pytest.mark.parametrize("name,B", [("7B", 4096), ("12B", 8192), ("12B-V2", 8192)])
def test_official_rope_base_seqlen(name, B):
    assert official(name).rope_base_seqlen == B


def test_official_param_count_matches_published_index():
    """total_size of the published fp16 index = 2 bytes x our parameter count; key sets equal."""
    for name in ("7B", "12B", "12B-V2"):
        c = official(name)
        index = json.loads(shared_path("telechat-official", name, "pytorch_model.bin.index.json").read_text())
        assert index["metadata"]["total_size"] == 2 * c.num_parameters(), name
        with torch.device("meta"):
            model = telechat.TeleChat(c)
        ours = set(model.state_dict())
        if c.tie_word_embeddings:
            ours.discard("lm_head.weight")
        assert {to_internal_key(k) for k in index["weight_map"]} == ours, name


# ---- base length rule ------------------------------------------------------------------------------
def test_rope_base_seqlen_rule():
    base = dict(hidden_size=64, n_layer=1, n_head=4)
    assert TeleChatConfig.from_dict({**base, "vocab_size": 160256}).rope_base_seqlen == 4096
    assert TeleChatConfig.from_dict({**base, "vocab_size": 120000}).rope_base_seqlen == 8192
    assert TeleChatConfig.from_dict({**base, "vocab_size": 512}).rope_base_seqlen == 8192
    # base_seqlen from config.json wins, for either family.
    assert TeleChatConfig.from_dict({**base, "vocab_size": 160256, "base_seqlen": 2048}).rope_base_seqlen == 2048
    assert TeleChatConfig.from_dict({**base, "vocab_size": 120000, "base_seqlen": 16384}).rope_base_seqlen == 16384


# ---- NTK alpha and mscale --------------------------------------------------------------------------
def test_rope_scaling_12b_alpha_one_up_to_training_length():
    c = official("12B")
    for L in (1, 7, 512, 4096, 8191, 8192):
        base, mscale, _ = c.rope_scaling(L)
        assert base == pytest.approx(10000.0, rel=1e-12), L
        assert mscale == 1.0, L


def test_rope_scaling_12b_just_past_training_length():
    c = official("12B")
    base, mscale, _ = c.rope_scaling(8193)
    assert base == pytest.approx(10000 * 3 ** (160 / 158), rel=1e-12)
    assert mscale == pytest.approx(0.1 * math.log(8193 / 8192) + 1, rel=1e-12)
    assert mscale > 1.0
    # 16384 is still alpha 3 (log2(2)+1 = 2 -> 2^2-1); 16385 goes to alpha 7.
    assert c.rope_scaling(16384)[0] == pytest.approx(10000 * 3 ** (160 / 158), rel=1e-12)
    assert c.rope_scaling(16385)[0] == pytest.approx(10000 * 7 ** (160 / 158), rel=1e-12)
    assert c.rope_scaling(96 * 1024)[1] == pytest.approx(0.1 * math.log(12) + 1, rel=1e-12)


def test_rope_scaling_7b_alpha_three_at_short_lengths():
    c = official("7B")
    for L in (1, 100, 4096, 8192):
        base, mscale, _ = c.rope_scaling(L)
        assert base == pytest.approx(10000 * 3 ** (128 / 126), rel=1e-12), L
        assert base == pytest.approx(30528, abs=1.0)
        assert mscale == 1.0


def test_rope_scaling_tiny():
    c = telechat.preset("tiny")
    assert (c.training_seqlen, c.rope_base_seqlen, c.head_dim) == (32, 32, 16)
    base, mscale, _ = c.rope_scaling(80)
    assert base == pytest.approx(10000 * 7 ** (16 / 14), rel=1e-12)  # alpha 7
    assert mscale == pytest.approx(0.1 * math.log(80 / 32) + 1, rel=1e-12)
    # Below the training length: L' = T = B -> alpha 2^1 - 1 = 1, mscale 1.
    assert c.rope_scaling(5) == (pytest.approx(10000.0), 1.0, 1.0)
    assert c.rope_scaling(32) == (pytest.approx(10000.0), 1.0, 1.0)
    # 33..64 -> alpha 3.
    assert c.rope_scaling(33)[0] == pytest.approx(10000 * 3 ** (16 / 14), rel=1e-12)
    assert c.rope_scaling(64)[0] == pytest.approx(10000 * 3 ** (16 / 14), rel=1e-12)


def test_rope_theta_is_the_base_of_scaling():
    c = TeleChatConfig.from_dict({"vocab_size": 100, "hidden_size": 64, "n_layer": 1, "n_head": 4,
                                  "rope_theta": 500000.0, "training_seqlen": 32, "base_seqlen": 32})
    assert c.rope_scaling(10)[0] == pytest.approx(500000.0)


# ---- parsing -------------------------------------------------------------------------------------
def test_aliases():
    c = TeleChatConfig.from_dict({"vocab_size": 1000, "hidden_size": 128, "num_hidden_layers": 3,
                                  "num_attention_heads": 8, "ffn_hidden_size": 256})
    assert (c.n_layer, c.n_head, c.head_dim) == (3, 8, 16)
    # The alias is not kept as an extra field (it would shadow n_layer on a round trip).
    assert "num_hidden_layers" not in c.extra and "num_attention_heads" not in c.extra
    # When both are present, the TeleChat name wins.
    c2 = TeleChatConfig.from_dict({"vocab_size": 1000, "hidden_size": 128, "n_layer": 2, "num_hidden_layers": 5,
                                   "n_head": 4, "num_attention_heads": 8})
    assert (c2.n_layer, c2.n_head) == (2, 4)


def test_ffn_default_when_absent():
    c = TeleChatConfig.from_dict({"vocab_size": 1000, "hidden_size": 128, "n_layer": 1, "n_head": 4})
    assert c.ffn_hidden_size == 4 * 128


def test_unknown_model_type_raises_naming_it():
    d = {"vocab_size": 1000, "hidden_size": 128, "n_layer": 1, "n_head": 4, "model_type": "llama"}
    with pytest.raises(ConfigError, match="llama"):
        TeleChatConfig.from_dict(d)


def test_unknown_model_type_from_json_names_file_and_type(tmp_path):
    d = official_dict("12B")
    d["model_type"] = "qwen2"
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        TeleChatConfig.from_json(p)
    assert "qwen2" in str(e.value) and str(p) in str(e.value)


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "n_layer", "n_head"])
def test_missing_required_field_named(field):
    d = {"vocab_size": 1000, "hidden_size": 128, "n_layer": 1, "n_head": 4}
    del d[field]
    with pytest.raises(ConfigError, match=field):
        TeleChatConfig.from_dict(d)


def test_from_json_errors(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        TeleChatConfig.from_json(tmp_path / "config.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json"):
        TeleChatConfig.from_json(bad)


def test_hidden_not_divisible_by_heads():
    with pytest.raises(ConfigError, match="divisible"):
        TeleChatConfig.from_dict({"vocab_size": 10, "hidden_size": 100, "n_layer": 1, "n_head": 3})


def test_telechat2_fields_accepted():
    c = TeleChatConfig.from_dict({"vocab_size": 1000, "hidden_size": 128, "n_layer": 1, "n_head": 8,
                                  "num_key_value_heads": 2, "rope_theta": 1e6})
    assert c.n_kv_head == 2 and c.rope_theta == 1e6
    with torch.device("meta"):
        m = telechat.TeleChat(c)
    assert m.transformer.h[0].self_attention.key_value.weight.shape == (2 * 2 * 16, 128)


# ---- round trip ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["7B", "12B"])
def test_to_dict_from_dict_round_trip_keeps_extra(name, tmp_path):
    c = official(name)
    d = c.to_dict()
    assert d["model_type"] == "telechat"
    assert d["architectures"] == ["TelechatForCausalLM"]
    assert d["num_hidden_layers"] == c.n_layer and d["num_attention_heads"] == c.n_head
    for key, value in official_dict(name).items():
        if key in ("n_inner",):
            continue
        assert d[key] == value, key  # every official field is written back with its value
    c2 = TeleChatConfig.from_dict(d)
    assert c2 == c
    assert c2.to_dict() == d
    c.save(tmp_path / "config.json")
    assert TeleChatConfig.from_json(tmp_path / "config.json") == c


def test_round_trip_keeps_unknown_fields():
    c = official("12B")
    assert c.extra["logn"] is False and c.extra["offset_alibi"] == 100
    d = c.to_dict()
    assert d["logn"] is False and d["offset_alibi"] == 100 and d["pretraining_tp"] == 2
    c2 = TeleChatConfig.from_dict(d)
    assert c2.extra["logn"] is False and c2.extra["offset_alibi"] == 100
    # Also on a hand-made dict.
    c3 = TeleChatConfig.from_dict({"vocab_size": 10, "hidden_size": 8, "n_layer": 1, "n_head": 2,
                                   "my_field": {"a": [1, 2]}, "logn": True})
    d3 = c3.to_dict()
    assert d3["my_field"] == {"a": [1, 2]} and d3["logn"] is True
    c4 = TeleChatConfig.from_dict(d3)
    assert sizes(c4) == sizes(c3) and c4.extra["my_field"] == {"a": [1, 2]}
    assert c4.to_dict() == d3  # stable after the first write (model_type/architectures added once)


def test_7b_round_trip_stays_tied():
    d = official("7B").to_dict()
    assert d["tie_word_embeddings"] is True
    assert TeleChatConfig.from_dict(d).tie_word_embeddings is True


# ---- presets -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["1B", "7B", "12B", "12B-V2"])
def test_preset_sizes(name):
    c = telechat.preset(name)
    assert sizes(c) == SIZES[name]
    assert c.rope_base_seqlen == (4096 if name == "7B" else 8192)


@pytest.mark.parametrize("name", ["1B", "7B", "12B", "12B-V2", "tiny", "small", "100M"])
def test_preset_num_parameters_matches_meta_model(name):
    c = telechat.preset(name)
    with torch.device("meta"):
        model = telechat.TeleChat(c)
    assert c.num_parameters() == sum(p.numel() for p in model.parameters())


def test_num_parameters_gqa_and_no_bias():
    for overrides in ({"num_key_value_heads": 2}, {"bias": False}, {"tie_word_embeddings": True}):
        c = telechat.preset("tiny", **overrides)
        with torch.device("meta"):
            model = telechat.TeleChat(c)
        assert c.num_parameters() == sum(p.numel() for p in model.parameters()), overrides


def test_preset_matches_official_config():
    for name in ("7B", "12B", "12B-V2"):
        assert sizes(telechat.preset(name)) == sizes(official(name))
        assert telechat.preset(name).num_parameters() == official(name).num_parameters()


def test_preset_overrides_and_unknown():
    assert telechat.preset("tiny", n_layer=5).n_layer == 5
    with pytest.raises(ConfigError, match="nope"):
        telechat.preset("nope")

"""Malformed checkpoint folders: each one is refused with a CheckpointError naming the file or field,
promptly (no hang, no huge allocation), and `telechat info` reports it in one line without a traceback."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import telechat
from telechat import CheckpointError
from telechat.cli import main as cli_main

CASES: dict[str, tuple] = {}


def case(name: str, *expect: str, root_ok: bool = True):
    """Register a way to break a copy of the tiny checkpoint; `expect` must all appear in the error."""
    def register(fn):
        CASES[name] = (fn, expect, root_ok)
        return fn
    return register


def _config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def _set_config(d: Path, **fields):
    cfg = _config(d)
    cfg.update(fields)
    for alias, name in (("num_hidden_layers", "n_layer"), ("num_attention_heads", "n_head")):
        if name in fields:
            cfg[alias] = fields[name]
    (d / "config.json").write_text(json.dumps(cfg))


def _config_case(name, field, value, *expect):
    case(name, "config.json", field, *expect)(lambda d: _set_config(d, **{field: value}))


def _rewrite_weights(d: Path, fn):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(d / "model.safetensors"))
    fn(sd)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})


def _replace_with_dir(f: Path):
    f.unlink()
    f.mkdir()


def _replace_with_fifo(f: Path):
    f.unlink()
    os.mkfifo(f)


def _replace_with_link(f: Path, target: str):
    f.unlink()
    f.symlink_to(target)


DEEP = "[" * 200_000 + "]" * 200_000
DEEP_OBJECT = '{"a":' * 200_000 + "1" + "}" * 200_000

# ---- config.json: wrong JSON types, unreadable files --------------------------------------------
case("config is a list", "config.json", "object")(lambda d: (d / "config.json").write_text("[1, 2]"))
case("config is a string", "config.json", "object")(lambda d: (d / "config.json").write_text('"telechat"'))
case("config is a number", "config.json", "object")(lambda d: (d / "config.json").write_text("42"))
case("config is null", "config.json", "object")(lambda d: (d / "config.json").write_text("null"))
case("config is empty", "config.json")(lambda d: (d / "config.json").write_text(""))
case("config truncated", "config.json")(
    lambda d: (d / "config.json").write_text((d / "config.json").read_text()[:50]))
case("config not utf-8", "config.json")(lambda d: (d / "config.json").write_bytes(b'{"a": "\xff\xfe"}'))
case("config deeply nested list", "config.json", "nest")(lambda d: (d / "config.json").write_text(DEEP))
case("config deeply nested object", "config.json", "nest")(
    lambda d: (d / "config.json").write_text(DEEP_OBJECT))
case("config field deeply nested", "config.json", "nest")(
    lambda d: (d / "config.json").write_text((d / "config.json").read_text()[:-2] + ', "x": ' + DEEP + "}"))
case("config integer of 5000 digits", "config.json")(
    lambda d: (d / "config.json").write_text('{"vocab_size": ' + "9" * 5000 + "}"))
case("config is a directory", "config.json", "directory")(lambda d: _replace_with_dir(d / "config.json"))
case("config is a FIFO", "config.json", "FIFO")(lambda d: _replace_with_fifo(d / "config.json"))
case("config is /dev/zero", "config.json", "device")(lambda d: _replace_with_link(d / "config.json", "/dev/zero"))
case("config symlink loop", "config.json")(lambda d: _replace_with_link(d / "config.json", "config.json"))
case("config dangling symlink", "config.json")(lambda d: _replace_with_link(d / "config.json", "nowhere.json"))
case("config unreadable", "config.json", root_ok=False)(lambda d: (d / "config.json").chmod(0))

# ---- config.json: fields of the wrong type or out of range ---------------------------------------
_config_case("n_head 0", "n_head", 0)
_config_case("n_head negative", "n_head", -4)
_config_case("n_head string", "n_head", "4")
_config_case("n_head null", "n_head", None)
_config_case("hidden_size negative", "hidden_size", -64)
_config_case("hidden_size 0", "hidden_size", 0)
_config_case("hidden_size float", "hidden_size", 64.5)
_config_case("hidden_size NaN", "hidden_size", float("nan"))
_config_case("vocab_size 0", "vocab_size", 0)
_config_case("vocab_size negative", "vocab_size", -512)
_config_case("vocab_size list", "vocab_size", [512])
_config_case("n_layer 0", "n_layer", 0)
_config_case("n_layer negative", "n_layer", -2)
_config_case("n_layer bool", "n_layer", True)
_config_case("n_layer 1e9", "n_layer", 1_000_000_000)
_config_case("n_layer 1e9 as a float", "n_layer", 1e9)
_config_case("n_layer 100000", "n_layer", 100_000)
_config_case("ffn_hidden_size 0", "ffn_hidden_size", 0)
_config_case("ffn_hidden_size negative", "ffn_hidden_size", -176)
_config_case("seq_length 0", "seq_length", 0)
_config_case("training_seqlen negative", "training_seqlen", -32)
_config_case("base_seqlen 0", "base_seqlen", 0)
_config_case("num_key_value_heads 0", "num_key_value_heads", 0)
_config_case("num_key_value_heads not dividing", "num_key_value_heads", 3)
_config_case("layer_norm_epsilon string", "layer_norm_epsilon", "small")
_config_case("layer_norm_epsilon negative", "layer_norm_epsilon", -1e-5)
_config_case("rope_theta 0", "rope_theta", 0)
_config_case("rope_theta infinite", "rope_theta", float("inf"))
_config_case("hidden_dropout 2", "hidden_dropout", 2.0)
_config_case("tie_word_embeddings string", "tie_word_embeddings", "no")
_config_case("bias number", "bias", 3)
_config_case("torch_dtype unknown", "torch_dtype", "int8")
_config_case("torch_dtype number", "torch_dtype", 16)
_config_case("eos_token_id string", "eos_token_id", "</s>")
_config_case("eos_token_id empty list", "eos_token_id", [])
_config_case("model_type list", "model_type", ["telechat"])
_config_case("vocab_size 1e12", "vocab_size", 10**12, "memory")
_config_case("hidden_size 2^20", "hidden_size", 2**20, "memory")
case("quantization_config a list", "quantization_config")(lambda d: _set_config(d, quantization_config=[4]))
case("quantization_config bad damp", "damp_percent")(
    lambda d: _set_config(d, quantization_config={"bits": 4, "group_size": 32, "damp_percent": "x"}))
case("quantization_config bad sink_weight", "meta.sink_weight")(
    lambda d: _set_config(d, quantization_config={"bits": 4, "group_size": 32, "meta": {"sink_weight": "1"}}))
case("quantize_config.json a string", "quantize_config.json")(
    lambda d: (d / "quantize_config.json").write_text('"gptq"'))

# ---- the weight index -------------------------------------------------------------------------------
def _index(d: Path, text: str):
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(text)


INDEX = "model.safetensors.index.json"
case("index is a list", INDEX)(lambda d: _index(d, "[]"))
case("index is a string", INDEX)(lambda d: _index(d, '"model.safetensors"'))
case("index weight_map a list", INDEX, "weight_map")(lambda d: _index(d, '{"weight_map": ["a"]}'))
case("index weight_map missing", INDEX, "weight_map")(lambda d: _index(d, '{"metadata": {}}'))
case("index file names are numbers", INDEX)(lambda d: _index(d, '{"weight_map": {"lm_head.weight": 5}}'))
case("index names a file outside the folder", INDEX)(
    lambda d: _index(d, '{"weight_map": {"lm_head.weight": "../../../../etc/passwd"}}'))
case("index deeply nested", INDEX, "nest")(lambda d: _index(d, DEEP))
case("index is a directory", INDEX)(lambda d: (_index(d, "{}"), _replace_with_dir(d / INDEX)))
case("index is a FIFO", INDEX)(lambda d: (_index(d, "{}"), _replace_with_fifo(d / INDEX)))

# ---- weight files -----------------------------------------------------------------------------------
W = "model.safetensors"
case("weights are a FIFO", W, "FIFO")(lambda d: _replace_with_fifo(d / W))
case("weights are a directory", W, "directory")(lambda d: _replace_with_dir(d / W))
case("weights are /dev/zero", W, "device")(lambda d: _replace_with_link(d / W, "/dev/zero"))
case("weights symlink loop", W)(lambda d: _replace_with_link(d / W, W))
case("weights unreadable", W, root_ok=False)(lambda d: (d / W).chmod(0))
case("weights fail to read (EIO)", W)(lambda d: _replace_with_link(d / W, "/proc/self/mem"))
case("weights truncated", W)(lambda d: (d / W).write_bytes((d / W).read_bytes()[:5000]))
case("weights empty", W)(lambda d: (d / W).write_bytes(b""))
case("weights garbage", W)(lambda d: (d / W).write_bytes(os.urandom(4096)))
case("weights header length huge", W)(
    lambda d: (d / W).write_bytes((2**62).to_bytes(8, "little") + b"{}"))
case("weights header not JSON", W)(lambda d: (d / W).write_bytes((20).to_bytes(8, "little") + b"[" * 20))
case("weights integer dtype", W, "transformer.h.0.mlp.up_proj.weight", "int32")(
    lambda d: _rewrite_weights(d, lambda sd: sd.__setitem__(
        "transformer.h.0.mlp.up_proj.weight", torch.ones(176, 64, dtype=torch.int32))))
case("weights bool dtype", W, "transformer.ln_f.weight", "bool")(
    lambda d: _rewrite_weights(d, lambda sd: sd.__setitem__("transformer.ln_f.weight", torch.ones(64, dtype=torch.bool))))
case("weights missing key", "missing", "transformer.h.1.mlp.up_proj.weight")(
    lambda d: _rewrite_weights(d, lambda sd: sd.pop("transformer.h.1.mlp.up_proj.weight")))
case("weights shape mismatch", "transformer.h.0.mlp.gate_proj.weight", "(176, 64)")(
    lambda d: _rewrite_weights(d, lambda sd: sd.__setitem__("transformer.h.0.mlp.gate_proj.weight", torch.zeros(3, 64))))
case("weights unexpected key", "unexpected", "transformer.h.7.mlp.x.weight")(
    lambda d: _rewrite_weights(d, lambda sd: sd.__setitem__("transformer.h.7.mlp.x.weight", torch.zeros(2))))
case("bin is a pickled list", "pytorch_model.bin")(
    lambda d: ((d / W).unlink(), torch.save([torch.zeros(2)], d / "pytorch_model.bin")))
case("bin is a FIFO", "pytorch_model.bin", "FIFO")(lambda d: ((d / W).unlink(), os.mkfifo(d / "pytorch_model.bin")))

# ---- generation_config.json ------------------------------------------------------------------------
G = "generation_config.json"
case("generation_config a list", G, "object")(lambda d: (d / G).write_text("[1]"))
case("generation_config a string", G, "object")(lambda d: (d / G).write_text('"greedy"'))
case("generation_config deeply nested", G, "nest")(lambda d: (d / G).write_text(DEEP))
case("generation_config a directory", G, "directory")(lambda d: _replace_with_dir(d / G))
case("generation_config a FIFO", G, "FIFO")(lambda d: _replace_with_fifo(d / G))
case("generation_config max_length 0", G, "max_length")(lambda d: (d / G).write_text('{"max_length": 0}'))
case("generation_config max_length string", G, "max_length")(lambda d: (d / G).write_text('{"max_length": "32"}'))
case("generation_config temperature string", G, "temperature")(
    lambda d: (d / G).write_text('{"temperature": "hot", "do_sample": true}'))
case("generation_config top_p 0", G, "top_p")(lambda d: (d / G).write_text('{"top_p": 0}'))
case("generation_config top_k negative", G, "top_k")(lambda d: (d / G).write_text('{"top_k": -5}'))
case("generation_config repetition_penalty 0", G, "repetition_penalty")(
    lambda d: (d / G).write_text('{"repetition_penalty": 0}'))
case("generation_config eos_token_id string", G, "eos_token_id")(
    lambda d: (d / G).write_text('{"eos_token_id": "</s>"}'))

# ---- tokenizer files ----------------------------------------------------------------------------
case("tokenizer.model a FIFO", "tokenizer.model", "FIFO")(lambda d: _replace_with_fifo(d / "tokenizer.model"))
case("tokenizer.model a directory", "tokenizer.model", "directory")(
    lambda d: _replace_with_dir(d / "tokenizer.model"))
case("tokenizer_config.json a FIFO", "tokenizer_config.json", "FIFO")(
    lambda d: _replace_with_fifo(d / "tokenizer_config.json"))


# ---- the checks -------------------------------------------------------------------------------------
class Hung(Exception):
    pass


# Frees a reader blocked on a FIFO of the folder by opening it for writing, after a delay. A separate
# process, because a native open() (Rust, C++) holds the GIL and retries on EINTR: no thread or signal
# handler of the blocked process would ever run.
UNBLOCK = """
import os, sys, time
from pathlib import Path
folder, seconds, marker = Path(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
time.sleep(seconds)
marker.write_text("blocked")
while True:
    for p in folder.rglob("*"):
        if p.is_fifo():
            try:
                os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
    time.sleep(0.2)
"""


@contextlib.contextmanager
def deadline(seconds: int, folder: Path):
    """Turn a hang into a failure: SIGALRM stops Python code (a huge model being built), and a helper
    process frees a reader blocked on one of the folder's FIFOs."""
    def alarm(signum, frame):
        raise Hung(f"still running after {seconds}s")

    marker = folder.parent / f"{folder.name}.blocked"
    helper = None
    if any(p.is_fifo() for p in folder.rglob("*")):
        helper = subprocess.Popen([sys.executable, "-c", UNBLOCK, str(folder), str(seconds), str(marker)])
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        if helper is not None:
            helper.kill()
            helper.wait()
    if marker.exists():
        raise Hung(f"blocked on a FIFO for more than {seconds}s")


def make_case(name: str, tiny_dir: Path, tmp_path: Path) -> tuple[Path, tuple[str, ...]]:
    fn, expect, root_ok = CASES[name]
    if not root_ok and os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, d)
    fn(d)
    return d, expect


def test_case_count():
    assert len(CASES) >= 100  # the README's "cases tried" figure counts these


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_checkpoint_refused(name, tiny_dir, tmp_path, capsys):
    d, expect = make_case(name, tiny_dir, tmp_path)
    with deadline(60, d), pytest.raises(CheckpointError) as e:
        telechat.load(d)
    msg = str(e.value)
    for s in expect:
        assert s in msg, msg
    assert "\n" not in msg
    capsys.readouterr()
    with deadline(60, d):
        rc = cli_main(["info", "--model", str(d)])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for s in expect:
        assert s in err


@pytest.mark.parametrize("name", ["weights are a FIFO", "n_layer 1e9", "config deeply nested list"])
def test_cli_info_reports_one_line(name, tiny_dir, tmp_path):
    d, expect = make_case(name, tiny_dir, tmp_path)
    r = subprocess.run([sys.executable, "-c", "import sys; from telechat.cli import main; sys.exit(main())",
                        "info", "--model", str(d)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert all(s in lines[0] for s in expect), lines[0]



# ---- `telechat import` of a malformed HF folder -------------------------------------------------------
LLAMA = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
         "num_attention_heads": 4, "intermediate_size": 48}
IMPORT_CASES = {
    "config a list": ("[1]", "object"),
    "config deeply nested": (DEEP, "nest"),
    "heads 0": ({**LLAMA, "num_attention_heads": 0}, "num_attention_heads"),
    "hidden_size a string": ({**LLAMA, "hidden_size": "32"}, "hidden_size"),
    "vocab_size missing": ({k: v for k, v in LLAMA.items() if k != "vocab_size"}, "vocab_size"),
    "vocab_size negative": ({**LLAMA, "vocab_size": -3}, "vocab_size"),
    "rope_theta a string": ({**LLAMA, "rope_theta": "x"}, "config.json"),
    "rope_parameters a list": ({**LLAMA, "rope_parameters": [1]}, "rope_parameters"),
    "config a FIFO": (None, "FIFO"),
}


@pytest.mark.parametrize("name", list(IMPORT_CASES))
def test_malformed_import_source_refused(name, tmp_path, capsys):
    from safetensors.torch import save_file

    config, expect = IMPORT_CASES[name]
    src = tmp_path / "src"
    src.mkdir()
    if config is None:
        os.mkfifo(src / "config.json")
    else:
        (src / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    save_file({"x": torch.zeros(1)}, str(src / "model.safetensors"))
    with deadline(60, src):
        rc = cli_main(["import", str(src), "--output", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "config.json" in err and expect in err, err
    assert not (tmp_path / "out").exists()

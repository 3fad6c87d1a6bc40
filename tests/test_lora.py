"""LoRA and QLoRA on PEFT: `telechat train --lora-dim`, PEFT's adapter format, `telechat merge`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import telechat
from telechat import cli
from telechat.data.prepare import prepare_sft
from telechat.lora import (AdapterError, FrozenQuantMatmul, add_lora, apply_adapter, load_adapter, merge_lora,
                           read_adapter_config)
from telechat.train import TrainConfig, latest_checkpoint, train
from telechat.train.trainer import load_trainer_state

pytest.importorskip("peft")

QA = [("你好", "你好！我是TeleChat。"), ("What is the capital of France?", "Paris is the capital of France."),
      ("Count to three.", "One, two, three."), ("Say hello.", "Hello, world!"),
      ("今天天气怎么样？", "今天天气很好，我们去公园散步吧。"), ("北京是中国的首都吗？", "是的，北京是中国的首都。")]
IDS = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 11, 60, 8]])


@pytest.fixture(scope="module")
def sft(tmp_path_factory, sp_model) -> Path:
    d = tmp_path_factory.mktemp("lora_sft")
    (d / "a.jsonl").write_text("\n".join(json.dumps({"input": f"<_user>{q}", "output": a}, ensure_ascii=False)
                                         for q, a in QA) + "\n", encoding="utf-8")
    (d / "data.json").write_text(json.dumps({"a.jsonl": 4}))
    prepare_sft(d / "data.json", sp_model, 64, d / "out", num_samples=32, seed=0)
    return d / "out"


def cfg(data, out, model, **kw) -> TrainConfig:
    base = dict(stage="sft", data=str(data), output=str(out), model=str(model), max_steps=4, learning_rate=1e-2,
                per_device_batch_size=4, progress=False, eval_fraction=0.0, lora_dim=4, lora_scaling=8.0,
                only_optimize_lora=True)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(sft, tiny_dir, tmp_path_factory) -> Path:
    """A LoRA checkpoint (adapter only) after 4 steps on the tiny model."""
    out = tmp_path_factory.mktemp("lora_run") / "run"
    train(cfg(sft, out, tiny_dir))
    return latest_checkpoint(out)


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).float()


def test_checkpoint_is_a_peft_adapter_and_the_base_is_untouched(trained, tiny_dir):
    names = {p.name for p in trained.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"} <= names
    assert not any(n.startswith("model") for n in names)  # --only-optimize-lora: the adapter alone
    c = json.loads((trained / "adapter_config.json").read_text())
    assert c["peft_type"] == "LORA" and c["r"] == 4 and c["lora_alpha"] == 8.0
    assert c["base_model_name_or_path"] == str(Path(tiny_dir).resolve())
    assert len(c["target_modules"]) == 2 * 6  # every attention and MLP projection of both blocks
    from safetensors import safe_open
    with safe_open(str(trained / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
        b = f.get_tensor("base_model.model.transformer.h.0.self_attention.query.lora_B.weight")
    assert keys[0].startswith("base_model.model.transformer.h.0.") and len(keys) == 24
    assert b.abs().max() > 0  # trained (B starts at zero)


def test_peft_over_transformers_gives_our_logits(trained, tiny_dir):
    """PEFT loads the adapter over the transformers model of the base folder: same logits as ours, with
    the adapter kept beside the layers and merged into them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_dir), trust_remote_code=True, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, str(trained)).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=IDS).logits.float()
    base = telechat.load(tiny_dir, dtype=torch.float32)
    plain = logits(base.model)
    beside = logits(apply_adapter(telechat.load(tiny_dir, dtype=torch.float32), trained, merge=False).model)
    merged = logits(apply_adapter(telechat.load(tiny_dir, dtype=torch.float32), trained).model)
    assert (theirs - plain).abs().max() > 1e-3  # the adapter changes the function
    torch.testing.assert_close(beside, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged, theirs, atol=1e-5, rtol=0)


def test_scaling_is_alpha_over_rank(tiny_dir):
    """--lora-scaling S scales the update by S / R, as TeleChat's (DeepSpeed-Chat's) LoRA does."""
    llm = telechat.load(tiny_dir, dtype=torch.float32)
    add_lora(llm.model, 4, 8.0, "query", only_lora=True)
    layer = llm.model.transformer.h[0].self_attention.query
    assert layer.scaling["default"] == pytest.approx(8.0 / 4)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(3, 64)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.get_base_layer()(x) + 2.0 * x @ a.t() @ b.t()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_merge_cli_writes_the_official_layout(trained, tiny_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    assert cli.main(["merge", "--model", str(tiny_dir), "--adapter", str(trained), "--output", str(out)]) == 0
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert not (out / "adapter_config.json").exists()
    merged = telechat.load(out)
    assert merged.tokenizer is not None and merged.dtype == telechat.load(tiny_dir).dtype
    with_adapter = apply_adapter(telechat.load(tiny_dir, dtype=torch.float32), trained, merge=False)
    torch.testing.assert_close(logits(merged.model), logits(with_adapter.model), atol=1e-5, rtol=0)
    assert set(merged.model.state_dict()) == set(telechat.load(tiny_dir).model.state_dict())


def test_only_optimize_lora_or_everything_else_too(sft, tiny_dir, tmp_path):
    base = telechat.load(tiny_dir).model.state_dict()
    train(cfg(sft, tmp_path / "lora_only", tiny_dir, max_steps=2))
    s = train(cfg(sft, tmp_path / "all", tiny_dir, max_steps=2, only_optimize_lora=False))
    ckpt = Path(s["checkpoint"])
    # TeleChat's semantics: the wrapped weights stay frozen, the rest (norms, embeddings, biases) trains,
    # so the checkpoint holds those weights beside the adapter
    assert (ckpt / "adapter_config.json").exists() and (ckpt / "model.safetensors").exists()
    after = telechat.load(ckpt).model.state_dict()
    assert torch.equal(after["transformer.h.0.self_attention.query.weight"],
                       base["transformer.h.0.self_attention.query.weight"])
    assert not torch.equal(after["transformer.h.0.input_layernorm.weight"], base["transformer.h.0.input_layernorm.weight"])
    assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    with pytest.raises(AdapterError, match="--model"):  # merging it over the original base would lose them
        telechat.lora.merge(tiny_dir, ckpt, tmp_path / "m")
    telechat.lora.merge(ckpt, ckpt, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()


@pytest.mark.slow
def test_lora_resume_is_exact_after_sigkill(sft, tiny_dir, tmp_path):
    args = [sys.executable, "-m", "telechat.cli", "train", "--stage", "sft", "--data", str(sft), "--model",
            str(tiny_dir), "--max-steps", "8", "--save-steps", "2", "--learning-rate", "1e-2", "--no-progress",
            "--per-device-batch-size", "2", "--lora-dim", "4", "--lora-scaling", "8", "--only-optimize-lora",
            "--threads", "1"]
    ref = tmp_path / "ref"
    subprocess.run(args + ["--output", str(ref)], check=True, capture_output=True, timeout=300)
    out = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoint-0000004" / "trainer_state.pt").exists():
        assert time.time() < deadline and proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoint-0000008").exists()
    subprocess.run(args + ["--output", str(out), "--resume"], check=True, capture_output=True, timeout=300)
    _assert_same_run(ref, out)


def _assert_same_run(ref: Path, out: Path) -> None:
    def losses(run):
        return [(h["step"], h["loss"]) for h in load_trainer_state(latest_checkpoint(run))["history"]]
    assert losses(out) == losses(ref) and len(losses(ref)) == 8  # bit for bit
    from safetensors.torch import load_file
    a = load_file(str(latest_checkpoint(ref) / "adapter_model.safetensors"))
    b = load_file(str(latest_checkpoint(out) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
# ZeRO 1 stands for 1 and 2 (one optimizer class, one checkpoint format) and 3 for partitioned
# parameters; ZeRO 0 is plain data parallelism. Each case is three DeepSpeed launches (~70 s here).
@pytest.mark.parametrize("zero", [1, 3])
def test_lora_under_deepspeed_resumes_exactly_after_sigkill(sft, tiny_dir, tmp_path, zero):
    pytest.importorskip("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "telechat.cli", "train", "--stage", "sft", "--data", str(sft), "--model",
            str(tiny_dir), "--max-steps", "8", "--learning-rate", "1e-2", "--per-device-batch-size", "2", "--nproc",
            "2", "--zero-stage", str(zero), "--save-steps", "4", "--no-progress", "--lora-dim", "4",
            "--lora-scaling", "8", "--only-optimize-lora"]
    ref = tmp_path / "ref"
    r = subprocess.run(args + ["--output", str(ref)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*")) if shm.is_dir() else set()
    out = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--output", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "latest").exists():
        assert time.time() < deadline and proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait()
    for f in (set(shm.glob("deepspeed_allreduce_buffer_*")) if shm.is_dir() else set()) - before:
        f.unlink(missing_ok=True)
    assert latest_checkpoint(out).name == "checkpoint-0000004"
    r = subprocess.run(args + ["--output", str(out), "--resume"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_run(ref, out)
    ckpt = latest_checkpoint(out)
    frozen = [p for p in (ckpt / "deepspeed").rglob("*model_states.pt")]
    assert frozen and all(f.stat().st_size < 2_000_000 for f in frozen)  # the frozen base is not saved again
    llm = apply_adapter(telechat.load(tiny_dir, dtype=torch.float32), ckpt)
    assert torch.isfinite(logits(llm.model)).all()


# ---- QLoRA -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def int4_dir(tiny_dir, tmp_path_factory) -> Path:
    from telechat.quant import QuantConfig, quantize

    out = tmp_path_factory.mktemp("int4") / "q"
    quantize(tiny_dir, out, QuantConfig(bits=4, group_size=16, method="rtn"), dtype="float32", progress=False)
    return out


def test_frozen_quant_matmul_gradient(int4_dir):
    from telechat.quant import quantized_layers

    layer = quantized_layers(telechat.load(int4_dir).model)[0]
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    FrozenQuantMatmul.apply(x, layer).pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, layer.dequantize(torch.float32), layer.bias).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)


def test_qlora_trains_beside_the_frozen_quantized_base(sft, int4_dir, tmp_path):
    from telechat.quant import QuantLinear

    before = {k: v.clone() for k, v in telechat.load(int4_dir).model.state_dict().items()}
    s = train(cfg(sft, tmp_path / "q", int4_dir, max_steps=6, learning_rate=2e-2))
    losses = [h["loss"] for h in s["history"]]
    assert losses[-1] < losses[0]
    ckpt = Path(s["checkpoint"])
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    llm = apply_adapter(telechat.load(int4_dir), ckpt)  # kept beside the quantized layers
    assert isinstance(llm.model.transformer.h[0].self_attention.query.get_base_layer(), QuantLinear)
    after = {k: v for k, v in llm.model.state_dict().items() if "lora_" not in k}
    after = {k.replace(".base_layer.", "."): v for k, v in after.items()}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert (logits(llm.model) - logits(telechat.load(int4_dir).model)).abs().max() > 1e-3
    with pytest.raises(AdapterError, match="GPTQ"):
        merge_lora(llm.model)


def test_a_quantized_model_needs_lora(sft, int4_dir, tmp_path):
    with pytest.raises(ValueError, match="--lora-dim"):
        train(cfg(sft, tmp_path / "q", int4_dir, lora_dim=0, only_optimize_lora=False))


# ---- bad input -----------------------------------------------------------------------------------------
def test_bad_flags_are_named(sft, tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="--only-optimize-lora needs --lora-dim"):
        train(cfg(sft, tmp_path / "x", tiny_dir, lora_dim=0))
    with pytest.raises(ValueError, match="lora_scaling"):
        train(cfg(sft, tmp_path / "x", tiny_dir, lora_scaling=0.0))
    with pytest.raises(ValueError, match="matches none"):
        train(cfg(sft, tmp_path / "x", tiny_dir, lora_module_name="nothing_like_this"))


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "adapter_config.json").unlink(), "no adapter_config.json"),
    (lambda d: (d / "adapter_config.json").write_text("{nope"), "not readable JSON"),
    (lambda d: _edit(d, r=0), "field 'r'"),
    (lambda d: _edit(d, lora_alpha="x"), "field 'lora_alpha'"),
    (lambda d: _edit(d, peft_type="IA3"), "only LORA"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"garbage"), "safetensors"),
    (lambda d: _edit(d, r=8), "shape"),
])
def test_a_bad_adapter_is_named(trained, tiny_dir, tmp_path, capsys, damage, message):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained, bad)
    damage(bad)
    with pytest.raises(AdapterError, match=message):
        load_adapter(telechat.load(tiny_dir).model, bad)
    assert cli.main(["merge", "--model", str(tiny_dir), "--adapter", str(bad), "--output", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def _edit(folder: Path, **fields) -> None:
    f = folder / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **fields}))


def test_read_adapter_config(trained):
    c = read_adapter_config(trained)
    assert c.r == 4 and c.lora_alpha == 8.0


# ---- chat / serve / load with --adapter ----------------------------------------------------------------
def _greedy(forward, ids: torch.Tensor, n: int) -> list[int]:
    """Greedy continuation by full forwards, no cache: an engine-free reference."""
    ids = ids.clone()
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, forward(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0].tolist()


@pytest.fixture(scope="module")
def chatty(sft, tiny_dir, tmp_path_factory) -> Path:
    """An adapter trained long and hard enough (100 steps, ~2 s) that the tiny model's chat answer changes
    from the base's and prints as text."""
    out = tmp_path_factory.mktemp("lora_chatty") / "run"
    train(cfg(sft, out, tiny_dir, max_steps=100, learning_rate=0.1, lora_dim=8, lora_scaling=32.0))
    return latest_checkpoint(out)


@pytest.fixture(scope="module")
def merged_dir(chatty, tiny_dir, tmp_path_factory) -> Path:
    return telechat.lora.merge(tiny_dir, chatty, tmp_path_factory.mktemp("lora_merged") / "m")


def test_load_with_adapter_generates_what_peft_generates(trained, tiny_dir):
    """`telechat.load(base, adapter=DIR)` merges the update at load; its greedy tokens are those of PEFT's own
    model over transformers on the same prompt."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_dir), trust_remote_code=True, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, str(trained)).eval()
    theirs = _greedy(lambda x: peft_model(input_ids=x).logits, IDS, 12)
    llm = telechat.load(tiny_dir, dtype=torch.float32, adapter=trained)
    assert not telechat.lora.lora_layers(llm.model)  # merged: plain layers, nothing per token
    ours = llm.generate(IDS, max_new_tokens=12, do_sample=False, eos_token_id=-1)[0].tolist()
    assert ours == theirs
    base = telechat.load(tiny_dir, dtype=torch.float32).generate(IDS, max_new_tokens=12, do_sample=False,
                                                                  eos_token_id=-1)[0].tolist()
    assert base != theirs  # the adapter changes the answer, so the comparison can fail


def test_load_with_adapter_over_gptq_keeps_it_beside(trained, int4_dir):
    from telechat.quant import QuantLinear

    llm = telechat.load(int4_dir, adapter=trained)
    layer = llm.model.transformer.h[0].self_attention.query
    assert isinstance(layer.get_base_layer(), QuantLinear) and len(telechat.lora.lora_layers(llm.model)) == 12
    ref = apply_adapter(telechat.load(int4_dir), trained, merge=False)
    ours = llm.generate(IDS, max_new_tokens=8, do_sample=False, eos_token_id=-1)[0].tolist()
    assert ours == _greedy(ref.model, IDS, 8)
    assert ours != _greedy(telechat.load(int4_dir).model, IDS, 8)


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "telechat.cli", *args, "--threads", "1"], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_chat_cli_with_adapter_answers_as_the_merged_model(chatty, tiny_dir, merged_dir, capsys):
    q = ["--prompt", "Count to three.", "--max-new-tokens", "12", "--device", "cpu"]
    r = _cli("chat", "--model", str(tiny_dir), "--adapter", str(chatty), *q)
    assert r.returncode == 0, r.stderr
    assert "adapter" in r.stderr and "merged into the weights" in r.stderr
    assert cli.main(["chat", "--model", str(merged_dir), *q]) == 0
    merged_answer = capsys.readouterr().out
    assert cli.main(["chat", "--model", str(tiny_dir), *q]) == 0
    base_answer = capsys.readouterr().out
    # The adapter's answer may be whitespace only (what 100 steps teach depends on the tokenizer
    # fixture's pieces); that it is the merged model's and not the base's is the point.
    assert r.stdout == merged_answer and r.stdout.endswith("\n")
    assert base_answer != merged_answer


def test_serve_cli_with_adapter_answers(chatty, tiny_dir, merged_dir):
    import socket

    import httpx

    from conftest import running_server

    # Sampled with a seed: a greedy answer of the adapter may be one token that prints as nothing
    body = {"prompt": "Count to three.", "max_tokens": 8, "temperature": 1.0, "seed": 3}
    answers = {}
    for name, folder in (("merged", merged_dir), ("base", tiny_dir)):
        with running_server(telechat.load(folder)) as url:
            answers[name] = httpx.post(url + "/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]
    expected = answers["merged"]
    assert expected.strip() and expected != answers["base"]
    with socket.socket() as s:  # a free port, closed again for the server to bind
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "telechat.cli", "serve", "--model", str(tiny_dir), "--adapter",
                             str(chatty), "--port", str(port), "--log-level", "warning", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, f"telechat serve exited with {proc.returncode}: {proc.stdout.read()}"
            assert time.time() < deadline, "the server did not come up"
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = httpx.post(base + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def other_shape_adapter(tmp_path_factory) -> Path:
    """A LoRA adapter for a base of another width (hidden 96, not 64): same module names, other shapes."""
    from telechat.lora import save_adapter

    llm = telechat.from_preset("tiny", hidden_size=96, n_head=4)
    config = add_lora(llm.model, 4, 8.0, only_lora=True)
    return save_adapter(llm.model, config, tmp_path_factory.mktemp("other") / "a")


@pytest.mark.parametrize("case, message", [
    ("missing", "no such folder"),
    ("file", "not a folder"),
    ("base", "no adapter_config.json"),  # a model folder, not a PEFT adapter
    ("other_shape", "lora_A.weight has shape [4, 96], this model needs [4, 64]"),
])
def test_chat_and_load_name_a_bad_adapter(tiny_dir, tmp_path, capsys, other_shape_adapter, case, message):
    bad = {"missing": tmp_path / "nope", "file": tmp_path / "f.json", "base": tiny_dir,
           "other_shape": other_shape_adapter}[case]
    (tmp_path / "f.json").write_text("{}")
    with pytest.raises(AdapterError, match=message.replace("[", r"\[").replace("]", r"\]")):
        telechat.load(tiny_dir, adapter=bad)
    assert cli.main(["chat", "--model", str(tiny_dir), "--adapter", str(bad), "--prompt", "hi"]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err and "Traceback" not in captured.err
    assert captured.out == ""


def test_serve_names_a_bad_adapter(tiny_dir, tmp_path):
    # a subprocess: a server that ignored the adapter would serve on, and time out here instead of hanging
    r = _cli("serve", "--model", str(tiny_dir), "--adapter", str(tmp_path / "nope"), "--port", "0", timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "no such folder" in r.stderr
    assert "Traceback" not in r.stderr


def test_load_refuses_an_adapter_with_its_own_base_weights(sft, tiny_dir, tmp_path):
    s = train(cfg(sft, tmp_path / "all", tiny_dir, max_steps=1, only_optimize_lora=False))
    with pytest.raises(AdapterError, match="trained base weights"):
        telechat.load(tiny_dir, adapter=s["checkpoint"])
    llm = telechat.load(s["checkpoint"], adapter=s["checkpoint"])  # its own weights as the base: fine
    assert torch.isfinite(logits(llm.model)).all()

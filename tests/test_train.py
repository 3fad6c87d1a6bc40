"""`telechat train` (plain PyTorch loop): loss falls, packed SFT, checkpoints that chat, exact resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import telechat
from telechat.data.prepare import prepare_pretrain, prepare_sft
from telechat.train import TrainConfig, latest_checkpoint, train
from telechat.model import packed_labels
from telechat.train.trainer import load_trainer_state, lr_factor

from conftest import shared_path

QA = [("你好", "你好！我是TeleChat。"), ("What is the capital of France?", "Paris is the capital of France."),
      ("北京是中国的首都吗？", "是的，北京是中国的首都。"), ("Count to three.", "One, two, three."),
      ("今天天气怎么样？", "今天天气很好，我们去公园散步吧。"), ("Say hello.", "Hello, world!")]


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, sp_model) -> Path:
    d = tmp_path_factory.mktemp("sft")
    (d / "a.jsonl").write_text("\n".join(json.dumps({"input": f"<_user>{q}", "output": a}, ensure_ascii=False)
                                         for q, a in QA) + "\n", encoding="utf-8")
    (d / "data.json").write_text(json.dumps({"a.jsonl": 4}))
    prepare_sft(d / "data.json", sp_model, 64, d / "out", num_samples=48, seed=0)
    return d / "out"


def cfg(data, out, **kw) -> TrainConfig:
    base = dict(stage="sft", data=str(data), output=str(out), preset="tiny", max_steps=12, learning_rate=3e-3,
                per_device_batch_size=4, progress=False, eval_fraction=0.1)
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedules():
    assert [round(lr_factor(s, 10, 2, "cosine"), 3) for s in (0, 1, 2, 10)] == [0.5, 1.0, 1.0, 0.0]
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(9, 10, 2, "constant") == 1.0


def test_sft_loss_falls_and_checkpoint_chats(sft_dir, tmp_path):
    s = train(cfg(sft_dir, tmp_path / "run", max_steps=30, eval_steps=10, save_steps=10))
    losses = [h["loss"] for h in s["history"]]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3])
    assert "val_loss" in s["history"][9] and "val_ppl" in s
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.name == "checkpoint-0000030" and (tmp_path / "run" / "checkpoint-0000010").exists()
    llm = telechat.load(ckpt)
    assert llm.chat_format == "telechat"
    answer, history = llm.chat("你好", max_new_tokens=8)
    assert isinstance(answer, str) and history[-1]["role"] == "bot"
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 31))
    assert {"loss", "lr", "tokens_per_s", "max_rss_mb", "grad_norm", "mfu"} <= set(logged[0])
    assert all(0 < r["mfu"] <= 1 for r in logged) and logged[0]["lr"] == pytest.approx(3e-3)


def test_step_counts_real_and_loss_tokens(sft_dir, tmp_path):
    """One step over every sample: the logged token counts are the data's non-padding and loss tokens
    (MFU and tokens/s count no padding)."""
    n = len(np.load(sft_dir / "input_ids.npy"))
    s = train(cfg(sft_dir, tmp_path / "run", max_steps=1, per_device_batch_size=n, eval_fraction=0))
    seg = torch.from_numpy(np.load(sft_dir / "segment_ids.npy").astype(np.int64))
    mask = torch.from_numpy(np.load(sft_dir / "loss_mask.npy").astype(np.int64))
    labels = packed_labels(torch.from_numpy(np.load(sft_dir / "input_ids.npy").astype(np.int64)), mask, seg)
    rec = s["history"][0]
    assert rec["tokens"] == int((seg > 0).sum()) < seg.numel()
    assert rec["loss_tokens"] == int((labels[:, 1:] != -100).sum())
    assert 0 < rec["mfu"] <= 1


# ---- every loss token weighs the same ---------------------------------------------------------------
@pytest.fixture(scope="module")
def uneven_sft(tmp_path_factory, sp_model) -> Path:
    """SFT samples with very different numbers of loss tokens (one-word answers, long answers)."""
    d = tmp_path_factory.mktemp("uneven")
    long = "The quick brown fox jumps over the lazy dog 12345 times. " * 3
    qa = [("你好", "好。"), ("Say hello.", "Hi."), ("Tell me about the fox.", long), ("天气？", "今天天气很好，我们去公园散步吧。" * 3),
          ("Count.", "1."), ("北京？", "是。")]
    (d / "a.jsonl").write_text("\n".join(json.dumps({"input": f"<_user>{q}", "output": a}, ensure_ascii=False)
                                         for q, a in qa) + "\n", encoding="utf-8")
    (d / "data.json").write_text(json.dumps({"a.jsonl": 1}))
    prepare_sft(d / "data.json", sp_model, 96, d / "out", num_samples=12, seed=0)
    return d / "out"


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return telechat.load(latest_checkpoint(run)).model.state_dict()


def _relative_distance(a: dict, b: dict, start: dict) -> float:
    """|a - b| / |a - start|: how far apart two runs end, against how far they moved."""
    apart = sum(float(((a[k] - b[k]).double() ** 2).sum()) for k in a) ** 0.5
    moved = sum(float(((a[k] - start[k]).double() ** 2).sum()) for k in a) ** 0.5
    assert moved > 0
    return apart / moved


WEIGHTING = dict(max_steps=3, lr_scheduler="constant", eval_fraction=0, learning_rate=1e-3)


def test_uneven_data_really_is_uneven(uneven_sft):
    mask, seg = np.load(uneven_sft / "loss_mask.npy"), np.load(uneven_sft / "segment_ids.npy")
    per_sample = mask.sum(1)
    assert per_sample.max() > 4 * per_sample.min() > 0 and (seg == 0).any()


def test_loss_is_token_weighted_across_accumulation(uneven_sft, tmp_path):
    """Batch 4 x accumulation 1 and batch 1 x accumulation 4 see the same samples in every step and end
    with the same weights: the step's loss is the mean over all its loss tokens."""
    start = train(cfg(uneven_sft, tmp_path / "start", **{**WEIGHTING, "learning_rate": 0.0, "max_steps": 1}))
    w0 = _weights(tmp_path / "start")
    a = train(cfg(uneven_sft, tmp_path / "4x1", per_device_batch_size=4, **WEIGHTING))
    b = train(cfg(uneven_sft, tmp_path / "1x4", per_device_batch_size=1, gradient_accumulation_steps=4, **WEIGHTING))
    assert _relative_distance(_weights(tmp_path / "4x1"), _weights(tmp_path / "1x4"), w0) < 1e-4
    for ra, rb in zip(a["history"], b["history"]):
        assert ra["loss_tokens"] == rb["loss_tokens"] and ra["tokens"] == rb["tokens"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
    assert start["history"][0]["loss"] == pytest.approx(a["history"][0]["loss"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 2])
def test_loss_is_token_weighted_across_ranks(uneven_sft, tmp_path, zero):
    """2 ranks x (batch 1 x accumulation 2) under DeepSpeed end where batch 4 x accumulation 1 does."""
    pytest.importorskip("deepspeed")
    train(cfg(uneven_sft, tmp_path / "start", **{**WEIGHTING, "learning_rate": 0.0, "max_steps": 1}))
    a = train(cfg(uneven_sft, tmp_path / "4x1", per_device_batch_size=4, **WEIGHTING))
    out = tmp_path / "2x1x2"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    r = subprocess.run([sys.executable, "-m", "telechat.cli", "train", "--stage", "sft", "--data", str(uneven_sft),
                        "--preset", "tiny", "--max-steps", "3", "--learning-rate", "1e-3", "--lr-scheduler", "constant",
                        "--per-device-batch-size", "1", "--gradient-accumulation-steps", "2", "--nproc", "2",
                        "--zero-stage", str(zero), "--no-progress", "--output", str(out)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    # 12 samples x the default --eval-fraction 0.02 hold none out: the same rows as eval_fraction=0
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [x["loss_tokens"] for x in logged] == [x["loss_tokens"] for x in a["history"]]
    assert [x["loss"] for x in logged] == pytest.approx([x["loss"] for x in a["history"]], rel=1e-5)
    # the gradient's scale too (AdamW and clipping would hide a factor on the weights)
    assert [x["grad_norm"] for x in logged] == pytest.approx([x["grad_norm"] for x in a["history"]], rel=1e-4)
    assert _relative_distance(_weights(out), _weights(tmp_path / "4x1"), _weights(tmp_path / "start")) < 1e-4


def test_resume_is_exact_after_sigkill(sft_dir, tmp_path):
    args = [sys.executable, "-m", "telechat.cli", "train", "--stage", "sft", "--data", str(sft_dir), "--preset",
            "tiny", "--max-steps", "40", "--save-steps", "4", "--learning-rate", "3e-3", "--no-progress"]
    ref = tmp_path / "ref"
    subprocess.run(args + ["--output", str(ref)], check=True, capture_output=True)
    out = tmp_path / "killed"
    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*")) if shm.is_dir() else set()
    proc = subprocess.Popen(args + ["--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoint-0000008" / "trainer_state.pt").exists():
        assert time.time() < deadline and proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(out).name < "checkpoint-0000040"  # killed with steps left to redo
    subprocess.run(args + ["--output", str(out), "--resume"], check=True, capture_output=True)

    def losses(run):
        state = load_trainer_state(latest_checkpoint(run))
        return [(h["step"], h["loss"]) for h in state["history"]]
    assert losses(out) == losses(ref)  # bit for bit, same steps
    logged = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 41))  # each step once, though the steps after the last checkpoint ran twice
    w_ref = telechat.load(latest_checkpoint(ref)).model.state_dict()
    w_out = telechat.load(latest_checkpoint(out)).model.state_dict()
    assert all(torch.equal(w_ref[k], w_out[k]) for k in w_ref)


def test_pretrain_stage(tmp_path, sp_model):
    docs = [{"data": "TeleChat is a bilingual model. " * 8}, {"data": "今天天气很好，我们去公园散步吧。" * 6}] * 10
    (tmp_path / "ptd.jsonl").write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in docs), encoding="utf-8")
    prepare_pretrain([tmp_path / "ptd.jsonl"], sp_model, 32, tmp_path / "pt", val_fraction=0.1)
    s = train(cfg(tmp_path / "pt", tmp_path / "run", stage="pretrain", max_steps=15))
    assert s["history"][-1]["loss"] < s["history"][0]["loss"] and "val_loss" in s


def test_bad_configs(sft_dir, tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        train(cfg(sft_dir, tmp_path / "x", model="default"))
    with pytest.raises(ValueError, match="max_seq_len 64"):
        train(cfg(sft_dir, tmp_path / "x", max_seq_len=128))
    with pytest.raises(ValueError, match="not pretrain"):
        train(cfg(sft_dir, tmp_path / "x", stage="pretrain"))
    with pytest.raises(ValueError, match="fp16"):
        train(cfg(sft_dir, tmp_path / "x", precision="fp16"))


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_two_processes(sft_dir, tmp_path, zero):
    pytest.importorskip("deepspeed")
    out = tmp_path / f"z{zero}"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    shm = Path("/dev/shm")
    buffers = lambda: set(shm.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")) if shm.is_dir() else set()  # noqa: E731
    before = buffers()
    r = subprocess.run([sys.executable, "-m", "telechat.cli", "train", "--stage", "sft", "--data", str(sft_dir),
                        "--preset", "tiny", "--max-steps", "8", "--learning-rate", "3e-3", "--per-device-batch-size", "2",
                        "--nproc", "2", "--zero-stage", str(zero), "--save-steps", "4", "--no-progress",
                        "--output", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert buffers() <= before  # the CPU all-reduce buffers do not outlive the run
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged] == list(range(1, 9))  # one writer: rank 0
    assert np.mean([x["loss"] for x in logged[-3:]]) < np.mean([x["loss"] for x in logged[:2]])
    ckpt = latest_checkpoint(out)
    assert ckpt.name == "checkpoint-0000008" and (ckpt / "deepspeed").is_dir()
    llm = telechat.load(ckpt)  # gathered full weights, even from ZeRO-3 shards
    with torch.no_grad():
        assert torch.isfinite(llm.model(torch.tensor([[5, 6, 7]]))).all()
    answer, _ = llm.chat("你好", max_new_tokens=4)
    assert isinstance(answer, str)


def test_sft_on_the_shared_telechat_examples(tmp_path):
    """A few SFT steps on TeleChat's own dialogue examples with the official 12B tokenizer: the
    checkpoint chats in TeleChat's format."""
    tok = shared_path("telechat-official", "12B")
    single = shared_path("data", "sft", "telechat", "single_turn_example.jsonl")
    multi = shared_path("data", "sft", "telechat", "multi_turn_example.jsonl")
    (tmp_path / "data.json").write_text(json.dumps({str(single): 0.05, str(multi): 0.05}))
    prepare_sft(tmp_path / "data.json", tok, 256, tmp_path / "sft", num_samples=12, seed=0)
    s = train(cfg(tmp_path / "sft", tmp_path / "run", max_steps=3, per_device_batch_size=2, eval_fraction=0.2))
    assert len(s["history"]) == 3 and all(np.isfinite(h["loss"]) for h in s["history"])
    llm = telechat.load(s["checkpoint"])
    assert llm.tokenizer.user_id == 20 and llm.config.vocab_size >= 120000
    answer, history = llm.chat("你好", max_new_tokens=4)
    assert history == [{"role": "user", "content": "你好"}, {"role": "bot", "content": answer}]


@pytest.mark.slow
def test_deepspeed_zero3_resume_is_exact_after_sigkill(sft_dir, tmp_path):
    pytest.importorskip("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    args = [sys.executable, "-m", "telechat.cli", "train", "--stage", "sft", "--data", str(sft_dir), "--preset", "tiny",
            "--max-steps", "8", "--learning-rate", "3e-3", "--per-device-batch-size", "2", "--nproc", "2",
            "--zero-stage", "3", "--save-steps", "4", "--no-progress"]
    ref = tmp_path / "ref"
    subprocess.run(args + ["--output", str(ref)], env=env, check=True, capture_output=True, timeout=600)
    out = tmp_path / "killed"
    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*")) if shm.is_dir() else set()
    proc = subprocess.Popen(args + ["--output", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "latest").exists():
        assert time.time() < deadline and proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait()
    for f in (set(shm.glob("deepspeed_allreduce_buffer_*")) if shm.is_dir() else set()) - before:
        f.unlink(missing_ok=True)  # a killed run cannot unlink its own all-reduce buffers
    assert latest_checkpoint(out).name == "checkpoint-0000004"
    subprocess.run(args + ["--output", str(out), "--resume"], env=env, check=True, capture_output=True, timeout=600)

    def losses(run):
        state = load_trainer_state(latest_checkpoint(run))
        return [(h["step"], h["loss"]) for h in state["history"]]
    assert losses(out) == losses(ref) and len(losses(ref)) == 8


# ---- several sources, dynamic mixing ----------------------------------------------------------------
@pytest.fixture(scope="module")
def two_sources(tmp_path_factory, sp_model) -> Path:
    """easy: one sentence over and over (learned in a few steps); hard: random digits (never below log 10)."""
    d = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(0)
    texts = {"easy": ["TeleChat is a bilingual model. " * 8] * 40,
             "hard": ["".join(map(str, rng.integers(0, 10, 120))) for _ in range(40)]}
    for name, docs in texts.items():
        (d / f"{name}.jsonl").write_text("\n".join(json.dumps({"data": t}) for t in docs), encoding="utf-8")
        prepare_pretrain([d / f"{name}.jsonl"], sp_model, 32, d / "sources" / name, val_fraction=0.2)
    return d / "sources"


def test_bounded_and_dynamic_weights():
    from telechat.train.trainer import bounded_weights, dynamic_weights

    w = bounded_weights(np.array([0.01, 0.01, 0.98]), 0.1, 0.7)
    assert np.isclose(w.sum(), 1) and w.min() >= 0.1 - 1e-9 and w.max() <= 0.7 + 1e-9
    prior = np.full(3, 1 / 3)
    w = dynamic_weights(np.array([2.0, 3.0, 4.0]), 2.0, prior, 1.0, 0.05, 0.9)
    assert w[0] < w[1] < w[2] and np.isclose(w.sum(), 1)  # furthest above the floor: most weight
    assert np.allclose(dynamic_weights(np.array([3.0, 3.0, 3.0]), 2.0, prior, 1.0, 0.05, 0.9), prior)
    assert np.allclose(dynamic_weights(np.array([2.0, 9.0]), 2.0, np.full(2, 0.5), 5.0, 0.2, 0.8), [0.2, 0.8])


def test_dynamic_mix_moves_weight_toward_the_harder_source(two_sources, tmp_path):
    s = train(cfg(two_sources, tmp_path / "run", stage="pretrain", max_steps=48, mix="dynamic", mix_every=4,
                  learning_rate=1e-2, mix_eta=2.0, mix_min_weight=0.1, mix_max_weight=0.9))
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    weights = [r["mix_weights"]["hard"] for r in logged if "mix_weights" in r]
    n = {k: len(np.load(two_sources / k / "train" / "input_ids.npy")) for k in ("easy", "hard")}
    assert weights[0] == pytest.approx(n["hard"] / (n["easy"] + n["hard"]))  # the natural start: by size
    assert len(weights) == 1 + 48 // 4 and all(0.1 - 1e-9 <= w <= 0.9 + 1e-9 for w in weights)
    measured = [r["mix_val_loss"] for r in logged if "mix_val_loss" in r]
    assert measured[-1]["hard"] > measured[-1]["easy"] + 0.5  # the sources really differ in difficulty
    assert weights[-1] > max(0.75, weights[0] + 0.3)  # moved toward the harder one
    assert s["mix_weights"]["hard"] == pytest.approx(weights[-1]) and set(s["val_loss_by_source"]) == {"easy", "hard"}


def test_dynamic_mix_resumes_exactly(two_sources, tmp_path):
    kw = dict(stage="pretrain", max_steps=12, mix="dynamic", mix_every=3, save_steps=5)
    ref = train(cfg(two_sources, tmp_path / "ref", **kw))
    run = tmp_path / "run"
    train(cfg(two_sources, run, **kw))
    # as if the run had died after checkpoint 5: only that checkpoint is left
    for ck in run.glob("checkpoint-*"):
        if ck.name != "checkpoint-0000005":
            import shutil
            shutil.rmtree(ck)
    (run / "latest").write_text("checkpoint-0000005")
    resumed = train(cfg(two_sources, run, resume=True, **kw))
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in ref["history"]]
    assert resumed["mix_weights"] == ref["mix_weights"]


def test_sources_by_comma_and_natural_weights(two_sources, tmp_path):
    data = f"{two_sources / 'easy'},{two_sources / 'hard'}"
    s = train(cfg(data, tmp_path / "run", stage="pretrain", max_steps=3))
    n = {k: len(np.load(two_sources / k / "train" / "input_ids.npy")) for k in ("easy", "hard")}
    assert s["mix_weights"] == pytest.approx({k: v / sum(n.values()) for k, v in n.items()})
    with pytest.raises(ValueError, match="several sources"):
        train(cfg(two_sources / "easy", tmp_path / "x", stage="pretrain", mix="dynamic"))

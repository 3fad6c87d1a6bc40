"""`telechat train`: safe and honest resume, validated flags, data from the model's own tokenizer,
no training over an earlier run, warnings about useless validation splits."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from telechat.cli import main
from telechat.data.prepare import prepare_pretrain, prepare_sft
from telechat.train import TrainConfig, latest_checkpoint, train

QA = [("你好", "你好！我是TeleChat。"), ("What is the capital of France?", "Paris is the capital of France."),
      ("北京是中国的首都吗？", "是的，北京是中国的首都。"), ("Count to three.", "One, two, three.")]


def write_sft(folder: Path, tokenizer, num_samples: int = 16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.jsonl").write_text("\n".join(json.dumps({"input": f"<_user>{q}", "output": a}, ensure_ascii=False)
                                              for q, a in QA) + "\n", encoding="utf-8")
    (folder / "data.json").write_text(json.dumps({"a.jsonl": 2}))
    prepare_sft(folder / "data.json", tokenizer, 48, folder / "out", num_samples=num_samples, seed=0)
    return folder / "out"


@pytest.fixture(scope="module")
def sft(tmp_path_factory, sp_model) -> Path:
    return write_sft(tmp_path_factory.mktemp("sft"), sp_model)


def cfg(data, out, **kw) -> TrainConfig:
    base = dict(stage="sft", data=str(data), output=str(out), preset="tiny", max_steps=4, learning_rate=3e-3,
                per_device_batch_size=2, progress=False, eval_fraction=0.25, save_steps=2)
    base.update(kw)
    return TrainConfig(**base)


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(sft, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at 2 and 4."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(cfg(sft, run))
    return run


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A copy of the finished run, to damage."""
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*")}


def cli(args: list, capsys) -> tuple[int, str]:
    rc = main(["train", *map(str, args)])
    return rc, capsys.readouterr().err


# ---- 3: resume reads tensors and plain data only --------------------------------------------------------
class Payload:
    """Unpickling this creates a file: what a crafted checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_resume_refuses_a_pickle_that_runs_code(run, tmp_path, sft, capsys):
    marker = tmp_path / "pwned"
    ckpt = latest_checkpoint(run)
    state = {"format": 2, "step": 4, "history": [], "payload": Payload(marker)}
    torch.save(state, ckpt / "trainer_state.pt")
    before = snapshot(run)
    try:
        train(cfg(sft, run, resume=True, max_steps=6))
    except Exception:
        pass
    assert not marker.exists()  # the payload never ran
    with pytest.raises(ValueError, match="trainer_state.pt: not a readable trainer state"):
        train(cfg(sft, run, resume=True, max_steps=6))
    rc, err = cli(["--stage", "sft", "--data", sft, "--preset", "tiny", "--output", run, "--max-steps", 6, "--resume",
                   "--no-progress"], capsys)
    assert rc == 1 and err.startswith("error: ") and "could run code" in err and "Traceback" not in err
    assert not marker.exists() and snapshot(run) == before


def test_trainer_state_holds_only_tensors_and_plain_data(finished):
    state = torch.load(latest_checkpoint(finished) / "trainer_state.pt", weights_only=True)
    assert state["step"] == 4 and [h["step"] for h in state["history"]] == [1, 2, 3, 4]


# ---- 5 and 10: --resume never silently starts over --------------------------------------------------------
def _empty_latest(run):
    (run / "latest").write_text("")


def _garbage_latest(run):
    (run / "latest").write_bytes(b"\xff\xfe../../etc\x00")


def _missing_latest(run):
    (run / "latest").unlink()


def _latest_names_a_missing_folder(run):
    shutil.rmtree(run / "checkpoint-0000004")


def _no_trainer_state(run):
    (run / "checkpoint-0000004" / "trainer_state.pt").unlink()


def _garbage_trainer_state(run):
    (run / "checkpoint-0000004" / "trainer_state.pt").write_bytes(b"not a checkpoint at all" * 10)


def _truncated_trainer_state(run):
    f = run / "checkpoint-0000004" / "trainer_state.pt"
    f.write_bytes(f.read_bytes()[:300])


def _wrong_type_trainer_state(run):
    torch.save([1, 2, 3], run / "checkpoint-0000004" / "trainer_state.pt")


def _wrong_step_trainer_state(run):
    f = run / "checkpoint-0000004" / "trainer_state.pt"
    state = torch.load(f, weights_only=True)
    state["step"] = "four"
    torch.save(state, f)


def _nan_weights(run):
    f = run / "checkpoint-0000004" / "model.safetensors"
    weights = load_file(f)
    name = sorted(k for k in weights if weights[k].dim() == 2)[0]
    weights[name][0, 0] = float("nan")
    save_file(weights, f, metadata={"format": "pt"})


def _inf_optimizer_state(run):
    f = run / "checkpoint-0000004" / "trainer_state.pt"
    state = torch.load(f, weights_only=True)
    next(iter(state["optimizer"]["state"].values()))["exp_avg_sq"][0] = float("inf")
    torch.save(state, f)


DAMAGE = {"empty latest": (_empty_latest, "should name a checkpoint folder"),
          "garbage latest": (_garbage_latest, "latest: cannot be read"),
          "missing latest": (_missing_latest, "no 'latest' file"),
          "latest names a missing folder": (_latest_names_a_missing_folder, "does not exist"),
          "no trainer_state.pt": (_no_trainer_state, "incomplete checkpoint"),
          "garbage trainer_state.pt": (_garbage_trainer_state, "not a readable trainer state"),
          "truncated trainer_state.pt": (_truncated_trainer_state, "not a readable trainer state"),
          "trainer_state.pt of the wrong type": (_wrong_type_trainer_state, "not a valid trainer state"),
          "trainer_state.pt with a bad step": (_wrong_step_trainer_state, "does not match the folder name"),
          "NaN weights": (_nan_weights, "holds NaN or Inf"),
          "Inf optimizer state": (_inf_optimizer_state, "holds NaN or Inf")}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_from_a_damaged_run_fails_clearly(run, sft, damage, capsys):
    spoil, message = DAMAGE[damage]
    spoil(run)
    before = snapshot(run)
    with pytest.raises(ValueError, match=message):
        train(cfg(sft, run, resume=True, max_steps=6))
    assert snapshot(run) == before  # nothing written, nothing started over
    rc, err = cli(["--stage", "sft", "--data", sft, "--preset", "tiny", "--output", run, "--max-steps", 6, "--resume",
                   "--no-progress"], capsys)
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert snapshot(run) == before


def test_resume_logs_each_step_once(run, sft):
    # as if killed after step 3: checkpoint 4 never written, step 3 logged
    shutil.rmtree(run / "checkpoint-0000004")
    (run / "latest").write_text("checkpoint-0000002")
    with open(run / "log.jsonl", "r+", encoding="utf-8") as f:
        lines = f.readlines()
        f.seek(0)
        f.writelines(lines[:3] + ['{"step": 4, "lo'])  # and a line cut short by the kill
        f.truncate()
    s = train(cfg(sft, run, resume=True))
    assert steps_logged(run) == [1, 2, 3, 4] and [h["step"] for h in s["history"]] == [1, 2, 3, 4]
    train(cfg(sft, run, resume=True, max_steps=6))  # a resume of a finished run, further
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]


def test_resume_beyond_the_steps_asked_for_fails(run, sft):
    with pytest.raises(ValueError, match="beyond this run's 3 steps"):
        train(cfg(sft, run, resume=True, max_steps=3))


def test_training_stops_when_the_loss_is_not_finite(sft, tmp_path):
    with pytest.raises(ValueError, match="training diverged"):
        train(cfg(sft, tmp_path / "run", learning_rate=1e30, max_steps=6, save_steps=0))
    assert latest_checkpoint(tmp_path / "run") is None


# ---- 18: the output folder ------------------------------------------------------------------------------
def test_training_into_an_earlier_run_is_refused(run, sft, capsys):
    before = snapshot(run)
    with pytest.raises(ValueError, match="already holds a training run.*--resume.*new --output.*--overwrite"):
        train(cfg(sft, run))
    rc, err = cli(["--stage", "sft", "--data", sft, "--preset", "tiny", "--output", run, "--no-progress"], capsys)
    assert rc == 1 and err.startswith("error: ") and "--resume" in err and snapshot(run) == before


def test_overwrite_starts_over(run, sft):
    (run / "notes.txt").write_text("mine")
    train(cfg(sft, run, overwrite=True, max_steps=2, save_steps=0))
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-0000002"]
    assert (run / "latest").read_text() == "checkpoint-0000002" and steps_logged(run) == [1, 2]
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files go
    with pytest.raises(ValueError, match="give one"):
        train(cfg(sft, run, overwrite=True, resume=True))


@pytest.mark.parametrize("exists", [False, True])
def test_resume_on_a_new_folder_starts_with_a_notice(sft, tmp_path, capsys, exists):
    out = tmp_path / "new"
    if exists:
        out.mkdir()
    s = train(cfg(sft, out, resume=True, max_steps=2))
    assert "holds no checkpoint yet; training starts from step 0" in capsys.readouterr().err
    assert len(s["history"]) == 2 and steps_logged(out) == [1, 2]


# ---- 16: flags ------------------------------------------------------------------------------------------
BAD_FLAGS = [("--max-steps", -5, "max_steps must be >= 1"), ("--max-steps", 0, "max_steps must be >= 1"),
             ("--num-train-epochs", 0, "num_train_epochs must be > 0"),
             ("--num-train-epochs", -1, "num_train_epochs must be > 0"),
             ("--num-train-epochs", "nan", "num_train_epochs must be > 0"),
             ("--save-steps", -1, "save_steps must be >= 0"), ("--eval-steps", -2, "eval_steps must be >= 0"),
             ("--learning-rate", -1e-3, "learning_rate must be a finite number >= 0"),
             ("--learning-rate", "nan", "learning_rate must be a finite number >= 0"),
             ("--learning-rate", "inf", "learning_rate must be a finite number >= 0"),
             ("--weight-decay", -0.1, "weight_decay must be"), ("--warmup-proportion", 1.5, "warmup_proportion"),
             ("--per-device-batch-size", 0, "per_device_batch_size must be >= 1"),
             ("--gradient-accumulation-steps", -1, "gradient_accumulation_steps must be >= 1"),
             ("--max-seq-len", 0, "max_seq_len must be >= 1"), ("--seed", -1, "seed must be >= 0"),
             ("--mix-every", -1, "mix_every must be >= 0"), ("--mix-eta", "nan", "mix_eta"),
             ("--nproc", 0, "nproc must be >= 1")]


@pytest.mark.parametrize("flag,value,message", BAD_FLAGS)
def test_bad_flags_are_refused(sft, tmp_path, capsys, flag, value, message):
    out = tmp_path / "run"
    rc, err = cli(["--stage", "sft", "--data", sft, "--preset", "tiny", "--output", out, "--no-progress", flag, value],
                  capsys)
    assert rc == 1 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists() or not any(out.iterdir())  # no checkpoint-000-5, no log


def test_eval_fraction_is_checked(sft, tmp_path):
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="eval_fraction must be in"):
            train(cfg(sft, tmp_path / "x", eval_fraction=bad))


# ---- 17: data from another tokenizer ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_sp_model(tmp_path_factory) -> Path:
    """A SentencePiece model of the same size and special pieces as sp_model, trained on other text."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp_other")
    text = "\n".join(["Zebras quietly graze on yellow grass near 42 wells.", "机器学习模型需要大量的数据进行训练。",
                      "Vivid jazz music plays every Friday in small clubs.", "我们明天早上八点在学校门口集合。"]) * 40
    (d / "corpus.txt").write_text(text, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=400, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece="<_unk>", bos_piece="<_start>", eos_piece="<_end>",
        pad_piece="<_pad>", user_defined_symbols=["<_user>", "<_bot>", "<_system>"], minloglevel=2)
    return d / "tokenizer.model"


def test_data_from_the_models_own_tokenizer_trains(tiny_dir, sft, tmp_path):
    s = train(cfg(sft, tmp_path / "run", preset=None, model=str(tiny_dir), max_steps=1, save_steps=0))
    assert len(s["history"]) == 1


def test_data_from_a_tokenizer_of_another_size_is_refused(tiny_dir, hf_tokenizer_json, tmp_path, capsys):
    data = write_sft(tmp_path / "bpe", hf_tokenizer_json)
    with pytest.raises(ValueError, match=r"prepared with the tokenizer .*tokenizer.json \(vocab \d+\), not with "
                                         r".*tokenizer.model, vocab 400\)"):
        train(cfg(data, tmp_path / "run", preset=None, model=str(tiny_dir)))
    rc, err = cli(["--stage", "sft", "--data", data, "--model", tiny_dir, "--output", tmp_path / "run2",
                   "--no-progress"], capsys)
    assert rc == 1 and err.splitlines()[-1].startswith("error: ") and "--tokenizer" in err and "Traceback" not in err


def test_data_from_a_tokenizer_with_other_pieces_is_refused(tiny_dir, other_sp_model, tmp_path):
    data = write_sft(tmp_path / "other", other_sp_model)
    with pytest.raises(ValueError, match="same vocab size, other pieces"):
        train(cfg(data, tmp_path / "run", preset=None, model=str(tiny_dir)))
    # the manifest's record wins over a tokenizer file that is gone (or changed) since
    manifest = json.loads((data / "manifest.json").read_text())
    manifest.update(tokenizer="/gone/tokenizer.model", tokenizer_vocab_size=1000)
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="vocab 1000"):
        train(cfg(data, tmp_path / "run", preset=None, model=str(tiny_dir)))


def test_token_ids_beyond_the_vocabulary_are_refused(tiny_dir, sft, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sft, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tokenizer"] = None  # nothing to compare with: the ids alone must tell
    (data / "manifest.json").write_text(json.dumps(manifest))
    ids = np.load(data / "input_ids.npy")
    ids[-1, -1] = 512  # the very last token of the last sample: the whole array is checked
    np.save(data / "input_ids.npy", ids)
    with pytest.raises(ValueError, match=r"token ids from \d+ to 512, outside the model's vocabulary \(vocab_size 512"):
        train(cfg(data, tmp_path / "run", preset=None, model=str(tiny_dir)))
    ids[-1, -1] = -1
    np.save(data / "input_ids.npy", ids)
    with pytest.raises(ValueError, match="token ids from -1"):
        train(cfg(data, tmp_path / "run", preset=None, model=str(tiny_dir)))


# ---- 19: validation splits ----------------------------------------------------------------------------------
def pretrain_folder(folder: Path, n_train: int, n_val: int, seq: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        (folder / split).mkdir(parents=True)
        np.save(folder / split / "input_ids.npy", rng.integers(4, 300, (n, seq), dtype=np.int32))
        np.save(folder / split / "segment_ids.npy", np.ones((n, seq), np.uint16))
    (folder / "manifest.json").write_text(json.dumps({
        "format": "telechat-prepared-v1", "mode": "pretrain", "max_seq_len": seq, "seed": 0, "tokenizer": None,
        "arrays": {"input_ids": "int32", "segment_ids": "uint16"}}))
    return folder


def test_empty_validation_split_is_a_warning(tmp_path, capsys):
    data = pretrain_folder(tmp_path / "pt", 8, 0)
    s = train(cfg(data, tmp_path / "run", stage="pretrain", max_steps=2))
    err = capsys.readouterr().err
    assert "warning:" in err and "val/ split has 0 blocks: no validation loss" in err and "val_loss" not in s


def test_oversized_validation_split_is_a_warning_and_val_loss_is_logged(tmp_path, capsys):
    data = pretrain_folder(tmp_path / "pt", 4, 6)
    s = train(cfg(data, tmp_path / "run", stage="pretrain", max_steps=2, eval_steps=0))
    err = capsys.readouterr().err
    assert "warning:" in err and "val/ split (6 blocks) is larger than the train/ split (4)" in err
    last = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and last["val_loss"] == pytest.approx(s["val_loss"])


def test_no_training_blocks_is_refused(tmp_path):
    data = pretrain_folder(tmp_path / "pt", 0, 3)
    with pytest.raises(ValueError, match="train/ split has 0 blocks"):
        train(cfg(data, tmp_path / "run", stage="pretrain"))


def test_sft_hold_out_warnings(sft, tmp_path, capsys):
    train(cfg(sft, tmp_path / "a", eval_fraction=0.01, max_steps=1, save_steps=0))  # 16 x 0.01 -> 0
    assert "holds out no sample: no validation loss" in capsys.readouterr().err
    train(cfg(sft, tmp_path / "b", eval_fraction=0.75, max_steps=1, save_steps=0))
    assert "more samples held out (12) than left for training (4)" in capsys.readouterr().err


def test_pretrain_prepared_with_no_validation_still_trains(tmp_path, sp_model, capsys):
    docs = [{"data": "TeleChat is a bilingual model. " * 8}] * 10
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(d) for d in docs), encoding="utf-8")
    prepare_pretrain([tmp_path / "d.jsonl"], sp_model, 32, tmp_path / "pt", val_fraction=0)
    s = train(cfg(tmp_path / "pt", tmp_path / "run", stage="pretrain", max_steps=2))
    assert len(s["history"]) == 2 and "val/ split has 0 blocks" in capsys.readouterr().err


def test_deepspeed_state_files_are_read_safely_first(tmp_path):
    from telechat.train.trainer import check_deepspeed_files

    folder = tmp_path / "deepspeed" / "state"
    folder.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}, "ds_version": "0.16", "global_steps": 4}, folder / "mp_rank_00_model_states.pt")
    check_deepspeed_files(tmp_path / "deepspeed")  # tensors and plain data pass
    marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": Payload(marker)}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(ValueError, match="optim_states.pt: not a readable DeepSpeed state file.*could run code"):
        check_deepspeed_files(tmp_path / "deepspeed")
    assert not marker.exists()
    with pytest.raises(ValueError, match="no DeepSpeed state files"):
        check_deepspeed_files(tmp_path / "nothing")

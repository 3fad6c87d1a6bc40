"""`--config FILE.yaml` and `--print-config`: a verb's options from a file, checked like its flags."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import telechat
from telechat.cli import build_parser, main
from telechat.train import latest_checkpoint

from test_train_safety import write_sft


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def info_json(argv: list[str], capsys) -> dict:
    assert main(["info", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_config_sets_options_and_command_line_wins(tiny_dir, tmp_path, capsys):
    flags = info_json(["--model", str(tiny_dir), "--json", "--dtype", "bfloat16"], capsys)
    cfg = write(tmp_path / "info.yaml", f"model: {tiny_dir}\njson: true\ndtype: bfloat16\n")
    assert info_json(["--config", str(cfg)], capsys) == flags
    assert flags["dtype"] == "torch.bfloat16" or "bfloat16" in str(flags["dtype"])
    # a flag given beside the file overrides it, also when abbreviated as argparse allows
    for flag in ("--dtype", "--dt"):
        out = info_json(["--config", str(cfg), flag, "float32"], capsys)
        assert "float32" in str(out["dtype"]) and out["parameters"] == flags["parameters"]


def test_underscore_and_dash_keys_and_required_options_from_the_file(tmp_path, capsys):
    cfg = write(tmp_path / "q.yaml", "model: default\noutput: out\ngroup_size: 64\ncalib-samples: 16\nsym: false\n")
    assert main(["quantize", "--config", str(cfg), "--print-config"]) == 0
    got = yaml.safe_load(capsys.readouterr().out)
    assert got["model"] == "default" and got["output"] == "out" and got["group-size"] == 64
    assert got["calib-samples"] == 16 and got["sym"] is False and got["bits"] == 4  # untouched default
    # no file and no flag for a required option: argparse's own message, exit status 2
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--config", str(write(tmp_path / "partial.yaml", "bits: 8\n"))])
    assert e.value.code == 2 and "--model" in capsys.readouterr().err


def test_print_config_reads_back_to_the_same_options(tmp_path, capsys):
    argv = ["train", "--stage", "sft", "--data", "d", "--output", "o", "--max-steps", "7", "--learning-rate", "1e-4",
            "--lr-scheduler", "linear", "--lora-dim", "8", "--only-optimize-lora", "--precision", "bf16"]
    assert main([*argv, "--print-config"]) == 0
    printed = capsys.readouterr().out
    data = yaml.safe_load(printed)
    assert data["max-steps"] == 7 and data["learning-rate"] == 1e-4 and data["only-optimize-lora"] is True
    assert data["lr-scheduler"] == "linear" and data["zero-stage"] is None
    cfg = write(tmp_path / "train.yaml", printed)
    assert main(["train", "--config", str(cfg), "--print-config"]) == 0
    assert capsys.readouterr().out == printed
    # and the flags themselves parse to these values (what the file above was printed from)
    direct = vars(build_parser().parse_args(argv))
    assert all(direct[k] == v for k, v in {"max_steps": 7, "learning_rate": 1e-4, "lora_dim": 8}.items())


@pytest.mark.parametrize("text, expected", [
    ("bogus: 1\n", "unknown option 'bogus'"),
    ("bits: 3\n", "bits: expected one of 4, 8, got 3"),
    ("group-size: sixty\n", "group-size: expected int, got 'sixty'"),
    ("group-size: [64]\n", "group-size: expected int, got [64]"),
    ("sym: yes please\n", "sym: expected true or false"),
    ("no-sym: true\n", "unknown option 'no-sym'"),
    ("seed: null\n", "seed: null is not allowed"),
    ("calib: yes\n", "calib: expected str, got True (quote it for text)"),
    ("- bits: 4\n", "expected a mapping of option names to values, got a list"),
    ("bits: [4\n", "not valid YAML"),
    ("bits: 4\nbits: 8\n", None),  # YAML keeps the last; not an error of ours
    ("group_size: 64\ngroup-size: 32\n", "option 'group-size' is given twice"),
])
def test_bad_config_files_are_one_clear_line(tmp_path, capsys, text, expected):
    cfg = write(tmp_path / "bad.yaml", text)
    rc = main(["quantize", "--config", str(cfg), "--model", "m", "--output", "o", "--print-config"])
    err = capsys.readouterr().err
    if expected is None:
        assert rc == 0
        return
    assert rc == 1 and err.startswith(f"error: --config {cfg}") and expected in err, err
    assert "Traceback" not in err and err.count("\n") == 1


def test_missing_and_undecodable_config_files(tmp_path, capsys):
    assert main(["serve", "--config", str(tmp_path / "none.yaml")]) == 1
    assert "none.yaml: No such file or directory" in capsys.readouterr().err
    (tmp_path / "latin1.yaml").write_bytes("model: caf\xe9\n".encode("latin-1"))
    assert main(["serve", "--config", str(tmp_path / "latin1.yaml")]) == 1
    assert "not UTF-8 text" in capsys.readouterr().err


def test_verbs_with_config(capsys):
    """train, serve, quantize and eval (and the other verbs) take --config; `data clean --config` keeps its
    meaning (the cleaning pipeline's own YAML)."""
    for verb in (["train"], ["serve"], ["quantize"], ["eval"], ["chat"], ["data", "prepare"], ["merge"]):
        with pytest.raises(SystemExit):
            main([*verb, "--help"])
        out = capsys.readouterr().out
        assert "--config FILE.yaml" in out and "--print-config" in out, verb
    with pytest.raises(SystemExit):
        main(["data", "clean", "--help"])
    assert "--print-config" not in capsys.readouterr().out


def test_training_from_a_config_file_equals_the_same_flags(tmp_path, sp_model, capsys):
    data = write_sft(tmp_path / "sft", sp_model)
    opts = {"stage": "sft", "data": str(data), "preset": "tiny", "max-steps": 3, "learning-rate": 3e-3,
            "per-device-batch-size": 2, "lr-scheduler": "constant", "seed": 5, "progress": False}
    flags = [x for k, v in opts.items() for x in ((f"--{k}", str(v)) if not isinstance(v, bool) else
                                                 (f"--{'' if v else 'no-'}{k}",))]
    assert main(["train", *flags, "--output", str(tmp_path / "flags")]) == 0
    cfg = write(tmp_path / "train.yaml", yaml.safe_dump({**opts, "output": str(tmp_path / "file")}))
    assert main(["train", "--config", str(cfg)]) == 0
    capsys.readouterr()
    a = telechat.load(latest_checkpoint(tmp_path / "flags")).model.state_dict()
    b = telechat.load(latest_checkpoint(tmp_path / "file")).model.state_dict()
    assert latest_checkpoint(tmp_path / "file").name == "checkpoint-0000003"
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and a different seed in the file really changes the run (the file is read, not ignored)
    cfg2 = write(tmp_path / "train2.yaml", yaml.safe_dump({**opts, "seed": 6, "output": str(tmp_path / "seed6")}))
    assert main(["train", "--config", str(cfg2)]) == 0
    c = telechat.load(latest_checkpoint(tmp_path / "seed6")).model.state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)

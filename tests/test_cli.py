"""The `telechat` command line: help, chat (one-shot and interactive), info, errors."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import telechat
from telechat.cli import build_parser, main


def console_script() -> str:
    exe = Path(sys.executable).parent / "telechat"
    if exe.exists():
        return str(exe)
    found = shutil.which("telechat")
    if found is None:
        pytest.skip("the telechat console script is not installed")
    return found


def run(args: list[str], stdin: str | None = None, module: bool = True, timeout: int = 120):
    cmd = [sys.executable, "-m", "telechat.cli", *args] if module else [console_script(), *args]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(cmd, input=stdin if stdin is not None else "", capture_output=True, text=True,
                          timeout=timeout, env=env, encoding="utf-8")


# ---- help ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", [True, False], ids=["python-m", "console-script"])
def test_help_lists_verbs(module):
    r = run(["--help"], module=module)
    assert r.returncode == 0, r.stderr
    assert "chat" in r.stdout and "info" in r.stdout
    assert "usage: telechat" in r.stdout


def test_no_verb_prints_help_and_fails(capsys):
    assert main([]) != 0
    out = capsys.readouterr().out
    assert "chat" in out and "info" in out


def test_chat_help_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["chat", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--prompt", "--temperature", "--top-p", "--top-k", "--max-new-tokens", "--model",
                 "--repetition-penalty", "--do-sample"):
        assert flag in out, flag
    assert "/clear" in out and "nucleus" in out  # the docstring is the help


def test_info_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["info", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--model" in out and "--json" in out and "parameter count" in out


def test_parser_types():
    args = vars(build_parser().parse_args(["chat", "--model", "x", "--temperature", "0.5", "--top-k", "3",
                                           "--do-sample", "--max-new-tokens", "7"]))
    assert args["temperature"] == 0.5 and args["top_k"] == 3 and args["do_sample"] is True
    assert args["max_new_tokens"] == 7 and args["prompt"] is None and args["top_p"] is None


def test_bad_flag_value_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["chat", "--temperature", "hot"])
    assert e.value.code == 2 and "temperature" in capsys.readouterr().err


# ---- chat ----------------------------------------------------------------------------------------
def test_chat_prompt(tiny_dir):
    r = run(["chat", "--model", str(tiny_dir), "--prompt", "hi", "--max-new-tokens", "5"], module=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    expected, _ = telechat.load(tiny_dir).chat("hi", max_new_tokens=5)
    assert expected and r.stdout == expected + "\n"
    assert "Traceback" not in r.stderr


def test_chat_prompt_sampling_flags(tiny_dir, capsys):
    args = ["chat", "--model", str(tiny_dir), "--prompt", "你好", "--max-new-tokens", "6", "--do-sample",
            "--temperature", "1.5", "--top-k", "0", "--top-p", "1.0", "--seed", "7"]
    assert main(args) == 0
    out1 = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == out1  # seeded
    expected, _ = telechat.load(tiny_dir).chat("你好", max_new_tokens=6, do_sample=True, temperature=1.5, top_k=0,
                                               top_p=1.0, seed=7)
    assert out1 == expected + "\n"


def test_chat_interactive(tiny_dir):
    r = run(["chat", "--model", str(tiny_dir), "--max-new-tokens", "4"], stdin="hello\n/clear\nhi\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout.count("bot> ") == 2
    assert "(conversation cleared)" in r.stderr
    llm = telechat.load(tiny_dir)
    a1, _ = llm.chat("hello", max_new_tokens=4)
    a2, _ = llm.chat("hi", max_new_tokens=4)  # fresh history after /clear
    assert f"bot> {a1}\n" in r.stdout and f"bot> {a2}\n" in r.stdout


def test_chat_interactive_keeps_history(tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\nhi\n"))  # a blank line is skipped; EOF ends it
    assert main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    llm = telechat.load(tiny_dir)
    history = []
    a1, _ = llm.chat("hello", history, max_new_tokens=4)
    a2, _ = llm.chat("hi", history, max_new_tokens=4)  # second turn sees the first
    assert out.count("bot> ") == 2
    assert f"bot> {a1}\n" in out and f"bot> {a2}\n" in out


def test_chat_without_tokenizer(tiny_dir, tmp_path):
    d = tmp_path / "notok"
    shutil.copytree(tiny_dir, d)
    (d / "tokenizer.model").unlink()
    with pytest.raises(SystemExit) as e:
        main(["chat", "--model", str(d), "--prompt", "hi"])
    assert e.value.code != 0 and "tokenizer" in str(e.value.code)


# ---- info ----------------------------------------------------------------------------------------
def test_info(tiny_dir):
    r = run(["info", "--model", str(tiny_dir)])
    assert r.returncode == 0, r.stderr
    n = telechat.load(tiny_dir).info()["parameters"]
    assert n == telechat.preset("tiny").num_parameters()
    assert f"{n:,}" in r.stdout
    assert "sentencepiece" in r.stdout
    assert "float32" in r.stdout


def test_info_json(tiny_dir, capsys):
    assert main(["info", "--model", str(tiny_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == telechat.preset("tiny").num_parameters()
    assert info["layers"] == 2 and info["vocab_size"] == 512 and info["chat_format"] == "telechat"
    assert "sentencepiece" in info["tokenizer"]


def test_info_in_process(tiny_dir, capsys):
    assert main(["info", "--model", str(tiny_dir), "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "bfloat16" in out and "sentencepiece" in out


def test_info_nonexistent():
    r = run(["info", "--model", "/nonexistent/telechat-ckpt"])
    assert r.returncode != 0
    assert "/nonexistent/telechat-ckpt" in r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout


def test_info_bad_checkpoint_no_traceback(tiny_dir, tmp_path, capsys):
    d = tmp_path / "bad"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    assert main(["info", "--model", str(d)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "llama" in err
    assert main(["chat", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 1
    assert str(tmp_path / "missing") in capsys.readouterr().err

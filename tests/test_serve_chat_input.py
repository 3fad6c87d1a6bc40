"""`telechat chat` with text that is not UTF-8 (issue 23, defect 7): a clear message, the
conversation goes on, no traceback."""
from __future__ import annotations

import os
import subprocess
import sys

import telechat


def _chat(args: list[str], stdin: bytes, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "PYTHONUTF8")}
    env.update({"LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", **(env_extra or {})})
    return subprocess.run([sys.executable, "-m", "telechat.cli", "chat", *args], input=stdin, capture_output=True,
                          timeout=180, env=env)


def test_chat_non_utf8_stdin_goes_on(tiny_dir):
    stdin = b"\xff\xfe bad \xc3\n" + b"hello\n" + b"caf\xe9\n" + b"hi\n/exit\n"
    for env in ({}, {"PYTHONIOENCODING": "utf-8:strict"}):
        r = _chat(["--model", str(tiny_dir), "--max-new-tokens", "4"], stdin, env)
        out, err = r.stdout.decode("utf-8"), r.stderr.decode("utf-8")
        assert r.returncode == 0, err
        assert "Traceback" not in err
        assert err.count("error: that line is not valid") == 2, err
        assert out.count("bot> ") == 2  # both good lines answered, with the history kept
        llm = telechat.load(tiny_dir)
        history: list = []
        a1, _ = llm.chat("hello", history, max_new_tokens=4)
        a2, _ = llm.chat("hi", history, max_new_tokens=4)
        assert f"bot> {a1}\n" in out and f"bot> {a2}\n" in out


def test_chat_non_utf8_prompt_argument(tiny_dir):
    r = subprocess.run([sys.executable.encode(), b"-m", b"telechat.cli", b"chat", b"--model", str(tiny_dir).encode(),
                        b"--prompt", b"caf\xe9"], capture_output=True, timeout=180,
                       env={**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"})
    err = r.stderr.decode("utf-8")
    assert r.returncode == 1 and "Traceback" not in err
    assert err.strip() == "error: --prompt is not valid UTF-8 text (it holds bytes that do not decode)"


def test_tokenizers_name_a_lone_surrogate(sp_tokenizer, hf_tokenizer_json):
    import pytest

    for tok in (sp_tokenizer, telechat.load_tokenizer(hf_tokenizer_json)):
        with pytest.raises(ValueError, match=r"lone UTF-16 surrogate '\\udc80' at index 3"):
            tok.encode("abc\udc80def")
        assert tok.encode("abc\U0001f600") == tok.encode("abc\ud83d\ude00".encode("utf-16", "surrogatepass")
                                                         .decode("utf-16"))

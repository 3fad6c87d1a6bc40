"""A new user's first minutes (issue 19): answers that stop, the README as written, one clear line
(no traceback) for the usual mistakes, --threads and /help."""
from __future__ import annotations

import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import telechat
import telechat.chat as chat_mod
from telechat.engine import Engine
from telechat.cli import COMMANDS, build_parser, main
from telechat.generate import DEFAULT_MAX_NEW_TOKENS, default_max_new_tokens

from conftest import TEXT

README = Path(__file__).resolve().parents[1] / "README.md"
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def template_dir(tmp_path_factory) -> Path:
    """A tiny random model whose tokenizer has a ChatML template and no TeleChat tokens, like the default
    model's; context 2048, so that 512 new tokens fit."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("chatml-model")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT] * 20, trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
         "unk_token": "<|endoftext|>", "chat_template": CHATML}))
    llm = telechat.from_preset("tiny", seed=0, tokenizer=telechat.load_tokenizer(d), seq_length=2048,
                               vocab_size=512)
    llm.generation_config.update({"max_length": 2048})
    llm.save(d)
    return d


@pytest.fixture()
def spy_generate(monkeypatch):
    """Records the SamplingParams chat() decodes with, and decodes nothing."""
    seen = []

    def spy(self, prompts, params, *a, **kw):
        seen.append(params[0])
        return iter(())

    monkeypatch.setattr(Engine, "iter_tokens", spy)
    return seen


# ---- answers that stop (point 2) ------------------------------------------------------------------
def test_default_max_new_tokens_rule():
    assert DEFAULT_MAX_NEW_TOKENS == 512
    assert default_max_new_tokens({"max_length": 8192}, 20, 8192) == 512
    assert default_max_new_tokens({}, 20, 8192) == 512
    assert default_max_new_tokens({"max_length": 8192, "max_new_tokens": 40}, 20, 8192) == 40
    assert default_max_new_tokens({"max_length": 100}, 20, 8192) == 80  # max_length caps the total
    assert default_max_new_tokens({"max_length": 100}, 100, 8192) == 1
    assert default_max_new_tokens({}, 2000, 2048) == 48


def test_chat_without_max_new_tokens_stops_at_512(template_dir, spy_generate):
    llm = telechat.load(template_dir)
    assert "max_new_tokens" not in llm.generation_config and llm.generation_config["max_length"] == 2048
    llm.chat("hello")
    assert spy_generate[-1].max_new_tokens == 512  # was: the whole rest of the context (2000+)
    llm.chat("hello", max_new_tokens=1500)
    assert spy_generate[-1].max_new_tokens == 1500
    llm.generation_config["max_new_tokens"] = 30  # the checkpoint's own setting wins over 512
    llm.chat("hello")
    assert spy_generate[-1].max_new_tokens == 30


def test_cli_chat_without_max_new_tokens_stops_at_512(template_dir, spy_generate, capsys):
    assert main(["chat", "--model", str(template_dir), "--prompt", "hello"]) == 0
    assert spy_generate[-1].max_new_tokens == 512


def _api_params(llm, monkeypatch, path: str, body: dict):
    """The SamplingParams the server would decode a request with (nothing is decoded)."""
    from fastapi.testclient import TestClient

    from telechat.serve.app import create_app

    app = create_app(llm)
    seen = []

    def capture(jobs):
        seen.extend(params for _, params in jobs)
        raise RuntimeError("captured")

    monkeypatch.setattr(app.state.server, "open_streams", capture)
    with pytest.raises(RuntimeError, match="captured"):
        TestClient(app).post(path, json=body)
    return seen[0]


def test_api_default_max_tokens(template_dir, tiny_dir, monkeypatch):
    llm = telechat.load(template_dir)
    msgs = {"messages": [{"role": "user", "content": "hello"}]}
    assert _api_params(llm, monkeypatch, "/v1/chat/completions", msgs).max_new_tokens == 512
    assert _api_params(llm, monkeypatch, "/v1/chat/completions", {**msgs, "max_tokens": 700}).max_new_tokens == 700
    assert _api_params(llm, monkeypatch, "/v1/completions", {"prompt": "hello"}).max_new_tokens == 16
    # TeleChat's endpoints: max_length (published: the total) when given, else answers stop like chat's
    tiny = telechat.from_preset("tiny", seed=0, tokenizer=telechat.load(tiny_dir).tokenizer, seq_length=2048)
    tiny.generation_config["max_length"] = 2048
    dialog = {"dialog": [{"role": "user", "content": "你好"}]}
    assert _api_params(tiny, monkeypatch, "/telechat/gptDialog/v4", dialog).max_new_tokens == 512
    p = _api_params(tiny, monkeypatch, "/telechat/gptDialog/v4", {**dialog, "max_length": 1024})
    assert 1000 < p.max_new_tokens < 1024


def program_chain(llm, chain: list[int]) -> None:
    """Greedy decoding then follows `chain` (token i -> token i + 1): blocks output nothing, so the last
    hidden state is the current token's one-hot embedding, and lm_head maps it to its successor."""
    m = llm.model
    with torch.no_grad():
        for block in m.transformer.h:
            for lin in (block.self_attention.dense, block.mlp.down_proj):
                lin.weight.zero_()
                lin.bias.zero_()
        m.transformer.ln_f.weight.fill_(1.0)
        emb, head = m.transformer.word_embeddings.weight, m.lm_head.weight
        head.zero_()
        for i, (tok, nxt) in enumerate(zip(chain, chain[1:])):
            emb[tok] = 0.0
            emb[tok, i] = 1.0
            head[nxt, i] = 10.0


def test_answer_cut_inside_a_character_has_no_replacement_char(tiny):
    """A non-streamed answer cut at max_new_tokens in the middle of a character's bytes drops the half
    character instead of ending in U+FFFD (the history gets the same text)."""
    tok = tiny.tokenizer
    body = tok.encode("你好😀")
    assert sum(tok.sp.is_byte(i) for i in body) == 4  # the emoji is four byte tokens
    program_chain(tiny, [tok.bot_id, *body, tok.eos_id])
    for cut in (1, 2, 3):
        answer, history = tiny.chat("问", [], max_new_tokens=len(body) - cut)
        assert answer == "你好" and history[-1]["content"] == "你好"
        parts = list(tiny.chat("问", [], stream=True, max_new_tokens=len(body) - cut))
        assert "".join(parts) == "你好" and "\ufffd" not in "".join(parts)
    assert tiny.chat("问", [], max_new_tokens=len(body))[0] == "你好😀"


# ---- the README runs as written (point 3) ---------------------------------------------------------
def readme_python() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def readme_commands() -> list[str]:
    """Every `telechat ...` line of the README's shell blocks (continuation lines joined)."""
    out = []
    for block in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("telechat "):
                out.append(line)
    return out


@pytest.mark.parametrize("which", ["template", "telechat"])
def test_readme_python_snippet_runs(which, template_dir, tiny_dir, tmp_path, monkeypatch, capsys):
    """The README's Python, run as written on a small model of each chat format (its model path
    replaced): the default model has a chat template and no <_user> token. What the streamed answer
    prints is the tokenizer's own decoding of the tokens generated: never a character cut in two (a
    random model's bytes may still be invalid UTF-8, which decodes to U+FFFD either way)."""
    from telechat.engine import Engine

    snippets = readme_python()
    assert snippets, "the README has no Python snippet"
    model = template_dir if which == "template" else tiny_dir
    monkeypatch.chdir(tmp_path)  # it writes my-copy/
    runs = []
    iter_tokens = Engine.iter_tokens

    def recording(self, prompts, params, *a, **kw):
        ids = []
        runs.append((ids, set(params[0].stop_ids)))
        for step in iter_tokens(self, prompts, params, *a, **kw):
            ids.append(step[0])
            yield step

    monkeypatch.setattr(Engine, "iter_tokens", recording)
    for code in snippets:
        code = re.sub(r"""telechat\.load\((["'])[^"']*\1""", f"telechat.load({str(model)!r}", code)
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    streamed = [r for r in runs if r[0]][2]  # chat, chat with history, then the streamed chat
    ids, stops = streamed
    ids = ids[:next((i for i, t in enumerate(ids) if t in stops), len(ids))]
    tokenizer = telechat.load_tokenizer(model)
    assert ids and printed == tokenizer.decode(ids).rstrip("\ufffd"), (printed, tokenizer.decode(ids))


def test_readme_commands_parse_as_written():
    """Each `telechat ...` line of the README is a valid command line (flags, choices, types)."""
    commands = readme_commands()
    assert len(commands) > 10
    bad = []
    for line in commands:
        argv = shlex.split(line, comments=True)[1:]
        if ">" in argv:  # a shell redirection of the output
            argv = argv[:argv.index(">")]
        if "--help" in argv or "-h" in argv:
            continue
        try:  # with --config, required flags may come from the file (as in cli.main)
            build_parser(relax_required="--config" in argv or "--print-config" in argv).parse_args(argv)
        except SystemExit:
            bad.append(line)
    assert not bad, "README commands that do not parse:\n" + "\n".join(bad)


def test_every_verb_help(capsys):
    verbs = [v.split() for v in COMMANDS]
    readme_verbs = {tuple(shlex.split(c, comments=True)[1:3]) for c in readme_commands()}
    assert any(v[0] == "chat" for v in readme_verbs)
    for verb in verbs + [[]]:
        with pytest.raises(SystemExit) as e:
            main([*verb, "--help"])
        assert e.value.code == 0, verb
        out = capsys.readouterr().out
        assert out.startswith("usage: telechat")
        if verb and verb != ["export"]:
            assert "--threads N" in out, verb


def test_help_texts_match_the_code(capsys):
    from telechat.config import PRESETS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    preset_help = re.search(r"--preset PRESET\s+(.*?)\n  --", capsys.readouterr().out, re.S).group(1)
    missing = [p for p in PRESETS if p not in preset_help.replace("\n", " ")]
    assert not missing, f"train --preset help misses {missing}"
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    assert "/help" in capsys.readouterr().out


# ---- no tracebacks for user mistakes (point 4) ----------------------------------------------------
def _without_setup_line(err: str) -> str:
    """stderr less the line saying what was loaded where ("telechat: device ... dtype ...")."""
    return "\n".join(ln for ln in err.strip().splitlines() if not ln.startswith("telechat: device ")).strip()


def _error_line(capsys) -> str:
    err = _without_setup_line(capsys.readouterr().err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    return err


MISSING = "/nonexistent/telechat-model"  # an error about the model would mean it was loaded first


@pytest.mark.parametrize("verb", ["chat", "serve", "info"])
def test_unknown_device(verb, capsys):
    assert main([verb, "--model", MISSING, "--device", "gpu"]) == 1
    err = _error_line(capsys)
    assert "--device 'gpu'" in err and "unknown device" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_unavailable_device(device, capsys):
    assert main(["chat", "--model", MISSING, "--device", device, "--prompt", "hi"]) == 1
    err = _error_line(capsys)
    assert f"--device {device}: not available here" in err and "--device cpu" in err


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_bad_port(port, capsys):
    assert main(["serve", "--model", MISSING, "--port", port]) == 1
    assert "--port must be between 0 and 65535" in _error_line(capsys)


def test_busy_port(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", MISSING, "--port", str(port)]) == 1
    err = _error_line(capsys)
    assert f"127.0.0.1:{port} is already in use" in err


def test_bad_host(capsys):
    assert main(["serve", "--model", MISSING, "--host", "no-such-host.invalid", "--port", "0"]) == 1
    assert "--host no-such-host.invalid" in _error_line(capsys)


def test_serve_binds_before_it_announces(tiny_dir, monkeypatch, capsys):
    import uvicorn

    seen = {}

    def fake_run(self, sockets=None):
        seen["announced"] = capsys.readouterr().out
        seen["bound"] = [s.getsockname() for s in sockets or []]
        seen["port"] = self.config.port

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    assert main(["serve", "--model", str(tiny_dir), "--port", "0", "--log-level", "warning"]) == 0
    (host, port), = seen["bound"]
    assert host == "127.0.0.1" and port > 0 and seen["port"] == port
    assert f"on http://127.0.0.1:{port} " in seen["announced"]  # the real port, not 0


def test_missing_extra_names_the_pip_install(tmp_path):
    """`data clean` without datatrove: one line naming the extra (run where datatrove cannot be imported)."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"data": "hello"}\n')
    code = ("import sys; sys.modules['datatrove'] = None\n"
            "from telechat.cli import main\n"
            f"sys.exit(main(['data', 'clean', '--input', {str(src)!r}, '--output', {str(tmp_path / 'out')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == ('error: telechat data clean needs the datatrove package, which is not installed: '
                                'pip install "telechat[clean]"')


def test_missing_package_of_our_own_is_not_masked():
    from telechat.cli import missing_package_message

    assert missing_package_message("chat", ModuleNotFoundError("x", name="telechat.nothing")) is None
    assert missing_package_message("eval", ModuleNotFoundError("x", name="pyarrow")).endswith(
        'pip install "telechat[eval]"')
    assert missing_package_message("chat", ModuleNotFoundError("x", name="foo")).endswith("pip install foo")


# ---- eval: everything checked before the first item; finished tasks kept ---------------------------
@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    from test_eval_data import write_eval_fixtures

    return write_eval_fixtures(tmp_path_factory.mktemp("evaldata"))


@pytest.fixture()
def no_scoring(monkeypatch):
    """Any item scored or generated fails the test's expectation loudly."""
    from telechat.eval.loglik import LoglikEngine

    def scored(*a, **k):
        raise AssertionError("an item was scored before the mistake was reported")

    monkeypatch.setattr(LoglikEngine, "loglikelihood", scored)
    monkeypatch.setattr("telechat.eval.runner.generate_until", scored)


def test_eval_unknown_subject_fails_before_the_model_loads(eval_data, no_scoring, capsys):
    rc = main(["eval", "--model", MISSING, "--data-dir", str(eval_data), "--tasks", "mmlu,hellaswag",
               "--subjects", "no_such_subject"])
    assert rc == 1
    err = _error_line(capsys)
    assert "no_such_subject" in err and "mmlu" in err


def test_eval_subjects_apply_to_tasks_that_have_them(eval_data, tiny_dir, tmp_path, capsys):
    """mmlu,hellaswag --subjects abstract_algebra: mmlu keeps one subject, hellaswag (no subjects) all."""
    out = tmp_path / "r.json"
    rc = main(["eval", "--model", str(tiny_dir), "--data-dir", str(eval_data), "--tasks", "mmlu,hellaswag",
               "--subjects", "abstract_algebra", "--limit", "1", "--no-progress", "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    results = json.loads(out.read_text())["results"]
    assert set(results["mmlu"]["subjects"]) == {"abstract_algebra"} and results["hellaswag"]["n"] == 1


def test_eval_missing_data_of_a_later_task_fails_first(eval_data, tmp_path, no_scoring, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(eval_data / "mmlu", root / "mmlu")
    rc = main(["eval", "--model", MISSING, "--data-dir", str(root), "--tasks", "mmlu,gsm8k"])
    assert rc == 1
    assert "gsm8k data not found" in _error_line(capsys)


def test_eval_needs_pyarrow_said_before_anything_runs(eval_data, tmp_path, no_scoring, monkeypatch, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(eval_data / "mmlu", root / "mmlu")
    (root / "wikitext2").mkdir()
    (root / "wikitext2" / "wikitext-test.arrow").write_bytes(b"ARROW1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    rc = main(["eval", "--model", MISSING, "--data-dir", str(root), "--tasks", "mmlu,wikitext2"])
    assert rc == 1
    err = _error_line(capsys)
    assert "pyarrow" in err and 'pip install "telechat[eval]"' in err


def test_eval_generation_longer_than_the_context_fails_before_the_first_task(eval_data, tiny_dir, no_scoring,
                                                                             capsys):
    rc = main(["eval", "--model", str(tiny_dir), "--data-dir", str(eval_data), "--tasks", "mmlu,gsm8k",
               "--max-new-tokens", "100000", "--limit", "1"])
    assert rc == 1
    assert "gsm8k: max_new_tokens 100000 leaves no room" in _error_line(capsys)


def test_eval_keeps_finished_tasks_when_a_later_one_fails(eval_data, tiny_dir, tmp_path, monkeypatch, capsys):
    def broken(*a, **k):
        raise RuntimeError("generation broke")

    monkeypatch.setattr("telechat.eval.runner.generate_until", broken)
    out = tmp_path / "r.json"
    rc = main(["eval", "--model", str(tiny_dir), "--data-dir", str(eval_data), "--tasks", "mmlu,gsm8k,hellaswag",
               "--limit", "1", "--max-new-tokens", "4", "--no-progress", "--output", str(out)])
    assert rc == 1
    captured = capsys.readouterr()
    err = _without_setup_line(captured.err)
    assert len(err.splitlines()) == 1 and "gsm8k failed: generation broke" in err and str(out) in err
    assert "| mmlu |" in captured.out
    report = json.loads(out.read_text())
    assert list(report["results"]) == ["mmlu"] and report["results"]["mmlu"]["n"] > 0
    assert report["failed"] == {"task": "gsm8k", "error": "RuntimeError: generation broke",
                                "not_run": ["hellaswag"]}


# ---- small comforts (point 5) ---------------------------------------------------------------------
def test_threads_flag_sets_torch_threads(tiny_dir, monkeypatch, capsys):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        monkeypatch.setenv(var, "2")  # restored after the test
    before = torch.get_num_threads()
    try:
        assert main(["info", "--model", str(tiny_dir), "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        assert os.environ["RAYON_NUM_THREADS"] == "1"
        assert main(["chat", "--model", MISSING, "--threads", "0"]) == 1
        assert "--threads must be >= 1, got 0" in _error_line(capsys)
    finally:
        torch.set_num_threads(before)


def test_threads_default_is_the_cores_available(monkeypatch):
    from telechat.cli import available_cores, set_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        assert set_threads(None) == available_cores() == len(os.sched_getaffinity(0))
        assert torch.get_num_threads() == available_cores()
    finally:
        torch.set_num_threads(before)


def test_threads_on_every_computing_verb():
    parser = build_parser()
    for argv in (["chat"], ["serve"], ["eval", "--data-dir", "d"], ["train", "--stage", "sft", "--data", "d",
                                                                     "--output", "o"],
                 ["quantize", "--model", "m", "--output", "o"], ["data", "prepare", "--output", "o",
                                                                 "--tokenizer", "t", "--max-seq-len", "8"],
                 ["data", "clean", "--input", "i", "--output", "o"], ["tokenizer", "train", "--input", "i",
                                                                      "--output", "o"]):
        assert vars(parser.parse_args([*argv, "--threads", "3"]))["_threads"] == 3, argv


def test_help_in_interactive_chat_is_not_sent(tiny_dir, monkeypatch, capsys):
    sent = []
    real = telechat.LLM.chat

    def spy(self, question, *a, **k):
        sent.append(question)
        return real(self, question, *a, **k)

    monkeypatch.setattr(telechat.LLM, "chat", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("/help\nhello\n/exit\n"))
    assert main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr()
    assert sent == ["hello"]
    assert "/clear" in out.err and "/exit" in out.err and "/help" in out.err
    assert out.out.count("bot> ") == 1


# ---- the default model (slow) ---------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_chat_prompt_stops(default_llm):
    """The README's first prompt on the default model ends (at its end token or the 512 default)."""
    seen = []
    real = Engine.iter_tokens

    def counting(self, prompts, params, *a, **kw):
        seen.append(params[0].max_new_tokens)
        return real(self, prompts, params, *a, **kw)

    Engine.iter_tokens = counting
    try:
        answer, _ = default_llm.chat("Hello! Who are you?")
    finally:
        Engine.iter_tokens = real
    assert seen == [512]
    assert answer.strip() and "\ufffd" not in answer

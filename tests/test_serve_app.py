"""The HTTP server (telechat.serve): OpenAI protocol, TeleChat endpoints, batching, limits, auth, metrics, CLI.

Every test talks to a real uvicorn server on loopback (conftest.running_server); one module-scoped
server per configuration keeps the file fast.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from conftest import running_server
from telechat.chat import encode_conversation

MODEL = "tiny-chat"
Q = "hello world"

TELECHAT_MESSAGES = {"10301": "服务必填参数缺失", "10904": "服务请求参数dialog错误", "10305": "请求参数范围错误",
                     "10903": "服务执行失败"}


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(serve_llm):
    with running_server(serve_llm, model_name=MODEL, max_concurrency=4, max_queue=16) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def oai(server):
    c = openai.OpenAI(base_url=server + "/v1", api_key="not-checked", max_retries=0, timeout=60)
    yield c
    c.close()


@pytest.fixture(scope="module")
def tok(serve_llm):
    return serve_llm.tokenizer


# ---- helpers -------------------------------------------------------------------------------------
def assert_openai_error(r: httpx.Response, status: int, param, code=None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert "Traceback" not in r.text and 'File "' not in r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def sse_events(text: str) -> list[str]:
    """The raw SSE events (blank-line separated), each checked to be one `data: ` line."""
    assert text.endswith("\n\n"), text[-200:]
    events = [e for e in text.split("\n\n") if e]
    for e in events:
        assert e.startswith("data: ") and "\n" not in e, repr(e)
    return events


def sse_json(text: str) -> list[dict]:
    events = sse_events(text)
    assert events[-1] == "data: [DONE]"
    assert "data: [DONE]" not in events[:-1]
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def chat(client: httpx.Client, content=Q, **kw) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0, **kw}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def complete(client: httpx.Client, prompt, **kw) -> dict:
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def metrics(client: httpx.Client, **headers) -> dict:
    """{sample name + sorted labels: value} from /metrics, parsed by prometheus_client."""
    r = client.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def wait_for(pred, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(interval)


def has_token_text(line: str) -> bool:
    """An SSE line carrying generated text (not the role-only first chunk)."""
    if not line.startswith("data: {"):
        return False
    choices = json.loads(line[len("data: "):])["choices"]
    return bool(choices and choices[0].get("delta", {}).get("content"))


def stop_from(text: str) -> str:
    """A 2-character piece of `text` (no replacement chars), from past its start, so it must occur."""
    for i in range(2, len(text) - 1):
        piece = text[i:i + 2]
        if "\ufffd" not in piece:
            return piece
    pytest.fail(f"no usable stop string in {text!r}")


# ---- OpenAI protocol -----------------------------------------------------------------------------
def test_models_list(client, oai):
    r = client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL]
    card = body["data"][0]
    assert card["object"] == "model" and isinstance(card["created"], int)
    assert card["max_model_len"] == 512
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert_openai_error(client.get("/v1/models/gpt-4"), 404, "model", "model_not_found")
    assert [m.id for m in oai.models.list()] == [MODEL]


def test_index_page_and_unknown_route(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<html" in r.text.lower()
    err = assert_openai_error(client.get("/v1/nope"), 404, None)
    assert err["type"] == "not_found_error"
    assert_openai_error(client.get("/v1/chat/completions"), 405, None)


def test_chat_nonstream_openai_client(oai, tok):
    before = time.time()
    r = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": Q}], max_tokens=12,
                                    temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert before - 5 <= r.created <= time.time() + 5
    assert r.model == MODEL
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.index == 0 and c.message.role == "assistant"
    assert isinstance(c.message.content, str) and c.message.content
    assert c.finish_reason == "length"  # the random tiny model does not stop within 12 tokens
    assert r.usage.prompt_tokens == len(encode_conversation(tok, Q, []))
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # "default" names the served model too, and greedy decoding is deterministic
    again = oai.chat.completions.create(model="default", messages=[{"role": "user", "content": Q}], max_tokens=12,
                                        temperature=0)
    assert again.choices[0].message.content == c.message.content
    assert again.id != r.id


def test_chat_history_and_system_change_the_prompt(client, tok):
    history = [{"role": "system", "content": "You are TeleChat."}, {"role": "user", "content": "hi"},
               {"role": "assistant", "content": "hello there"}]
    r = chat(client, messages=history + [{"role": "user", "content": Q}], max_tokens=2)
    want = encode_conversation(tok, Q, [{"role": m["role"], "content": m["content"]} for m in history])
    assert r["usage"]["prompt_tokens"] == len(want)
    # the content may also come as a list of text parts
    parts = chat(client, messages=[{"role": "user", "content": [{"type": "text", "text": "hello "},
                                                                {"type": "text", "text": "world"}]}], max_tokens=6)
    assert parts["choices"][0]["message"]["content"] == chat(client, max_tokens=6)["choices"][0]["message"]["content"]


def test_chat_stream_openai_client(oai):
    whole = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": Q}], max_tokens=16,
                                        temperature=0)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": Q}], max_tokens=16,
                                              temperature=0, stream=True, stream_options={"include_usage": True}))
    assert len(chunks) >= 3
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert {c.model for c in chunks} == {MODEL}
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.model_dump() == whole.usage.model_dump()
    text = "".join(c.choices[0].delta.content or "" for c in body)
    assert text == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in body]
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}


def test_raw_sse_framing(client):
    body = {"model": MODEL, "messages": [{"role": "user", "content": Q}], "max_tokens": 8, "temperature": 0,
            "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode("utf-8")
    chunks = sse_json(text)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all("usage" not in c for c in chunks)  # only with stream_options.include_usage
    assert all(len(c["choices"]) == 1 and c["choices"][0]["index"] == 0 for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed == chat(client, max_tokens=8)["choices"][0]["message"]["content"]


def test_completions_stream_raw(client):
    body = {"model": MODEL, "prompt": "The quick brown", "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        text = r.read().decode("utf-8")
    chunks = sse_json(text)
    assert all(c["object"] == "text_completion" for c in chunks)
    whole = complete(client, "The quick brown", max_tokens=10)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_completions_string_prompt(client, tok):
    prompt = "The quick brown"
    r = complete(client, prompt, max_tokens=10)
    assert r["id"].startswith("cmpl-") and r["object"] == "text_completion" and r["model"] == MODEL
    assert len(r["choices"]) == 1
    c = r["choices"][0]
    assert c["index"] == 0 and isinstance(c["text"], str) and c["text"]
    assert c["finish_reason"] == "length"
    assert r["usage"] == {"prompt_tokens": len(tok.encode(prompt)), "completion_tokens": 10,
                          "total_tokens": len(tok.encode(prompt)) + 10}
    # token ids as the prompt give the same continuation; echo prefixes the prompt
    ids = complete(client, tok.encode(prompt), max_tokens=10)
    assert ids["choices"][0]["text"] == c["text"]
    echo = complete(client, prompt, max_tokens=10, echo=True)
    assert echo["choices"][0]["text"] == tok.decode(tok.encode(prompt)) + c["text"]


def test_completions_list_of_prompts_and_n(client, tok):
    prompts = ["The quick brown", "今天天气很好"]
    r = complete(client, prompts, max_tokens=8, n=2)
    texts = [c["text"] for c in r["choices"]]
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: n copies agree
    assert texts[0] == complete(client, prompts[0], max_tokens=8)["choices"][0]["text"]
    assert texts[2] == complete(client, prompts[1], max_tokens=8)["choices"][0]["text"]
    assert texts[0] != texts[2]
    n_prompt = sum(len(tok.encode(p)) for p in prompts)
    assert r["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 32, "total_tokens": n_prompt + 32}


def test_seed_makes_sampling_reproducible(client):
    kw = dict(max_tokens=12, temperature=1.0, n=2)
    a = complete(client, "The quick brown", seed=1234, **kw)
    b = complete(client, "The quick brown", seed=1234, **kw)
    c = complete(client, "The quick brown", seed=99, **kw)
    ta, tb, tc = ([x["text"] for x in r["choices"]] for r in (a, b, c))
    assert ta == tb
    assert ta[0] != ta[1]  # each of the n choices draws its own sample
    assert ta != tc
    greedy = complete(client, "The quick brown", max_tokens=12)["choices"][0]["text"]
    assert greedy not in ta  # temperature 1 really samples
    # chat too
    x = chat(client, max_tokens=10, temperature=0.9, seed=7)["choices"][0]["message"]["content"]
    y = chat(client, max_tokens=10, temperature=0.9, seed=7)["choices"][0]["message"]["content"]
    assert x == y


def test_chat_stream_n2_matches_nonstream(client):
    body = {"model": MODEL, "messages": [{"role": "user", "content": Q}], "max_tokens": 6, "temperature": 0.8,
            "seed": 3, "n": 2}
    whole = client.post("/v1/chat/completions", json=body).json()
    assert [c["index"] for c in whole["choices"]] == [0, 1]
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks = sse_json(r.read().decode("utf-8"))
    texts, reasons = {0: "", 1: ""}, {}
    for ch in chunks:
        (c,) = ch["choices"]
        texts[c["index"]] += c["delta"].get("content") or ""
        if c["finish_reason"]:
            reasons[c["index"]] = c["finish_reason"]
    assert [texts[0], texts[1]] == [c["message"]["content"] for c in whole["choices"]]
    assert reasons == {0: "length", 1: "length"}
    assert texts[0] != texts[1]


def test_stop_strings(client):
    answer = chat(client, max_tokens=30)["choices"][0]["message"]["content"]
    stop = stop_from(answer)
    want = answer[:answer.index(stop)]
    r = chat(client, max_tokens=30, stop=[stop, "never-in-this-text-\u2603"])
    c = r["choices"][0]
    assert c["message"]["content"] == want
    assert c["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] < 30
    # streamed, the stop string (even split across tokens) is never sent
    body = {"model": MODEL, "messages": [{"role": "user", "content": Q}], "max_tokens": 30, "temperature": 0,
            "stream": True, "stop": stop}
    with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        chunks = sse_json(resp.read().decode("utf-8"))
    assert "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # and on /v1/completions
    text = complete(client, "The quick brown", max_tokens=30)["choices"][0]["text"]
    s2 = stop_from(text)
    cut = complete(client, "The quick brown", max_tokens=30, stop=s2)["choices"][0]
    assert cut["text"] == text[:text.index(s2)] and cut["finish_reason"] == "stop"


def test_top_k_extension(client):
    greedy = complete(client, "The quick brown", max_tokens=10)["choices"][0]["text"]
    # sampling from the single most likely token is greedy decoding, whatever the seed
    for seed in (1, 2):
        r = complete(client, "The quick brown", max_tokens=10, temperature=1.0, top_k=1, seed=seed)
        assert r["choices"][0]["text"] == greedy
    off = complete(client, "The quick brown", max_tokens=10, temperature=1.0, top_k=-1, seed=1)
    assert off["choices"][0]["text"] != greedy
    oai_style = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "top_k": "3"})
    assert_openai_error(oai_style, 400, "top_k")


def test_repetition_penalty_extension(client):
    plain = chat(client, max_tokens=30)["choices"][0]["message"]["content"]
    penalized = chat(client, max_tokens=30, repetition_penalty=5)["choices"][0]["message"]["content"]
    assert penalized != plain  # the greedy answer repeats itself ("zzzz..."), a strong penalty changes it


# ---- bad input -----------------------------------------------------------------------------------
_LONG = "hello world " * 300  # well over the 512-token context

BAD = [
    # (id, path, body (bytes = raw), status, param, code)
    ("malformed-json", "/v1/chat/completions", b'{"messages": [', 400, None, "invalid_json"),
    ("not-an-object", "/v1/chat/completions", b"[1, 2]", 400, None, "invalid_json"),
    ("not-utf8", "/v1/completions", b"\xff\xfe{", 400, None, "invalid_json"),
    ("no-messages", "/v1/chat/completions", {"model": MODEL}, 400, "messages", "missing_required_parameter"),
    ("messages-str", "/v1/chat/completions", {"messages": "hi"}, 400, "messages", None),
    ("messages-empty", "/v1/chat/completions", {"messages": []}, 400, "messages", None),
    ("bad-role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages.0.role", None),
    ("empty-content", "/v1/chat/completions", {"messages": [{"role": "user", "content": " "}]}, 400,
     "messages.0.content", None),
    ("last-not-user", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, 400,
     "messages.1.role", None),
    ("system-late", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "user", "content": "c"}]}, 400, "messages.1.role", None),
    ("temperature-str", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                                 "temperature": "0.5"}, 400, "temperature", "invalid_value"),
    ("temperature-range", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                                   "temperature": 2.5}, 400, "temperature", None),
    ("top-p-zero", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_p": 0}, 400,
     "top_p", None),
    ("max-tokens-str", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                                "max_tokens": "16"}, 400, "max_tokens", None),
    ("max-tokens-zero", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                                 "max_tokens": 0}, 400, "max_tokens", None),
    ("max-tokens-over-context", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                                         "max_tokens": 100000}, 400, "max_tokens",
     "context_length_exceeded"),
    ("max-completion-tokens-over-context", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 600}, 400, "max_completion_tokens",
     "context_length_exceeded"),
    ("stream-str", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "stream": "yes"}, 400,
     "stream", None),
    ("n-zero", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "n": 0}, 400, "n", None),
    ("seed-str", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "seed": "1"}, 400,
     "seed", None),
    ("stop-empty", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "stop": ""}, 400,
     "stop", None),
    ("presence-penalty", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                                  "presence_penalty": 0.5}, 400, "presence_penalty",
     "unsupported_parameter"),
    ("unknown-model", "/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "a"}]},
     404, "model", "model_not_found"),
    ("chat-too-long", "/v1/chat/completions", {"messages": [{"role": "user", "content": _LONG}]}, 400, "messages",
     "context_length_exceeded"),
    ("no-prompt", "/v1/completions", {"max_tokens": 3}, 400, "prompt", "missing_required_parameter"),
    ("prompt-int", "/v1/completions", {"prompt": 5}, 400, "prompt", None),
    ("prompt-empty", "/v1/completions", {"prompt": ""}, 400, "prompt", None),
    ("prompt-empty-list", "/v1/completions", {"prompt": []}, 400, "prompt", None),
    ("prompt-bad-id", "/v1/completions", {"prompt": [1, 99999]}, 400, "prompt", None),
    ("prompt-too-long", "/v1/completions", {"prompt": _LONG}, 400, "prompt", "context_length_exceeded"),
    ("prompt-max-tokens", "/v1/completions", {"prompt": "hello", "max_tokens": 1000}, 400, "max_tokens",
     "context_length_exceeded"),
    ("prompt-too-many", "/v1/completions", {"prompt": ["a"] * 10, "n": 16}, 400, "prompt", None),
    ("completions-unknown-model", "/v1/completions", {"model": "nope", "prompt": "a"}, 404, "model",
     "model_not_found"),
]


@pytest.mark.parametrize("path,body,status,param,code", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request(client, path, body, status, param, code):
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert_openai_error(r, status, param, code)


def test_burst_of_bad_requests_leaves_a_working_engine(client, server):
    with httpx.Client(base_url=server, timeout=30, limits=httpx.Limits(max_connections=8)) as c:
        def send(case):
            _, path, body, status, *_ = case
            r = c.post(path, content=body) if isinstance(body, bytes) else c.post(path, json=body)
            return r.status_code, status

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(send, BAD + BAD[::-1]))
    assert all(got == want for got, want in results), results
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["running"] == 0 and health["waiting"] == 0
    r = chat(client, max_tokens=4)
    assert r["usage"]["completion_tokens"] == 4 and r["choices"][0]["message"]["content"]


# ---- batching, disconnects, metrics --------------------------------------------------------------
def test_concurrent_greedy_requests_match_single(client, server):
    prompts = ["The quick brown", "今天天气很好", "Large language models", "北京是中国的", "Numbers like 2024"]
    alone = [complete(client, p, max_tokens=12)["choices"][0]["text"] for p in prompts]

    def one(p):
        with httpx.Client(base_url=server, timeout=60) as c:
            return complete(c, p, max_tokens=12)["choices"][0]["text"]

    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(one, prompts))
    assert together == alone


@pytest.fixture()
def slow_steps(serve_llm, monkeypatch):
    """10 ms more per engine step, so a 480-token answer is still running when the client leaves
    (the tiny model alone makes one in well under a second)."""
    head = serve_llm.model.lm_head
    real = head.forward

    def slow(x):
        time.sleep(0.01)
        return real(x)
    monkeypatch.setattr(head, "forward", slow)


def test_threads_generate_while_the_server_runs_on_the_same_llm(client, server, serve_llm):
    """In-process `generate`/`chat` from several threads and HTTP requests, all at once on one LLM
    (one engine): each answer equals the one it gets alone, computed before any concurrency."""
    texts = ["The quick brown", "今天天气很好", "Large language models"]
    g = torch.Generator().manual_seed(7)
    id_prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (9, 40, 23)]
    gen_alone = [serve_llm.generate(p, max_new_tokens=16, eos_token_id=-1)[0].tolist() for p in id_prompts]
    http_alone = [complete(client, t, max_tokens=12)["choices"][0]["text"] for t in texts]
    chat_alone = serve_llm.chat("你好", max_new_tokens=10)[0]

    def http(t):
        with httpx.Client(base_url=server, timeout=60) as c:
            return complete(c, t, max_tokens=12)["choices"][0]["text"]

    with ThreadPoolExecutor(7) as pool:
        gens = [pool.submit(serve_llm.generate, p, max_new_tokens=16, eos_token_id=-1) for p in id_prompts]
        https = [pool.submit(http, t) for t in texts]
        chatted = pool.submit(lambda: serve_llm.chat("你好", max_new_tokens=10)[0])
        assert [f.result()[0].tolist() for f in gens] == gen_alone
        assert [f.result() for f in https] == http_alone
        assert chatted.result() == chat_alone
    assert client.get("/health").json()["status"] == "ok"


def _cancelled(client) -> float:
    return metrics(client)[("telechat_sequences_finished_total", (("reason", "cancelled"),))]


def test_disconnect_frees_slot_streaming(client, server, slow_steps):
    cancelled = _cancelled(client)
    body = {"model": MODEL, "messages": [{"role": "user", "content": Q}], "max_tokens": 480, "temperature": 0,
            "stream": True}
    with httpx.Client(base_url=server, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            got = 0
            for line in r.iter_lines():
                if has_token_text(line):
                    got += 1
                    if got == 3:
                        break
            assert client.get("/health").json()["running"] == 1
    t0 = time.monotonic()
    assert wait_for(lambda: client.get("/health").json()["running"] == 0, 3.0), "the slot was not freed"
    assert time.monotonic() - t0 < 3.0
    m = metrics(client)
    assert m[("telechat_running_sequences", ())] == 0
    assert wait_for(lambda: _cancelled(client) == cancelled + 1, 2.0)


def test_disconnect_frees_slot_nonstreaming(client, server, slow_steps):
    cancelled = _cancelled(client)
    body = {"model": MODEL, "messages": [{"role": "user", "content": Q}], "max_tokens": 480, "temperature": 0}
    with httpx.Client(base_url=server, timeout=httpx.Timeout(30, read=0.4)) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/chat/completions", json=body)
    assert wait_for(lambda: client.get("/health").json()["running"] == 0, 3.0), "the slot was not freed"
    assert wait_for(lambda: _cancelled(client) == cancelled + 1, 2.0)


def test_metrics_parse_and_move(client, tok):
    before = metrics(client)
    r = chat(client, max_tokens=5)
    after = metrics(client)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("telechat_generation_tokens_total") >= 5
    assert delta("telechat_prompt_tokens_total") >= r["usage"]["prompt_tokens"]
    assert delta("telechat_decode_steps_total") >= 4
    assert delta("telechat_time_to_first_token_seconds_count") >= 1
    assert delta("telechat_time_to_first_token_seconds_sum") > 0
    assert delta("telechat_sequence_seconds_count") >= 1
    assert delta("telechat_sequences_finished_total", reason="length") >= 1
    assert after[("telechat_queue_depth", ())] == 0
    assert after[("telechat_running_sequences", ())] == 0
    assert after[("telechat_max_concurrency", ())] == 4
    assert after[("telechat_generation_tokens_per_second", ())] > 0
    # request counts by path and status (counted as the response goes out, so allow a moment)
    ok = ("telechat_http_requests_total", (("path", "/v1/chat/completions"), ("status", "200")))
    assert wait_for(lambda: metrics(client).get(ok, 0) >= before.get(ok, 0) + 1, 2.0)
    bad = ("telechat_http_requests_total", (("path", "/v1/chat/completions"), ("status", "400")))
    n_bad = metrics(client).get(bad, 0)
    client.post("/v1/chat/completions", json={"messages": []})
    assert wait_for(lambda: metrics(client).get(bad, 0) == n_bad + 1, 2.0)


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok" and h["model"] == MODEL and h["max_concurrency"] == 4
    assert h["running"] == 0 and h["waiting"] == 0


# ---- TeleChat endpoints --------------------------------------------------------------------------
DIALOG = [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello there"},
          {"role": "user", "content": Q}]


def _telechat_budget(tok):
    """(max_length, answer tokens) such that the whole dialog fits the prompt share of max_length."""
    n = len(encode_conversation(tok, Q, DIALOG[:-1]))
    return 2 * n, n


def test_telechat_v4_matches_chat_greedy(client, tok):
    max_length, new = _telechat_budget(tok)
    r = client.post("/telechat/gptDialog/v4", json={"dialog": DIALOG, "do_sample": False, "max_length": max_length,
                                                    "repetition_penalty": 2})  # int for a float field
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"role", "content"} and body["role"] == "bot"
    msgs = [{"role": "assistant" if m["role"] == "bot" else "user", "content": m["content"]} for m in DIALOG]
    want = chat(client, messages=msgs, max_tokens=new, repetition_penalty=2)
    assert body["content"] == want["choices"][0]["message"]["content"]
    assert body["content"]


def test_telechat_v2_streams_the_v4_answer(client, tok):
    max_length, _ = _telechat_budget(tok)
    req = {"dialog": DIALOG, "do_sample": False, "max_length": max_length, "repetition_penalty": 1.5,
           "top_k": 5, "top_p": 0.5, "temperature": 0.5}
    v4 = client.post("/telechat/gptDialog/v4", json=req)
    assert v4.status_code == 200
    with client.stream("POST", "/telechat/gptDialog/v2", json=req) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        pieces = list(r.iter_bytes())
    assert b"".join(pieces).decode("utf-8") == v4.json()["content"]


def test_telechat_defaults_sample(client):
    # the published defaults (do_sample true, temperature 0.1, ...) with a short max_length
    r = client.post("/telechat/gptDialog/v4", json={"dialog": [{"role": "user", "content": Q}], "max_length": 24})
    assert r.status_code == 200, r.text
    assert r.json()["role"] == "bot" and isinstance(r.json()["content"], str)


TELECHAT_BAD = [
    ("malformed-json", b'{"dialog": [', "10301"),
    ("no-dialog", {"max_length": 10}, "10301"),
    ("first-bot", {"dialog": [{"role": "bot", "content": "hi"}]}, "10904"),
    ("last-bot", {"dialog": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}, "10904"),
    ("user-user", {"dialog": [{"role": "user", "content": "hi"}, {"role": "user", "content": "yo"}]}, "10904"),
    ("empty-dialog", {"dialog": []}, "10904"),
    ("top-p", {"dialog": DIALOG, "top_p": 1.5}, "10305"),
    ("temperature-zero", {"dialog": DIALOG, "temperature": 0}, "10305"),
    ("max-length", {"dialog": DIALOG, "max_length": 5000}, "10305"),
    ("top-k", {"dialog": DIALOG, "top_k": 100}, "10305"),
    ("do-sample-str", {"dialog": DIALOG, "do_sample": "yes"}, "10305"),
    ("repetition-penalty-low", {"dialog": DIALOG, "repetition_penalty": 0.5}, "10305"),
    ("temperature-str", {"dialog": DIALOG, "temperature": "0.5"}, "10305"),
]


@pytest.mark.parametrize("endpoint", ["v4", "v2"])
@pytest.mark.parametrize("body,code", [c[1:] for c in TELECHAT_BAD], ids=[c[0] for c in TELECHAT_BAD])
def test_telechat_errors(client, endpoint, body, code):
    path = f"/telechat/gptDialog/{endpoint}"
    r = client.post(path, content=body) if isinstance(body, bytes) else client.post(path, json=body)
    assert r.status_code == 400, r.text
    assert "Traceback" not in r.text
    err = r.json()
    assert err["code"] == code
    assert err["message"] == TELECHAT_MESSAGES[code]
    assert err["flag"] == "0"
    assert isinstance(err.get("detail"), str) and err["detail"]


# ---- API key -------------------------------------------------------------------------------------
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def auth_server(serve_llm):
    with running_server(serve_llm, model_name=MODEL, api_key=KEY, max_concurrency=2) as url:
        yield url


@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/"),
                                         ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                                         ("POST", "/telechat/gptDialog/v4"), ("POST", "/telechat/gptDialog/v2")])
def test_api_key_required(auth_server, method, path):
    with httpx.Client(base_url=auth_server, timeout=30) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                        {"Authorization": f"Bearer {KEY}x"}):
            r = c.request(method, path, headers=headers, json={"messages": [{"role": "user", "content": "a"}]})
            assert_openai_error(r, 401, None, "invalid_api_key")
            assert "www-authenticate" in r.headers


def test_api_key_accepted(auth_server):
    with httpx.Client(base_url=auth_server, timeout=30) as c:
        assert c.get("/health").status_code == 200  # open, for probes
        ok = {"Authorization": f"Bearer {KEY}"}
        assert c.get("/v1/models", headers=ok).json()["data"][0]["id"] == MODEL
        assert c.get("/metrics", headers=ok).status_code == 200
        r = c.post("/v1/chat/completions", headers=ok,
                   json={"messages": [{"role": "user", "content": Q}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        # the web page takes HTTP Basic with the key as the password (any user name)
        page = c.get("/", headers={"Authorization": "Basic " + base64.b64encode(f"me:{KEY}".encode()).decode()})
        assert page.status_code == 200 and "<html" in page.text.lower()
        bad = c.get("/", headers={"Authorization": "Basic " + base64.b64encode(b"me:nope").decode()})
        assert bad.status_code == 401 and bad.headers["www-authenticate"].startswith("Basic")


def test_api_key_openai_client(auth_server):
    good = openai.OpenAI(base_url=auth_server + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in good.models.list()] == [MODEL]
    bad = openai.OpenAI(base_url=auth_server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# ---- body limit ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_body_server(serve_llm):
    with running_server(serve_llm, model_name=MODEL, max_body_bytes=300, max_concurrency=2) as url:
        yield url


def test_body_limit(small_body_server):
    big = {"messages": [{"role": "user", "content": "x" * 1000}], "max_tokens": 2}
    with httpx.Client(base_url=small_body_server, timeout=30) as c:
        assert_openai_error(c.post("/v1/chat/completions", json=big), 413, None, "request_too_large")
        assert_openai_error(c.post("/v1/completions", json={"prompt": "x" * 1000}), 413, None, "request_too_large")
        r = c.post("/telechat/gptDialog/v4", json={"dialog": [{"role": "user", "content": "x" * 1000}]})
        assert r.status_code == 413

        def chunked():  # no Content-Length: the limit still holds while reading
            yield b'{"prompt": "'
            for _ in range(20):
                yield b"x" * 50
            yield b'"}'

        assert_openai_error(c.post("/v1/completions", content=chunked()), 413, None, "request_too_large")
        small = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": Q}], "max_tokens": 2})
        assert small.status_code == 200 and small.json()["usage"]["completion_tokens"] == 2


# ---- queue limit ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def busy_server(serve_llm):
    with running_server(serve_llm, model_name=MODEL, max_concurrency=1, max_queue=1) as url:
        yield url


def test_queue_then_429_with_retry_after(busy_server, slow_steps):
    long = {"messages": [{"role": "user", "content": Q}], "max_tokens": 450, "temperature": 0, "stream": True}
    short = {"messages": [{"role": "user", "content": Q}], "max_tokens": 4, "temperature": 0}
    with httpx.Client(base_url=busy_server, timeout=30) as c:
        queued: dict = {}
        with c.stream("POST", "/v1/chat/completions", json=long) as held:
            assert held.status_code == 200
            lines = held.iter_lines()
            assert next(line for line in lines if has_token_text(line))  # generating: the slot is taken
            h = c.get("/health").json()
            assert h["running"] == 1 and h["waiting"] == 0
            # a queued streaming client that goes away leaves the queue at once
            with httpx.Client(base_url=busy_server, timeout=30) as c3:
                with c3.stream("POST", "/v1/chat/completions", json=long) as q:
                    assert q.status_code == 200
                    assert next(q.iter_lines()).startswith("data: {")  # the role chunk; no token yet
                    assert c.get("/health").json()["waiting"] == 1
            assert wait_for(lambda: c.get("/health").json()["waiting"] == 0, 3.0), "the queued request stayed"

            def waiter():
                with httpx.Client(base_url=busy_server, timeout=60) as c2:
                    r = c2.post("/v1/chat/completions", json=short)
                    queued["status"], queued["body"] = r.status_code, r.json()

            t = threading.Thread(target=waiter, daemon=True)
            t.start()
            assert wait_for(lambda: c.get("/health").json()["waiting"] == 1, 5.0), "the second request did not queue"
            assert metrics(c)[("telechat_queue_depth", ())] == 1
            assert "status" not in queued  # still waiting for the slot

            t0 = time.monotonic()
            r = c.post("/v1/chat/completions", json=short)
            assert time.monotonic() - t0 < 2.0  # at once, not after the queue drains
            err = assert_openai_error(r, 429, None, "rate_limit_exceeded")
            assert err["type"] == "rate_limit_error"
            assert int(r.headers["retry-after"]) >= 1
            tc = c.post("/telechat/gptDialog/v4", json={"dialog": [{"role": "user", "content": Q}]})
            assert tc.status_code == 429 and int(tc.headers["retry-after"]) >= 1
            assert tc.json()["code"] == "10903"
            s = c.post("/v1/chat/completions", json={**short, "stream": True})
            assert s.status_code == 429
            # a batch (n=2) that cannot all be queued is refused whole, leaving the queue as it was
            assert c.post("/v1/completions", json={"prompt": Q, "n": 2, "max_tokens": 2}).status_code == 429
            assert c.get("/health").json()["waiting"] == 1
        # closing the long stream frees the slot; the queued request then runs
        t.join(timeout=20)
        assert queued.get("status") == 200, queued
        assert queued["body"]["usage"]["completion_tokens"] == 4
        assert wait_for(lambda: c.get("/health").json()["running"] == 0, 3.0)
        assert c.post("/v1/chat/completions", json=short).status_code == 200


# ---- the CLI -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _non_loopback_ip() -> str | None:
    candidates = []
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks a route
            candidates.append(s.getsockname()[0])
    except OSError:
        pass
    try:
        candidates += socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        pass
    return next((ip for ip in candidates if not ip.startswith("127.") and ip != "0.0.0.0"), None)


def test_cli_serve(tiny_dir):
    port = _free_port()
    exe = shutil.which("telechat")
    cmd = [exe] if exe else [sys.executable, "-m", "telechat.cli"]
    cmd += ["serve", "--model", str(tiny_dir), "--port", str(port), "--api-key", "k", "--max-concurrency", "2",
            "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        def up():
            if proc.poll() is not None:
                pytest.fail(f"telechat serve exited with {proc.returncode}: {proc.stdout.read()}")
            try:
                return httpx.get(base + "/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        assert wait_for(up, 60, 0.2), "the server did not come up"
        h = httpx.get(base + "/health").json()
        assert h["status"] == "ok" and h["max_concurrency"] == 2 and h["model"] == tiny_dir.name
        assert httpx.get(base + "/v1/models").status_code == 401
        assert httpx.get(base + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = {"Authorization": "Bearer k"}
        assert httpx.get(base + "/v1/models", headers=ok).json()["data"][0]["id"] == tiny_dir.name
        r = httpx.post(base + "/v1/completions", headers=ok, timeout=30,
                       json={"prompt": "The quick", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
        ip = _non_loopback_ip()
        if ip is not None:  # bound to 127.0.0.1 only: the machine's other address refuses
            with pytest.raises(OSError):
                socket.create_connection((ip, port), timeout=2).close()
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert f"http://127.0.0.1:{port}" in out


# ---- the default model, 8 concurrent streaming clients -------------------------------------------
QUESTIONS = ["What is 2+2?", "Name a color.", "Say hello.", "What is the capital of France?", "Count to three.",
             "What is water made of?", "Name an animal.", "What day comes after Monday?"]


@pytest.mark.slow
def test_default_model_concurrent_streams_match_single(default_llm):
    tok = default_llm.tokenizer
    # in-process reference first (the model is not shared with a running engine yet)
    ref = {}
    for q in QUESTIONS[:2]:
        ids = encode_conversation(tok, q, [])
        out = default_llm.generate(ids, max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
        stops = set(default_llm.sampling_params().stop_ids)
        cut = next((i for i, t in enumerate(out) if t in stops), len(out))  # the stop id and padding after it
        ref[q] = tok.decode(out[:cut])

    with running_server(default_llm, model_name="smol", max_concurrency=8) as url:
        def ask(c: httpx.Client, q: str) -> tuple[str, str]:
            body = {"model": "smol", "messages": [{"role": "user", "content": q}], "max_tokens": 16,
                    "temperature": 0, "stream": True}
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                chunks = sse_json(r.read().decode("utf-8"))
            text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks)
            return text, chunks[-1]["choices"][0]["finish_reason"]

        with httpx.Client(base_url=url, timeout=120) as c:
            alone = [ask(c, q) for q in QUESTIONS]

        barrier = threading.Barrier(len(QUESTIONS))

        def concurrent(q):
            with httpx.Client(base_url=url, timeout=120) as c:
                barrier.wait()
                return ask(c, q)

        with httpx.Client(base_url=url, timeout=10) as c:
            before = metrics(c)
            with ThreadPoolExecutor(len(QUESTIONS)) as pool:
                together = list(pool.map(concurrent, QUESTIONS))
            after = metrics(c)
    assert all(reason in ("stop", "length") for _, reason in together)
    assert all(text.strip() for text, _ in together)
    assert together == alone
    assert len({t for t, _ in together}) == len(QUESTIONS)
    # they really shared decode steps (one at a time, each token would take a step of its own)
    steps = after[("telechat_decode_steps_total", ())] - before[("telechat_decode_steps_total", ())]
    tokens = after[("telechat_generation_tokens_total", ())] - before[("telechat_generation_tokens_total", ())]
    assert tokens >= len(QUESTIONS) and steps < tokens / 2
    for q in QUESTIONS[:2]:
        assert alone[QUESTIONS.index(q)][0] == ref[q]


# ---- one request's trouble stays its own ---------------------------------------------------------
def test_a_failing_request_does_not_fail_the_others(client, server, monkeypatch):
    import telechat.engine as engine_mod

    body = {"model": MODEL, "messages": [{"role": "user", "content": Q}], "max_tokens": 40, "temperature": 0}
    alone = chat(client, max_tokens=40)["choices"][0]["message"]["content"]
    real = engine_mod.sample_rows

    def failing(logits, s):  # a sampler failure (say, a device error) for one request's row
        if bool((s.temperature == 0.777).any()):
            raise RuntimeError("sampling blew up")
        return real(logits, s)

    monkeypatch.setattr(engine_mod, "sample_rows", failing)

    def good():
        with httpx.Client(base_url=server, timeout=60) as c:
            return c.post("/v1/chat/completions", json=body).json()

    def bad():
        with httpx.Client(base_url=server, timeout=60) as c:
            return c.post("/v1/chat/completions", json={**body, "temperature": 0.777})

    with ThreadPoolExecutor(2) as pool:
        g, b = pool.submit(good), pool.submit(bad)
        got, failed = g.result(), b.result()
    assert got["choices"][0]["message"]["content"] == alone
    assert failed.status_code == 500  # a server fault, in OpenAI's shape
    assert set(failed.json()["error"]) == {"message", "type", "param", "code"}
    assert "sampling blew up" in failed.json()["error"]["message"]
    # settings that would overflow the logits are refused up front
    r = client.post("/v1/chat/completions", json={**body, "temperature": 1.0, "repetition_penalty": 1e-45})
    assert_openai_error(r, 400, "repetition_penalty")
    # a temperature too small to divide by is greedy decoding
    tiny = chat(client, max_tokens=40, temperature=1e-45)
    assert tiny["choices"][0]["message"]["content"] == alone


def test_stop_string_counts_as_stop(client, serve_llm):
    answer = chat(client, max_tokens=24)["choices"][0]["message"]["content"]
    stop = answer[len(answer) // 2:len(answer) // 2 + 2]
    assert stop.strip()
    before = metrics(client)
    r = chat(client, max_tokens=24, stop=[stop])
    assert r["choices"][0]["finish_reason"] == "stop"
    key = ("telechat_sequences_finished_total", (("reason", "stop"),))
    assert wait_for(lambda: metrics(client)[key] == before[key] + 1, 3.0)


def test_deeply_nested_body_is_a_400(client):
    r = client.post("/v1/chat/completions", content=b"[" * 100_000, headers={"content-type": "application/json"})
    assert r.status_code in (400, 413) and "error" in r.json()

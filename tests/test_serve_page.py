"""The web chat page at `/` (serve/static/index.html), driven in a real headless Chromium.

Debian's `chromium` runs under Playwright's sync API; the server is the real app under uvicorn on
loopback (conftest.running_server). The default model (SmolLM2-135M-Instruct) answers where the
text matters (streaming, greedy answers, Chinese, Stop); the tiny random model where only the
page's mechanics do (Clear, the sampling controls, the API key).
"""
from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import time

import httpx
import pytest

from conftest import running_server


def _chromium() -> str | None:
    for path in ("/usr/bin/chromium", shutil.which("chromium")):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


CHROMIUM = _chromium()
if CHROMIUM is None:
    pytest.skip("Debian's chromium is not installed (no /usr/bin/chromium, no `chromium` on PATH)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
TIMEOUT_MS = 180_000  # generous: the default model on two busy CPU cores can be slow
CHAT = "/v1/chat/completions"
KEY = "page-test-key"

# Installed before the page's own script: logs every change of every assistant bubble's text or
# `streaming` class (bubble ordinal n, text, streaming), so the test sees the stream as it grew.
OBSERVER = """
window.__updates = [];
(() => {
  const ids = new WeakMap();
  let next = 0;
  new MutationObserver(() => {
    for (const b of document.querySelectorAll('#messages .msg.assistant')) {
      if (!ids.has(b)) ids.set(b, next++);
      const rec = {n: ids.get(b), text: b.textContent, streaming: b.classList.contains('streaming')};
      let last = null;
      for (const u of window.__updates) if (u.n === rec.n) last = u;
      if (!last || last.text !== rec.text || last.streaming !== rec.streaming) window.__updates.push(rec);
    }
  }).observe(document, {subtree: true, childList: true, characterData: true, attributes: true,
                        attributeFilter: ['class']});
})();
"""

IDLE = """() => !document.getElementById('send').disabled && document.getElementById('stop').disabled
               && !document.querySelector('#messages .msg.streaming')"""

# Draws each distinct Han character of `el` in el's own font on a canvas: with a CJK font every
# character gets its own bitmap; without one they all come out as the same .notdef box.
GLYPHS = """(el) => {
  const family = getComputedStyle(el).fontFamily;
  const c = document.createElement('canvas'); c.width = c.height = 64;
  const x = c.getContext('2d');
  const draw = (ch) => { x.clearRect(0, 0, 64, 64); x.font = '40px ' + family; x.fillStyle = '#000';
                         x.fillText(ch, 4, 48); return x.getImageData(0, 0, 64, 64).data.join(','); };
  const chars = [...new Set([...el.textContent].filter((ch) => /\\p{Script=Han}/u.test(ch)))];
  return {chars: chars.length, bitmaps: new Set(chars.map(draw)).size};
}"""


def _is_chat_post(request) -> bool:
    return request.method == "POST" and request.url.endswith(CHAT)


class Chat:
    """One page of the chat UI, with the helpers the tests share."""

    def __init__(self, page, url: str):
        self.page, self.url = page, url
        self.errors: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    def set_controls(self, temperature: str | None = None, max_tokens: str | None = None,
                     system: str | None = None) -> None:
        if temperature is not None:
            self.page.fill("#temperature", temperature)
        if max_tokens is not None:
            self.page.fill("#max-tokens", max_tokens)
        if system is not None:
            self.page.fill("#system", system)

    def send(self, text: str, how: str = "click"):
        """Type `text` and send it (button or Enter); returns the chat POST the page made."""
        with self.page.expect_request(_is_chat_post) as info:
            if how == "type":
                self.page.locator("#prompt").press_sequentially(text)
                self.page.click("#send")
            elif how == "enter":
                self.page.fill("#prompt", text)
                self.page.press("#prompt", "Enter")
            else:
                self.page.fill("#prompt", text)
                self.page.click("#send")
        return info.value

    def wait_idle(self) -> None:
        self.page.wait_for_function(IDLE)

    def ask(self, text: str, how: str = "click") -> dict:
        """Send, wait for the whole answer; returns the POST body."""
        request = self.send(text, how)
        self.wait_idle()
        return request.post_data_json

    def bubbles(self) -> list[dict]:
        return self.page.eval_on_selector_all(
            "#messages > .msg", "els => els.map(e => ({cls: e.className, text: e.textContent}))")

    def updates(self, n: int) -> list[dict]:
        return [u for u in self.page.evaluate("window.__updates") if u["n"] == n]

    def status(self) -> str:
        return self.page.text_content("#status")

    def usage(self) -> tuple[int, int]:
        m = re.search(r"(\d+) prompt \+ (\d+) completion tokens", self.status())
        assert m, f"no token counts in the status line {self.status()!r}"
        return int(m.group(1)), int(m.group(2))


def _auth(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _greedy(url: str, messages: list[dict], max_tokens: int) -> dict:
    """The server's own non-streamed greedy answer for a conversation."""
    r = httpx.post(url + CHAT, json={"messages": messages, "temperature": 0, "max_tokens": max_tokens},
                   timeout=TIMEOUT_MS / 1000)
    assert r.status_code == 200, r.text
    return r.json()


def _health(url: str) -> dict:
    r = httpx.get(url + "/health", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _finished(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^telechat_sequences_finished_total\{reason="(\w+)"\} (\S+)$', text, re.M)}


def _cjk_fonts() -> list[str]:
    if shutil.which("fc-list") is None:
        return []
    out = subprocess.run(["fc-list", ":lang=zh", "family"], capture_output=True, text=True, timeout=30).stdout
    return sorted({line.strip() for line in out.splitlines() if line.strip()})


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chromium_browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def default_server(default_llm):
    with running_server(default_llm, max_concurrency=4) as url:
        yield url


@pytest.fixture(scope="module")
def tiny_server(serve_llm):
    with running_server(serve_llm, max_concurrency=4) as url:
        yield url


@pytest.fixture()
def open_chat(chromium_browser):
    """open_chat(url, api_key=None, **context_options) -> Chat, once the page shows the served model."""
    contexts = []

    def open_(url: str, api_key: str | None = None, **context_options) -> Chat:
        context = chromium_browser.new_context(**context_options)
        contexts.append(context)
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        page.add_init_script(OBSERVER)
        chat = Chat(page, url)
        response = page.goto(url + "/")
        assert response.status == 200
        model_id = httpx.get(url + "/v1/models", headers=_auth(api_key), timeout=10).json()["data"][0]["id"]
        page.wait_for_function("id => document.getElementById('model-name').textContent === id", arg=model_id)
        assert chat.status() == "ready"
        assert page.is_enabled("#send") and page.is_disabled("#stop")
        return chat

    yield open_
    for context in contexts:
        context.close()


# ---- tests ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_streamed_answer_and_follow_up_keep_history(open_chat, default_server):
    url = default_server
    chat = open_chat(url)
    page = chat.page
    chat.set_controls(temperature="0", max_tokens="24")

    q1 = "What is the capital of France?"
    body1 = chat.ask(q1, how="type")
    assert body1["messages"] == [{"role": "user", "content": q1}]
    assert body1["stream"] is True and body1["temperature"] == 0 and body1["max_tokens"] == 24

    # it streamed: the bubble had `streaming` while its text grew, several times, then lost it
    ups = chat.updates(0)
    grown = [u["text"] for u in ups if u["streaming"] and u["text"]]
    assert len(grown) >= 2, f"the answer did not arrive in pieces: {ups}"
    assert all(len(b) > len(a) and b.startswith(a) for a, b in zip(grown, grown[1:])), ups
    a1 = page.locator("#messages .msg.assistant").nth(0).text_content()
    assert ups[-1]["streaming"] is False and ups[-1]["text"] == a1 and a1.strip()
    assert a1.startswith(grown[-1])

    # the same conversation answered greedily by the API, without streaming, is the same text
    ref1 = _greedy(url, body1["messages"], 24)
    assert a1 == ref1["choices"][0]["message"]["content"]
    assert chat.usage() == (ref1["usage"]["prompt_tokens"], ref1["usage"]["completion_tokens"])
    assert chat.status().startswith("done")

    # the follow-up carries the whole conversation, kept in the page
    q2 = "And of Germany?"
    body2 = chat.ask(q2, how="enter")
    assert body2["messages"] == [{"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                                 {"role": "user", "content": q2}]
    a2 = page.locator("#messages .msg.assistant").nth(1).text_content()
    assert a2.strip() and a2 == _greedy(url, body2["messages"], 24)["choices"][0]["message"]["content"]
    assert len([u for u in chat.updates(1) if u["streaming"] and u["text"]]) >= 2
    assert chat.bubbles() == [{"cls": "msg user", "text": q1}, {"cls": "msg assistant", "text": a1},
                              {"cls": "msg user", "text": q2}, {"cls": "msg assistant", "text": a2}]
    assert page.input_value("#prompt") == ""
    assert chat.errors == []


@pytest.mark.slow
def test_chinese_question_and_answer(open_chat, default_server):
    url = default_server
    r = httpx.get(url + "/", timeout=10)
    assert r.headers["content-type"].lower().replace(" ", "") == "text/html;charset=utf-8"
    chat = open_chat(url)
    page = chat.page
    chat.set_controls(temperature="0", max_tokens="16")

    q = "北京是哪个国家的首都？"
    body = chat.ask(q)
    assert body["messages"] == [{"role": "user", "content": q}]
    user = page.locator("#messages .msg.user").nth(0)
    assert user.text_content() == q
    answer = page.locator("#messages .msg.assistant").nth(0).text_content()
    ref = _greedy(url, body["messages"], 16)
    assert answer == ref["choices"][0]["message"]["content"]
    assert len(re.findall(r"[\u4e00-\u9fff]", answer)) >= 2, f"not a Chinese answer: {answer!r}"
    # No U+FFFD: at most one at the very end when max_tokens cut a character's bytes in two
    # (the API answer has it as well then); none inside the text, none in any streamed piece.
    cut = ref["choices"][0]["finish_reason"] == "length" and answer.endswith("\ufffd")
    body_text = answer[:-1] if cut else answer
    assert "\ufffd" not in body_text, repr(answer)
    pieces = [u["text"] for u in chat.updates(0) if u["streaming"] and u["text"]]
    assert len(pieces) >= 2, pieces
    assert all(answer.startswith(piece) for piece in pieces), (pieces, answer)  # never a wrong char on the way

    # rendered as UTF-8 text that takes up room on the page
    info = page.evaluate("""(els) => els.map(el => {
        const r = document.createRange(); r.selectNodeContents(el);
        const box = r.getBoundingClientRect();
        return {w: box.width, h: box.height, text: el.textContent};
      })""", [user.element_handle(), page.locator("#messages .msg.assistant").nth(0).element_handle()])
    assert page.evaluate("document.characterSet") == "UTF-8"
    assert [i["text"] for i in info] == [q, answer]
    assert all(i["w"] > 0 and i["h"] > 0 for i in info), info
    assert chat.errors == []


def test_chinese_glyphs_are_drawn(open_chat, tiny_server):
    fonts = _cjk_fonts()
    if not fonts:
        pytest.skip("no CJK font installed (`fc-list :lang=zh` finds none): Chinese draws as .notdef boxes")
    chat = open_chat(tiny_server)
    chat.set_controls(max_tokens="2")
    chat.ask("你好，请介绍一下北京。")
    user = chat.page.locator("#messages .msg.user").nth(0)
    glyphs = user.evaluate(GLYPHS)
    assert glyphs["chars"] >= 5 and glyphs["bitmaps"] == glyphs["chars"], (glyphs, fonts)


@pytest.mark.slow
def test_stop_keeps_the_partial_answer_and_frees_the_slot(open_chat, default_server):
    url = default_server
    chat = open_chat(url)
    page = chat.page
    chat.set_controls(temperature="1.0", max_tokens="400")
    before = _finished(url)
    question = "Write a long story about a dragon who learns to fly."
    for _ in range(3):
        chat.send(question)
        page.wait_for_function("""() => {
            const b = document.querySelector('#messages .msg.assistant.streaming');
            return b && b.textContent.length > 0; }""")
        assert _health(url)["running"] == 1
        page.click("#stop", force=True)  # force: a no-op on the rare answer that already ended
        chat.wait_idle()
        if chat.status() == "stopped":
            break
        assert chat.status().startswith("done"), chat.status()  # it ended before the click: again
        page.click("#clear")
    else:
        pytest.fail("the answer ended before Stop could be clicked, three times")

    bubble = page.locator("#messages .msg.assistant").last
    partial = bubble.text_content()
    assert partial.strip()
    assert bubble.get_attribute("class") == "msg assistant"  # no `streaming`, no `error`
    assert page.is_disabled("#stop") and page.is_enabled("#send")

    # the server cancels the sequence: the slot is free again long before 400 tokens could be made
    deadline = time.time() + 10
    while (_health(url)["running"] or _finished(url).get("cancelled", 0) <= before.get("cancelled", 0)) \
            and time.time() < deadline:
        time.sleep(0.1)
    assert _health(url)["running"] == 0
    after = _finished(url)
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1, (before, after)
    assert after.get("length", 0) == before.get("length", 0), (before, after)
    time.sleep(0.5)
    assert bubble.text_content() == partial  # nothing more arrives

    # the partial answer is part of the history: the next request carries it (answered by a stub)
    seen = []

    def stub(route):
        seen.append(route.request.post_data_json)
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"},
                      body='data: {"choices":[{"index":0,"delta":{"content":"OK"},"finish_reason":"stop"}]}\n\n'
                           "data: [DONE]\n\n")

    page.route("**" + CHAT, stub)
    chat.ask("Go on.")
    page.unroute("**" + CHAT)
    assert seen[0]["messages"] == [{"role": "user", "content": question},
                                   {"role": "assistant", "content": partial},
                                   {"role": "user", "content": "Go on."}]
    assert [b["text"] for b in chat.bubbles()] == [question, partial, "Go on.", "OK"]
    assert chat.errors == []


def test_clear_empties_the_chat_and_the_history(open_chat, tiny_server):
    chat = open_chat(tiny_server)
    chat.set_controls(max_tokens="8")
    chat.ask("Hello there")
    chat.ask("How are you?")
    assert [b["cls"] for b in chat.bubbles()] == ["msg user", "msg assistant"] * 2

    chat.page.click("#clear")
    assert chat.page.eval_on_selector("#messages", "m => m.children.length") == 0
    assert chat.status() == "ready"

    body = chat.ask("A new question")
    assert body["messages"] == [{"role": "user", "content": "A new question"}]
    assert [b["cls"] for b in chat.bubbles()] == ["msg user", "msg assistant"]
    assert chat.bubbles()[0]["text"] == "A new question"
    assert chat.errors == []


@pytest.mark.parametrize("temperature, max_tokens, system, sent_temperature, sent_max_tokens", [
    ("0.3", "7", "", 0.3, 7),
    ("1.5", "3", "You are terse.", 1.5, 3),
    ("5", "0", "", 2.0, 1),  # out of range: the page clamps to [0, 2] and [1, 4096]
])
def test_temperature_and_max_tokens_reach_the_request(open_chat, tiny_server, temperature, max_tokens, system,
                                                       sent_temperature, sent_max_tokens):
    chat = open_chat(tiny_server)
    chat.set_controls(temperature=temperature, max_tokens=max_tokens, system=system)
    body = chat.ask("Tell me something.")
    assert body["temperature"] == pytest.approx(sent_temperature)
    assert body["max_tokens"] == sent_max_tokens
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    expected = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": "Tell me something."}]
    assert body["messages"] == expected
    # the server honoured them: no more completion tokens than asked for
    assert 0 <= chat.usage()[1] <= sent_max_tokens
    assert "error" not in chat.bubbles()[-1]["cls"]
    # changed controls apply to the very next request
    chat.set_controls(temperature="0", max_tokens="2")
    body = chat.ask("Again.")
    assert body["temperature"] == 0 and body["max_tokens"] == 2
    assert chat.usage()[1] <= 2
    assert chat.errors == []


def test_api_key_page_uses_basic_auth(chromium_browser, open_chat, serve_llm):
    with running_server(serve_llm, api_key=KEY, max_concurrency=2) as url:
        r = httpx.get(url + "/", timeout=10)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
        assert httpx.get(url + "/", auth=("anyone", KEY), timeout=10).status_code == 200

        # a browser without (or with wrong) credentials does not get the page
        for options in ({}, {"http_credentials": {"username": "u", "password": "wrong"}}):
            context = chromium_browser.new_context(**options)
            try:
                page = context.new_page()
                try:
                    response = page.goto(url + "/")
                except sync_api.Error as e:
                    assert "ERR_INVALID_AUTH_CREDENTIALS" in str(e)
                else:
                    assert response.status == 401
                assert page.locator("#model-name").count() == 0
            finally:
                context.close()

        chat = open_chat(url, api_key=KEY, http_credentials={"username": "u", "password": KEY})
        chat.set_controls(max_tokens="4")
        request = chat.send("Hello")
        chat.wait_idle()
        expected = "Basic " + base64.b64encode(f"u:{KEY}".encode()).decode()
        assert request.header_value("authorization") == expected
        assert request.response().status == 200
        assert [b["cls"] for b in chat.bubbles()] == ["msg user", "msg assistant"]
        assert chat.status().startswith("done")
        assert chat.errors == []

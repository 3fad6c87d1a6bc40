"""The HTTP server: OpenAI-compatible API, the published TeleChat endpoints, a web chat page,
/health and Prometheus /metrics, in one FastAPI app over one continuous-batching engine."""
from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import chat as _chat
from ..generate import default_max_new_tokens
from ..llm import LLM
from ..tokenizer import StreamDecoder
from ..engine import Engine, QueueFull, Stream
from .metrics import Metrics
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, TeleChatError, parse_body,
                       parse_telechat)


class TextStream:
    """Token ids -> text increments, cut at the first stop string (text that might start one is held back)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.decoder = StreamDecoder(tokenizer)
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        self.text += self.decoder.push(token)
        return self._emit(final=False)

    def finish(self) -> str:
        # A character cut in half by max_tokens decodes as U+FFFD: drop it rather than send it.
        self.text += self.decoder.flush().rstrip("\ufffd")
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self.stops and not self.stopped:
            start = max(0, self.sent - self.hold)
            hits = [i for s in self.stops if (i := self.text.find(s, start)) != -1]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True
        end = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent:end], end
        return delta


class Server:
    """What the routes share: the model, its engine, the served name and limits."""

    def __init__(self, llm: LLM, engine: Engine, model_name: str, api_key: str | None, max_body_bytes: int,
                 body_timeout: float = 60.0):
        if llm.tokenizer is None:
            raise ValueError(f"{llm.path}: serving needs a tokenizer, and this checkpoint folder has none")
        self.llm, self.engine, self.model_name = llm, engine, model_name
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.context = min(engine.max_model_len, int(llm.generation_config.get("max_length") or llm.config.seq_length))
        self.metrics = Metrics(engine)
        self.created = int(time.time())
        self.chars_per_token = longest_token_chars(llm.tokenizer)
        _counted_table()  # built now rather than in the first large request
        self.pool: ThreadPoolExecutor | None = None

    # ---- work off the event loop -------------------------------------------------------------
    async def run(self, fn, *args):
        """`fn(*args)` in the request worker threads: parsing and tokenizing a large body must not stall
        the event loop (other streams, /health)."""
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                           thread_name_prefix="telechat-request")
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None

    def min_tokens(self, text: str) -> int:
        """A cheap lower bound on the tokens `text` encodes to, without tokenizing it."""
        return min_tokens(text, self.chars_per_token)

    # ---- shared helpers ----------------------------------------------------------------------
    def parse(self, raw: bytes, model):
        """A validated OpenAI request body and its stop strings (APIError on anything wrong)."""
        req = parse_body(raw, model)
        self.check_model(req.model)
        req.check_unsupported()
        return req, req.stop_strings()

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in (self.model_name, "default"):
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'",
                           "model", "model_not_found")

    def sampling(self, req, prompt_len: int, seed_offset: int = 0):
        max_new = req.max_tokens if req.max_tokens is not None else getattr(req, "max_completion_tokens", None)
        param = "max_tokens" if req.max_tokens is not None else "max_completion_tokens"
        if prompt_len >= self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens, and the prompt "
                                f"alone is {prompt_len} tokens", "messages" if hasattr(req, "messages") else "prompt",
                           "context_length_exceeded")
        if max_new is None:  # 16 for text completions (OpenAI's default); chat: the checkpoint's or 512
            max_new = min(default_max_new_tokens(self.llm.generation_config, prompt_len, self.context)
                          if hasattr(req, "messages") else 16, self.context - prompt_len)
        elif prompt_len + max_new > self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                f"requested {prompt_len + max_new} tokens ({prompt_len} in the prompt, {max_new} for "
                                f"the completion)", param, "context_length_exceeded")
        kw = {"max_new_tokens": max_new, "top_p": req.top_p, "repetition_penalty": req.repetition_penalty,
              "top_k": 0 if req.top_k == -1 else req.top_k}
        if req.temperature is not None:
            kw["do_sample"] = req.temperature >= 1e-5  # below that, greedy (dividing by it would overflow)
            if kw["do_sample"]:
                kw["temperature"] = req.temperature
        if req.seed is not None:
            kw["seed"] = (req.seed + seed_offset) % 2**63
        return self.llm.sampling_params(**kw)

    def open_streams(self, jobs: list[tuple[list[int], object]]) -> list[Stream]:
        """Submit every (prompt ids, params) now, all or none (a full queue answers 429)."""
        streams: list[Stream] = []
        try:
            for ids, params in jobs:
                streams.append(self.engine.open(ids, params, self.context))
        except QueueFull as e:
            for s in streams:
                s.cancel()
            raise APIError(429, str(e), None, "rate_limit_exceeded", "rate_limit_error",
                           {"Retry-After": str(e.retry_after)}) from None
        except ValueError as e:
            for s in streams:
                s.cancel()
            raise APIError(400, str(e)) from None
        except RuntimeError as e:  # the engine is shutting down
            for s in streams:
                s.cancel()
            raise APIError(503, str(e), None, "unavailable", "server_error") from None
        return streams

    async def text_events(self, stream: Stream, stops: list[str]):
        """("delta", text) ... then ("end", finish_reason, completion_tokens); cancels the sequence when left."""
        ts = TextStream(self.llm.tokenizer, stops)
        n = 0
        try:
            async for kind, value in stream:
                if kind == "token":
                    n += 1
                    delta = ts.push(value)
                    if delta:
                        yield "delta", delta
                    if ts.stopped:
                        stream.cancel("stop")
                        yield "end", "stop", n
                        return
                elif kind == "done":
                    tail = ts.finish()
                    if tail:
                        yield "delta", tail
                    reason = "stop" if ts.stopped or value == "stop" else value
                    yield "end", reason, n + (value == "stop")
                    return
                else:
                    raise APIError(500, f"generation failed: {value}", None, "engine_error")
        finally:
            stream.cancel()


def _gen_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _until_done_or_gone(request: Request, coro):
    """Run `coro`; if the client disconnects first, cancel it (which frees its slots)."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise _ClientGone
    finally:
        if not task.done():
            task.cancel()


def create_app(llm: LLM, *, model_name: str | None = None, api_key: str | None = None, max_concurrency: int = 8,
               max_queue: int = 64, max_model_len: int | None = None, max_body_bytes: int = 2 * 1024 * 1024,
               engine: Engine | None = None, body_timeout: float = 60.0) -> FastAPI:
    """The FastAPI app; its engine starts and stops with the app's lifespan.

    `body_timeout`: seconds a client has to send a request body once its headers are in (else 408)."""
    if engine is None:
        limits = {"max_concurrency": max_concurrency, "max_queue": max_queue,
                  "max_model_len": max_model_len or llm.config.seq_length}
        if llm.engine.claim():  # the LLM's own engine: in-process generate/chat calls batch with requests
            engine = llm.engine.configure(**limits)
        else:  # another app on this LLM serves through it: this one gets its own
            engine = Engine(llm.model, **limits)
    name = model_name or (llm.path.name if llm.path else "telechat")
    srv = Server(llm, engine, name, api_key, max_body_bytes, body_timeout)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()
            srv.close()

    app = FastAPI(title="telechat", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.server = srv
    app.add_middleware(_Guard, server=srv)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _error_response(e)

    @app.exception_handler(TeleChatError)
    async def telechat_error(request: Request, e: TeleChatError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return _error_response(APIError(e.status_code, str(e.detail), None, None,
                                        "not_found_error" if e.status_code == 404 else "invalid_request_error"))

    @app.exception_handler(_ClientGone)
    async def client_gone(request: Request, e: _ClientGone):
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception):
        return _error_response(APIError(500, f"internal error: {type(e).__name__}", None, "internal_error"))

    # ---- pages and probes ----------------------------------------------------------------------
    page = resources.files("telechat.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        ok = engine.alive
        body = {"status": "ok" if ok else "engine stopped", "model": srv.model_name, "running": engine.running,
                "waiting": len(engine.waiting), "max_concurrency": engine.max_concurrency}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        data, content_type = srv.metrics.render()
        return Response(data, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(srv)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        srv.check_model(model_id)
        return _model_card(srv)

    # ---- OpenAI: chat and text completions -----------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await request.body()
        req, stops, ids = await srv.run(_chat_job, srv, raw)
        jobs = [(ids, srv.sampling(req, len(ids), i)) for i in range(req.n)]
        streams = srv.open_streams(jobs)
        meta = {"id": _gen_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
                "model": srv.model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse_response(srv, streams, stops, meta, "chat.completion.chunk", len(ids), include_usage, chat=True)
        results = await _until_done_or_gone(request, _collect(srv, streams, stops))
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": reason} for i, (text, reason, _) in enumerate(results)]
        return {**meta, "choices": choices, "usage": _usage(len(ids), results)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        raw = await request.body()
        req, stops, prompts = await srv.run(_completion_job, srv, raw)
        jobs = [(ids, srv.sampling(req, len(ids), j)) for ids in prompts for j in range(req.n)]
        streams = srv.open_streams(jobs)
        prompt_tokens = sum(len(ids) for ids in prompts)
        echoes = [srv.llm.tokenizer.decode(ids) if req.echo else "" for ids in prompts for _ in range(req.n)]
        meta = {"id": _gen_id("cmpl"), "object": "text_completion", "created": int(time.time()),
                "model": srv.model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse_response(srv, streams, stops, meta, "text_completion", prompt_tokens, include_usage,
                                 chat=False, echoes=echoes)
        results = await _until_done_or_gone(request, _collect(srv, streams, stops))
        choices = [{"index": i, "text": echoes[i] + text, "logprobs": None, "finish_reason": reason}
                   for i, (text, reason, _) in enumerate(results)]
        return {**meta, "choices": choices, "usage": _usage(prompt_tokens, results)}

    # ---- TeleChat's published endpoints (spec section 5) ---------------------------------------
    async def telechat_job(raw: bytes):
        ids, ctx, s = await srv.run(_telechat_prompt, srv, raw)
        # below 1e-5 a temperature overflows the logits: greedy, as on the OpenAI endpoints
        sample = s["do_sample"] and s["temperature"] >= 1e-5
        # The published max_length is the total; without it, answers stop where chat's do.
        max_new = max(1, ctx - len(ids))
        if not s["max_length_given"]:
            max_new = min(max_new, default_max_new_tokens(srv.llm.generation_config, len(ids), ctx))
        params = srv.llm.sampling_params(max_new_tokens=max_new, do_sample=sample,
                                         temperature=s["temperature"] if sample else None, top_k=s["top_k"],
                                         top_p=s["top_p"], repetition_penalty=s["repetition_penalty"])
        try:
            return srv.open_streams([(ids, params)])[0]
        except APIError as e:
            err = TeleChatError("10903", e.message, e.status)
            raise _TeleChatBusy(err, e.headers) if e.status == 429 else err from None

    @app.post("/telechat/gptDialog/v2")
    async def gpt_dialog_v2(request: Request):
        stream = await telechat_job(await request.body())

        async def body():
            try:
                async for ev in srv.text_events(stream, []):
                    if ev[0] == "delta":
                        yield ev[1].encode("utf-8")
            except APIError:  # headers are sent: the stream just ends (the published demo has no error framing)
                return

        return StreamingResponse(body(), media_type="text/plain; charset=utf-8")

    @app.post("/telechat/gptDialog/v4")
    async def gpt_dialog_v4(request: Request):
        stream = await telechat_job(await request.body())
        try:
            (text, _, _), = await _until_done_or_gone(request, _collect(srv, [stream], []))
        except APIError as e:
            raise TeleChatError("10903", e.message, 500) from None
        return {"role": "bot", "content": text}

    @app.exception_handler(_TeleChatBusy)
    async def telechat_busy(request: Request, e: _TeleChatBusy):
        return JSONResponse(e.error.body(), status_code=429, headers=e.headers)

    return app


class _ClientGone(Exception):
    """The client left before its answer was ready (its sequences are already cancelled)."""


class _TeleChatBusy(Exception):
    def __init__(self, error: TeleChatError, headers: dict):
        self.error, self.headers = error, headers


def _model_card(srv: Server) -> dict:
    return {"id": srv.model_name, "object": "model", "created": srv.created, "owned_by": "telechat",
            "max_model_len": srv.context}


# ---- prompt size before tokenizing ---------------------------------------------------------------
# Code points a tokenizer's normalization may drop or fold away, so they are not counted: whitespace,
# controls and format characters (Unicode 14 categories Zs/Zl/Zp/Cc/Cf and str.isspace()).
_UNCOUNTED_RANGES = ((0x0, 0x20), (0x7F, 0xA0), (0xAD, 0xAD), (0x600, 0x605), (0x61C, 0x61C), (0x6DD, 0x6DD),
                     (0x70F, 0x70F), (0x890, 0x891), (0x8E2, 0x8E2), (0x1680, 0x1680), (0x180E, 0x180E),
                     (0x2000, 0x200F), (0x2028, 0x202F), (0x205F, 0x2064), (0x2066, 0x206F), (0x3000, 0x3000),
                     (0xFEFF, 0xFEFF), (0xFFF9, 0xFFFB), (0x110BD, 0x110BD), (0x110CD, 0x110CD),
                     (0x13430, 0x13438), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0001, 0xE0001),
                     (0xE0020, 0xE007F))
_ASCII_UNCOUNTED = bytes(range(0x21)) + b"\x7f"
# Unicode normalization (NFKC) may compose a few characters into one (e.g. Hangul jamo 3 -> 1).
_NORMALIZE_SHRINK = 4


@functools.cache
def _counted_table():
    import numpy as np

    table = np.ones(0x110000, dtype=bool)
    for lo, hi in _UNCOUNTED_RANGES:
        table[lo:hi + 1] = False
    return table


def visible_chars(text: str) -> int:
    """Characters of `text` that no tokenizer normalization drops, counted at C speed (2 MB: ~10 ms)."""
    if text.isascii():
        return len(text.encode("ascii").translate(None, _ASCII_UNCOUNTED))
    import numpy as np

    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    return int(np.count_nonzero(_counted_table()[codes]))


def longest_token_chars(tokenizer) -> int:
    """The most characters of text one token of `tokenizer` stands for (an upper bound)."""
    if getattr(tokenizer, "sp", None) is not None:
        pieces = tokenizer.sp.id_to_piece(list(range(tokenizer.vocab_size)))
    elif getattr(tokenizer, "hf", None) is not None:  # byte-level pieces: one symbol per byte, >= one per char
        pieces = list(tokenizer.hf.get_vocab(with_added_tokens=True))
    else:
        pieces = [tokenizer.id_to_token(i) or "" for i in range(len(tokenizer))]
    return max(1, max((len(p) for p in pieces), default=1))


def min_tokens(text: str, chars_per_token: int) -> int:
    """A lower bound on the tokens `text` encodes to: its visible characters over the most any token
    covers (with room for normalization), found in C-speed string passes instead of a tokenizer run."""
    return visible_chars(text) // (chars_per_token * _NORMALIZE_SHRINK)


def _too_long(srv: Server, bound: int, param: str) -> APIError:
    return APIError(400, f"This model's maximum context length is {srv.context} tokens, and the prompt alone is at "
                         f"least {bound} tokens", param, "context_length_exceeded")


def _chat_job(srv: Server, raw: bytes):
    """(request, stop strings, prompt ids) of a chat completion body (runs in a worker thread)."""
    req, stops = srv.parse(raw, ChatCompletionRequest)
    bound = sum(srv.min_tokens(m.text()) for m in req.messages)
    if bound >= srv.context:
        raise _too_long(srv, bound, "messages")
    return req, stops, _chat_prompt(srv, req)


def _completion_job(srv: Server, raw: bytes):
    req, stops = srv.parse(raw, CompletionRequest)
    return req, stops, _completion_prompts(srv, req)


def _telechat_prompt(srv: Server, raw: bytes) -> tuple[list[int], int, dict]:
    """(prompt ids, context, settings) of a gptDialog body. These endpoints keep the newest question and
    turns that fit, so text that cannot fit is cut before tokenizing (same ids, without the wait)."""
    question, history, s = parse_telechat(raw)
    ctx = min(s["max_length"], srv.context)
    budget = max(3, ctx - min(1024, ctx // 2))
    question = _keep_tail(question, budget, srv.chars_per_token)
    # History turns go newest first until one does not fit; drop those that surely would not.
    used = srv.min_tokens(question)
    cut = len(history)
    for i in range(len(history) - 2, -1, -2):  # (user, bot) pairs, validated by parse_telechat
        used += srv.min_tokens(history[i]["content"]) + srv.min_tokens(history[i + 1]["content"])
        if used > budget:
            break
        cut = i
    history = history[cut:]
    try:
        ids = _chat.encode_conversation(srv.llm.tokenizer, question, history, max_length=budget)
    except ValueError as e:
        raise TeleChatError("10903", str(e), 500) from None
    return ids, ctx, s


def _keep_tail(text: str, max_tokens: int, chars_per_token: int) -> str:
    """The end of `text`, long enough to encode to more than `max_tokens` tokens whatever their size."""
    n = (max_tokens + 1) * chars_per_token * _NORMALIZE_SHRINK
    while n < len(text):
        if min_tokens(text[-n:], chars_per_token) > max_tokens:
            return text[-n:]  # its first tokens may differ from the whole text's, but they are cut off anyway
        n *= 2
    return text


def _chat_prompt(srv: Server, req: ChatCompletionRequest) -> list[int]:
    msgs = req.messages
    if msgs[-1].role != "user":
        raise APIError(400, f"the last message must have role 'user', got '{msgs[-1].role}'",
                       f"messages.{len(msgs) - 1}.role")
    history = []
    for i, m in enumerate(msgs[:-1]):
        role = "system" if m.role in ("system", "developer") else m.role
        if role == "system" and i != 0:
            raise APIError(400, "a system message may only come first", f"messages.{i}.role")
        history.append({"role": role, "content": m.text()})
    question = msgs[-1].text()
    if not question.strip():
        raise APIError(400, "the last user message is empty", f"messages.{len(msgs) - 1}.content")
    try:
        return _chat.encode_conversation(srv.llm.tokenizer, question, history)
    except ValueError as e:
        raise APIError(400, str(e), "messages") from None


def _completion_prompts(srv: Server, req: CompletionRequest) -> list[list[int]]:
    p = req.prompt
    if isinstance(p, str):
        prompts = [p]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [p]
    else:
        prompts = list(p)
    if not prompts:
        raise APIError(400, "'prompt' is empty", "prompt")
    if len(prompts) * req.n > srv.engine.max_concurrency + srv.engine.max_queue:
        raise APIError(400, f"{len(prompts)} prompts x n={req.n} is more than this server queues at once "
                            f"({srv.engine.max_concurrency + srv.engine.max_queue})", "prompt")
    for x in prompts:
        if isinstance(x, str) and (bound := srv.min_tokens(x)) >= srv.context:
            raise _too_long(srv, bound, "prompt")
    out = []
    vocab = srv.llm.config.vocab_size
    for i, x in enumerate(prompts):
        ids = srv.llm.tokenizer.encode(x) if isinstance(x, str) else list(x)
        if not ids:
            raise APIError(400, "the prompt is empty" if len(prompts) == 1 else f"prompt {i} is empty", "prompt")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
        out.append(ids)
    return out


async def _collect(srv: Server, streams: list[Stream], stops: list[str]) -> list[tuple[str, str, int]]:
    async def one(stream):
        parts, reason, n = [], "stop", 0
        async for ev in srv.text_events(stream, stops):
            if ev[0] == "delta":
                parts.append(ev[1])
            else:
                reason, n = ev[1], ev[2]
        return "".join(parts), reason, n

    tasks = [asyncio.ensure_future(one(s)) for s in streams]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.cancel()


def _usage(prompt_tokens: int, results) -> dict:
    completion = sum(r[2] for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def _sse_response(srv: Server, streams: list[Stream], stops: list[str], meta: dict, obj: str, prompt_tokens: int,
                  include_usage: bool, chat: bool, echoes: list[str] | None = None) -> StreamingResponse:
    def chunk(choices, usage=None):
        c = {**meta, "object": obj, "choices": choices}
        if include_usage:
            c["usage"] = usage
        return _sse(c)

    def choice(i, text=None, reason=None, role=False):
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}

    async def events():
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, stream):
            try:
                async for ev in srv.text_events(stream, stops):
                    await queue.put((i, ev))
            except APIError as e:
                await queue.put((i, ("error", e)))
            except Exception as e:  # never a choice without an end
                await queue.put((i, ("error", APIError(500, f"internal error: {type(e).__name__}", None,
                                                        "internal_error"))))
            finally:
                await queue.put((i, None))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        completion = 0
        try:
            for i in range(len(streams)):
                if chat:
                    yield chunk([choice(i, role=True)])
                elif echoes and echoes[i]:
                    yield chunk([choice(i, echoes[i])])
            live = len(streams)
            while live:
                i, ev = await queue.get()
                if ev is None:
                    live -= 1
                elif ev[0] == "delta":
                    yield chunk([choice(i, ev[1])])
                elif ev[0] == "end":
                    completion += ev[2]
                    yield chunk([choice(i, None if chat else "", ev[1])])
                else:
                    yield _sse(ev[1].body())
            if include_usage:
                yield _sse({**meta, "object": obj, "choices": [],
                            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                      "total_tokens": prompt_tokens + completion}})
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()
            for s in streams:
                s.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Guard:
    """ASGI middleware: API key (every path but /health), request body size limit, request counts."""

    def __init__(self, app, server: Server):
        self.app, self.srv = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status_seen = {}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status_seen["status"] = message["status"]
            await send(message)

        try:
            if self.srv.api_key and path != "/health" and not self._authorized(scope):
                page = path == "/"
                how = "log in with the key as password" if page else "send 'Authorization: Bearer KEY'"
                e = APIError(401, f"Incorrect or missing API key: {how}", None,
                             "invalid_api_key", "authentication_error",
                             {"WWW-Authenticate": 'Basic realm="telechat"' if page else "Bearer"})
                return await _error_response(e)(scope, receive, send_counted)
            if scope["method"] in ("POST", "PUT", "PATCH"):
                try:
                    body, too_big = await asyncio.wait_for(self._read_body(scope, receive), self.srv.body_timeout)
                except asyncio.TimeoutError:  # a slow client must not hold a connection and a task for ever
                    e = APIError(408, f"the request body did not arrive within {self.srv.body_timeout:g} s", None,
                                 "request_timeout", headers={"Connection": "close"})
                    return await _error_response(e)(scope, receive, send_counted)
                if too_big:
                    e = APIError(413, f"request body is larger than the limit of {self.srv.max_body_bytes} bytes",
                                 None, "request_too_large")
                    return await _error_response(e)(scope, receive, send_counted)
                receive = _replay(body, receive)
            await self.app(scope, receive, send_counted)
        except Exception:
            status_seen.setdefault("status", 500)  # answered by the outer error middleware
            raise
        finally:
            self.srv.metrics.request(path, status_seen.get("status", 499))

    def _authorized(self, scope) -> bool:
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, value = auth.partition(" ")
        key = self.srv.api_key.encode()
        if scheme.lower() == "bearer":
            return hmac.compare_digest(value.strip().encode("latin-1"), key)
        if scheme.lower() == "basic":  # browsers (the web page): any user name, the key as password
            try:
                _, _, password = base64.b64decode(value.strip()).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                return False
            return hmac.compare_digest(password.encode("utf-8"), key)
        return False

    async def _read_body(self, scope, receive) -> tuple[bytes, bool]:
        limit = self.srv.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return b"", True
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return b"", True
            if not message.get("more_body", False):
                break
        return b"".join(chunks), False


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay

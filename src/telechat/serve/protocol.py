"""Request bodies of the OpenAI-compatible API and the TeleChat endpoints, validated strictly.

Numbers are not coerced from strings and booleans are only true/false; an integer is accepted
where a float is meant (`"temperature": 1`). Unknown fields are ignored, as OpenAI clients expect.
"""
from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        message, param = _text(message), None if param is None else _text(param)
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _text(s: str) -> str:
    """`s` as text that encodes to UTF-8 (an error message may quote client input)."""
    return s.encode("utf-8", "replace").decode("utf-8")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # extension (vLLM convention: -1 or 0 = off)
    # extension; the range keeps penalized logits finite in fp32 (1e-45 made them inf, then NaN)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: bool | int | None = None
    user: str | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 16:
            raise APIError(400, f"'stop' takes at most 16 strings, got {len(stops)}", "stop")
        if any(s == "" for s in stops):
            raise APIError(400, "'stop' strings must not be empty", "stop")
        return stops

    def check_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"'{name}' is not supported by this server (use 'repetition_penalty')", name,
                               "unsupported_parameter")
        if self.logprobs:
            raise APIError(400, "'logprobs' is not supported by this server", "logprobs", "unsupported_parameter")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False


class BodyError(ValueError):
    """A request body that is not strict JSON text (the message says why; `param` is the field, if one)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _no_constant(name: str):
    raise BodyError(f"{name} is not a JSON number")


def load_json(raw: bytes):
    """Strict JSON from request bytes: UTF-8, no NaN/Infinity, integers within Python's digit limit,
    no lone UTF-16 surrogates in any string or key. BodyError says what is wrong (and where)."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except BodyError as e:
        raise BodyError(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise BodyError("request body is nested too deeply") from None
    except UnicodeDecodeError as e:
        raise BodyError(f"request body is not valid JSON: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise BodyError(f"request body is not valid JSON: {e}") from None
    except ValueError as e:  # an integer over sys.get_int_max_str_digits() digits
        raise BodyError(f"request body has a number that cannot be read: {e}") from None
    path = find_surrogate(data)
    if path is not None:
        where = f"'{path}'" if path else "the request body"
        raise BodyError(f"{where} holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not Unicode text",
                        path or None)
    return data


def find_surrogate(data) -> str | None:
    """The dotted path of the first string or key holding a lone surrogate ("" for the top level), or None.

    Iterative (bodies nest as deep as the JSON parser allows); paths are only built for the hit."""
    stack: list = [(None, data)]  # (link to the parent's path, value); a link is (parent link, key) or None
    while stack:
        link, x = stack.pop()
        if isinstance(x, str):
            if _SURROGATE.search(x):
                return _path(link)
        elif isinstance(x, dict):
            for k, v in x.items():
                if _SURROGATE.search(k):
                    return _path((link, "<key>"))
                if isinstance(v, (str, list, dict)):
                    stack.append(((link, k), v))
        elif isinstance(x, list):
            stack.extend(((link, i), v) for i, v in enumerate(x) if isinstance(v, (str, list, dict)))
    return None


def _path(link) -> str:
    parts = []
    while link is not None:
        link, key = link
        parts.append(str(key))
    return ".".join(reversed(parts))


_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """JSON bytes -> `model`, or APIError 400 naming the first bad field."""
    try:
        data = load_json(raw)
    except BodyError as e:
        raise APIError(400, str(e), e.param, "invalid_value" if e.param else "invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}", None, "invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        # Union branches add the type name to the location ("stop", "str"): keep the field path.
        loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and p in _TYPE_TAGS)]
        param = ".".join(loc) or None
        got = err.get("input")
        got_s = "" if err["type"] == "missing" else f" (got {json.dumps(got, ensure_ascii=False)[:80]})" \
            if _jsonable(got) else ""
        raise APIError(400, f"invalid '{param}': {err['msg']}{got_s}", param,
                       "missing_required_parameter" if err["type"] == "missing" else "invalid_value") from None


_TYPE_TAGS = {"str", "int", "float", "bool", "list[str]", "list[int]", "list[list[int]]", "list[TextPart]",
              "TextPart", "ChatMessage", "StreamOptions", "literal['text']"}


def _jsonable(x) -> bool:
    try:
        json.dumps(x)
        return True
    except (TypeError, ValueError):
        return False


# ---- TeleChat endpoints (spec section 5): the published codes and ranges ----------------------
TELECHAT_ERRORS = {
    "10301": "服务必填参数缺失",  # required parameter missing
    "10904": "服务请求参数dialog错误",  # dialog roles wrong
    "10305": "请求参数范围错误",  # parameter out of range
    "10903": "服务执行失败",  # execution failed
}

# name: (type, low, high, low inclusive, high inclusive, published default)
TELECHAT_RANGES = {
    "max_length": (int, 0, 4096, False, True, 4096),
    "top_k": (int, 0, 100, False, False, 20),
    "top_p": (float, 0.0, 1.0, False, False, 0.2),
    "temperature": (float, 0.0, 1.0, False, False, 0.1),
    "repetition_penalty": (float, 1.0, 100.0, False, False, 1.03),
}


class TeleChatError(Exception):
    def __init__(self, code: str, detail: str, status: int = 400):
        detail = _text(detail)
        super().__init__(detail)
        self.code, self.detail, self.status = code, detail, status

    def body(self) -> dict:
        return {"seqid": "", "code": self.code, "message": TELECHAT_ERRORS[self.code], "flag": "0",
                "data": "执行失败", "detail": self.detail}


def parse_telechat(raw: bytes) -> tuple[str, list[dict], dict]:
    """(question, history, settings) from a gptDialog body, or TeleChatError with the published code."""
    try:
        item = load_json(raw)
    except BodyError as e:
        code = "10301" if not e.param else "10904" if e.param.startswith("dialog") else "10305"
        raise TeleChatError(code, str(e)) from None
    if not isinstance(item, dict) or "dialog" not in item:
        raise TeleChatError("10301", "missing required field 'dialog'")
    dialog = item["dialog"]
    if not isinstance(dialog, list) or not dialog:
        raise TeleChatError("10904", "'dialog' must be a non-empty list of {role, content}")
    for i, msg in enumerate(dialog):
        want = "user" if i % 2 == 0 else "bot"
        if not isinstance(msg, dict) or msg.get("role") != want:
            got = msg.get("role") if isinstance(msg, dict) else msg
            raise TeleChatError("10904", f"dialog[{i}].role must be {want!r} (user and bot alternate, starting "
                                         f"with user), got {got!r}")
        if not isinstance(msg.get("content"), str):
            raise TeleChatError("10904", f"dialog[{i}].content must be a string")
    if len(dialog) % 2 == 0:
        raise TeleChatError("10904", "dialog must end with the user's question")
    if not dialog[-1]["content"].strip():
        raise TeleChatError("10904", "the question (last dialog entry) is empty")
    settings = {"max_length_given": item.get("max_length") is not None}
    do_sample = item.get("do_sample", True)
    if do_sample is not None and not isinstance(do_sample, bool):
        raise TeleChatError("10305", f"do_sample must be true or false, got {do_sample!r}")
    settings["do_sample"] = True if do_sample is None else do_sample
    for name, (kind, lo, hi, lo_in, hi_in, default) in TELECHAT_RANGES.items():
        v = item.get(name)
        if v is None:
            settings[name] = default
            continue
        ok_type = isinstance(v, int) if kind is int else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok_type:
            raise TeleChatError("10305", f"{name} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
        if not ((lo <= v if lo_in else lo < v) and (v <= hi if hi_in else v < hi)):
            raise TeleChatError("10305", f"{name} must be in {'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"
                                         f", got {v!r}")
        settings[name] = kind(v)
    history = [{"role": m["role"], "content": m["content"]} for m in dialog[:-1]]
    return dialog[-1]["content"], history, settings

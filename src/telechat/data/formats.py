"""SFT record formats and chat formats for `telechat data prepare`.

Record formats, told apart by their fields: TeleChat (`input`/`output`, `<_user>`/`<_bot>` markers
in `input`), TeleChat2 (`system` + `dialog`), alpaca (`instruction`/`input`/`output`, optional
`system` and `history`), sharegpt (`conversations` of `from`/`value`, optional `system`) and OpenAI
(`messages` of `role`/`content`). Each becomes (system, [(question, answer), ...]).

Chat formats: TeleChat's control tokens (see prepare.encode_dialogue) or the checkpoint's own
Jinja chat template (HF convention, e.g. ChatML), whose tokens get loss only inside assistant turns.
"""
from __future__ import annotations

import functools
import hashlib

import numpy as np

from ..tokenizer import Tokenizer

RECORD_FORMATS = ("telechat", "telechat2", "alpaca", "sharegpt", "openai")
CHAT_FORMATS = ("telechat", "template")
KNOWN_FIELDS = "input/output, system/dialog, instruction/input/output, conversations or messages"

_USER = {"user", "human"}
_ASSISTANT = {"assistant", "gpt", "bot", "model", "chatgpt"}
_SYSTEM = {"system", "developer"}


# ---- records -> (system, turns) ---------------------------------------------------------------
def detect_format(rec: dict) -> str | None:
    """The record format named by a record's fields, or None for an unknown shape."""
    if "dialog" in rec:
        return "telechat2"
    if "messages" in rec:
        return "openai"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec:
        return "alpaca"
    if "input" in rec or "output" in rec:
        return "telechat"
    return None


def unknown_format(rec: dict) -> ValueError:
    fields = ", ".join(repr(k) for k in list(rec)[:8]) or "none"
    return ValueError(f"unknown_format: fields {fields}; expected {KNOWN_FIELDS}")


def _string(value, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"missing_field: {what} must be a string, got {type(value).__name__}")
    return value


def parse_alpaca(rec: dict) -> tuple[str | None, list[tuple[str, str]]]:
    """LLaMA-Factory's alpaca layout: the question is `instruction`, then a newline and `input`
    when there is one; `history` is [[question, answer], ...] before it."""
    question = _string(rec["instruction"], "'instruction'")
    extra = rec.get("input")
    if extra is not None:
        extra = _string(extra, "'input'")
        if extra:
            question = f"{question}\n{extra}"
    if "output" not in rec:
        raise ValueError("missing_field: no 'output'")
    answer = _string(rec["output"], "'output'")
    system = rec.get("system")
    if system is not None:
        system = _string(system, "'system'")
    history = rec.get("history") or []
    if not isinstance(history, list):
        raise ValueError(f"missing_field: 'history' must be a list of [question, answer], got {type(history).__name__}")
    turns = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ValueError(f"missing_field: history[{i}] must be [question, answer] strings")
        turns.append((pair[0], pair[1]))
    turns.append((question, answer))
    return system or None, turns


def parse_messages(rec: dict, fmt: str) -> tuple[str | None, list[tuple[str, str]], tuple[int, ...]]:
    """sharegpt `conversations` ({from, value}, or {role, content}) or OpenAI `messages` ({role,
    content}; content a string or a list of text parts): an optional system message first, then
    user and assistant messages in turn, ending with the assistant. Also the turns whose assistant
    message has OpenAI's `"weight": 0` (kept as context, not trained on)."""
    key = "conversations" if fmt == "sharegpt" else "messages"
    msgs = rec[key]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"missing_field: {key!r} must be a non-empty list")
    system = rec.get("system")
    if system is not None:
        system = _string(system, "'system'")
    roles, texts, quiet = [], [], []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ValueError(f"missing_field: {key}[{i}] must be an object, got {type(m).__name__}")
        role_key, text_key = ("from", "value") if "from" in m else ("role", "content")
        role, text = m.get(role_key), m.get(text_key)
        if not isinstance(role, str):
            raise ValueError(f"missing_field: {key}[{i}] has no string {role_key!r}")
        role = role.lower()
        if role in _SYSTEM:
            if i != 0:
                raise ValueError(f"unequal_turns: {key}[{i}]: a system message may only come first")
            role = "system"
        elif role in _USER:
            role = "user"
        elif role in _ASSISTANT:
            role = "assistant"
        else:  # tool calls and their results have no place in a (question, answer) dialogue
            raise ValueError(f"unsupported_role: {key}[{i}] has role {role!r} (expected system, user or assistant)")
        if role == "assistant" and (m.get("tool_calls") or m.get("function_call")):
            raise ValueError(f"unsupported_role: {key}[{i}] is a tool call")
        if role == "assistant" and "weight" in m:
            if m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                raise ValueError(f"missing_field: {key}[{i}] 'weight' must be 0 or 1, got {m['weight']!r}")
            if m["weight"] == 0:
                quiet.append(i)
        if isinstance(text, list):  # OpenAI content parts
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in text):
                raise ValueError(f"unsupported_content: {key}[{i}] has content parts other than text")
            text = "".join(p["text"] for p in text)
        roles.append(role)
        texts.append(_string(text, f"{key}[{i}] {text_key!r}"))
    first = 0
    if roles[0] == "system":
        system = texts[0]  # the message wins over a top-level field
        roles, texts, first = roles[1:], texts[1:], 1
    want = ["user", "assistant"] * (len(roles) // 2 + 1)
    if not roles or roles != want[:len(roles)] or roles[-1] != "assistant":
        shown = roles[:6] + (["..."] if len(roles) > 6 else [])
        raise ValueError(f"unequal_turns: {key} must alternate user/assistant and end with assistant (got {shown})")
    return system or None, [(texts[i], texts[i + 1]) for i in range(0, len(texts), 2)], \
        tuple((i - first) // 2 for i in quiet)


# ---- chat templates --------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def compiled_template(template: str):
    """The Jinja template, compiled once per process (compiling costs ~10 ms, a render ~0.1 ms).
    Same sandbox and options as chat.render_chat_template, which compiles on every call."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def template_specials(tok: Tokenizer) -> dict:
    """bos_token/eos_token/pad_token/unk_token strings for the template, as chat.build_template_ids passes them."""
    out = {}
    for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
        v = tok.tokenizer_config.get(k)
        out[k] = (v.get("content") if isinstance(v, dict) else v) or ""
    return out


def template_sha256(template: str) -> str:
    return "sha256:" + hashlib.sha256(template.encode("utf-8", "surrogatepass")).hexdigest()


def token_starts(tok: Tokenizer, text: str) -> tuple[list[int], np.ndarray]:
    """(ids of the whole text, as tok.encode gives them, and each token's start in characters)."""
    if tok.hf is not None:
        enc = tok.hf.encode(text, add_special_tokens=False)
        return enc.ids, np.asarray([o[0] for o in enc.offsets], np.int64)
    try:
        proto = tok.sp.encode(text, out_type="proto")  # sentencepiece >= 0.2 (needs protobuf)
    except Exception:
        proto = tok.sp.encode(text, out_type="immutable_proto")  # 0.1.99
    raw = np.frombuffer(text.encode("utf-8"), np.uint8)
    char_of_byte = np.cumsum((raw & 0xC0) != 0x80) - 1  # continuation bytes belong to their lead byte
    char_of_byte = np.append(char_of_byte, len(text))
    return [p.id for p in proto.pieces], char_of_byte[np.asarray([p.begin for p in proto.pieces], np.int64)]


def encode_template(tok: Tokenizer, system: str | None, turns: list[tuple[str, str]], quiet=()
                    ) -> tuple[np.ndarray, np.ndarray, list[int], bool]:
    """(ids int32, loss mask uint8, part lengths, has a prefix part) of a dialogue rendered with the
    tokenizer's chat template and tokenized whole (as chat.build_template_ids does at inference).

    Where each message starts and ends comes from rendering the growing prefixes of the dialogue,
    each of which must be a prefix of the whole. Loss: the tokens of each assistant message after
    its generation prompt, through the last special token there (the end-of-turn token, e.g.
    <|im_end|>); what the template puts after it (a newline) and everything else gets none. Parts:
    what comes before the first user message (the system prompt), then each turn. Turns numbered in
    `quiet` get no loss."""
    template = compiled_template(tok.chat_template)
    specials = template_specials(tok)
    messages = ([{"role": "system", "content": system}] if system else [])
    for q, a in turns:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    rendered: dict = {}

    def render(n: int, gen: bool) -> str:
        if (n, gen) not in rendered:  # the end of one turn is the start of the next
            try:
                rendered[n, gen] = template.render(messages=messages[:n], add_generation_prompt=gen, **specials)
            except Exception as e:  # the template's raise_exception, or any Jinja error: that record only
                raise ValueError(f"template_error: {type(e).__name__}: {e}") from None
        return rendered[n, gen]

    full = render(len(messages), False)
    first = 1 if system else 0
    cuts, spans = [], []  # turn starts; assistant (start, end) in characters
    for k in range(first, len(messages), 2):
        points = (render(k, False), render(k + 1, True), render(k + 2, False))
        for p in points:
            if not full.startswith(p):
                raise ValueError(f"template_error: the chat template does not render turn {(k - first) // 2 + 1} "
                                 "as a prefix of the whole dialogue, so its assistant tokens cannot be located")
        cuts.append(len(points[0]))
        spans.append((len(points[1]), len(points[2])))
    rendered.clear()
    ids, starts = token_starts(tok, full)
    ids = np.asarray(ids, np.int32)
    mask = np.zeros(len(ids), np.uint8)
    special = np.isin(ids, np.fromiter(tok.special_ids, np.int64, len(tok.special_ids)))
    for t, (a, b) in enumerate(spans):
        if t in quiet:
            continue
        lo, hi = np.searchsorted(starts, a), np.searchsorted(starts, b)
        if lo >= hi:
            raise ValueError("template_error: an assistant message renders to no tokens")
        marks = np.nonzero(special[lo:hi])[0]
        mask[lo:lo + marks[-1] + 1 if len(marks) else hi] = 1
    bounds = np.searchsorted(starts, cuts).tolist() + [len(ids)]
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if bounds[0] > 0:
        lengths.insert(0, bounds[0])
    return ids, mask, lengths, bounds[0] > 0

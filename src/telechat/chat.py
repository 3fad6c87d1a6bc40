"""TeleChat chat format (spec section 4) and multi-turn chat, whole or streamed."""
from __future__ import annotations

from typing import Iterator


from .engine import Engine
from .generate import default_max_new_tokens, resolve_params
from .tokenizer import StreamDecoder, Tokenizer

_ROLES = {"user": "user", "bot": "bot", "assistant": "bot", "system": "system"}


def normalize_history(history: list[dict] | None) -> list[dict]:
    """Validate a history list and map roles to "user"/"bot" ("assistant" is accepted for "bot")."""
    out = []
    for i, msg in enumerate(history or []):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"history[{i}] must be a dict with 'role' and 'content', got {msg!r}")
        role = _ROLES.get(msg["role"])
        if role is None:
            raise ValueError(f"history[{i}]: unknown role {msg['role']!r} (expected user, bot or assistant)")
        if role == "system" and i != 0:
            raise ValueError(f"history[{i}]: a system message may only come first")
        out.append({"role": role, "content": str(msg["content"])})
    return out


def _require(tokenizer: Tokenizer, name: str) -> int:
    i = getattr(tokenizer, name)
    if i is None:
        raise ValueError(f"the tokenizer has no {name.removesuffix('_id')} token: the TeleChat chat format needs "
                         "<_user>, <_bot> and <_end>")
    return i


def build_chat_ids(tokenizer: Tokenizer, question: str, history: list[dict] | None = None,
                   max_length: int | None = None) -> list[int]:
    """`<_user> q1 <_bot> a1 <_end> ... <_user> qn <_bot>` as ids, each text segment tokenized alone.

    With `max_length`, the newest question is kept (left-truncated if it alone is too long) and as
    many of the newest history turns as fit in front of it.
    """
    user, bot, end = _require(tokenizer, "user_id"), _require(tokenizer, "bot_id"), _require(tokenizer, "eos_id")
    history = normalize_history(history)
    system: list[int] = []
    if history and history[0]["role"] == "system":
        if tokenizer.system_id is None:
            raise ValueError("this tokenizer has no <_system> token, so the chat cannot carry a system message")
        system = [tokenizer.system_id] + tokenizer.encode(history.pop(0)["content"])
    q = tokenizer.encode(question)
    if max_length is not None:
        if max_length < 3:
            raise ValueError(f"max_length {max_length} cannot hold even an empty question (needs >= 3)")
        q = q[-(max_length - 2):] if max_length > 2 else []
    prompt = [user, *q, bot]
    if max_length is not None and len(system) + len(prompt) > max_length:
        system = []  # the question comes first
    # Group history into turns (a user message and the bot answer after it) and add newest first.
    turns: list[list[int]] = []
    for msg in history:
        ids = [user, *tokenizer.encode(msg["content"])] if msg["role"] == "user" else \
              [bot, *tokenizer.encode(msg["content"]), end]
        if msg["role"] == "user" or not turns:
            turns.append(ids)
        else:
            turns[-1] = turns[-1] + ids
    kept: list[int] = []
    for turn in reversed(turns):
        if max_length is not None and len(system) + len(turn) + len(kept) + len(prompt) > max_length:
            break
        kept = turn + kept
    return system + kept + prompt


def chat_format(tokenizer: Tokenizer | None) -> str:
    """"template" when the checkpoint carries a Jinja chat_template (HF convention, TeleChat2 too),
    else "telechat" when its tokenizer has <_user>/<_bot> (the TeleChat v1 ids format), else "none"."""
    if tokenizer is None:
        return "none"
    if tokenizer.chat_template:
        return "template"
    return "telechat" if tokenizer.user_id is not None and tokenizer.bot_id is not None else "none"


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
    """Render an HF-convention Jinja chat template (sandboxed, as transformers does)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)


def build_template_ids(tokenizer: Tokenizer, question: str, history: list[dict] | None = None,
                       max_length: int | None = None) -> list[int]:
    """The checkpoint's own chat template with the generation prompt, dropping the oldest turns to fit."""
    history = normalize_history(history)
    system = [history.pop(0)] if history and history[0]["role"] == "system" else []
    turns = [{"role": "assistant" if m["role"] == "bot" else m["role"], "content": m["content"]} for m in history]
    specials = {k: tokenizer.tokenizer_config.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    specials = {k: (v.get("content") if isinstance(v, dict) else v) or "" for k, v in specials.items()}
    while True:
        text = render_chat_template(tokenizer.chat_template, system + turns + [{"role": "user", "content": question}],
                                    **specials)
        ids = tokenizer.encode(text)
        if max_length is None or len(ids) <= max_length:
            return ids
        if not turns:
            return ids[-max_length:]
        # Drop the oldest exchange (a user message and the answers after it).
        turns = turns[1:]
        while turns and turns[0]["role"] != "user":
            turns = turns[1:]


def encode_conversation(tokenizer: Tokenizer, question: str, history: list[dict] | None = None,
                        max_length: int | None = None) -> list[int]:
    """Prompt ids in the checkpoint's chat format (TeleChat ids, or its Jinja template)."""
    fmt = chat_format(tokenizer)
    if fmt == "telechat":
        return build_chat_ids(tokenizer, question, history, max_length)
    if fmt == "template":
        return build_template_ids(tokenizer, question, history, max_length)
    raise ValueError("this tokenizer has neither TeleChat's <_user>/<_bot> tokens nor a chat_template")


def _gen_defaults(generation_config) -> dict:
    defaults: dict = {}
    if generation_config is not None:
        gc = generation_config if isinstance(generation_config, dict) else (
            generation_config.to_dict() if hasattr(generation_config, "to_dict") else vars(generation_config))
        defaults.update({k: v for k, v in gc.items() if v is not None})
    return defaults


_GEN_KWARGS = {"max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "eos_token_id",
               "seed", "compile"}


def _check_generation_kwargs(kwargs: dict) -> None:
    unknown = set(kwargs) - _GEN_KWARGS
    if unknown:
        raise TypeError(f"unknown generation argument(s): {', '.join(sorted(unknown))}")


def stream_chat(model, tokenizer: Tokenizer, question: str, history: list[dict] | None = None,
                generation_config=None, compile: bool | None = None, engine: Engine | None = None,
                **kwargs) -> Iterator[str]:
    """Yield text increments of the answer; the history list is extended when the stream ends.

    kwargs are sampling settings (max_new_tokens, do_sample, temperature, top_k, top_p,
    repetition_penalty, eos_token_id, seed); unset ones come from the generation config.
    `engine`: the engine to run on (an LLM's own; default a new one for this model).
    """
    history_list = history if history is not None else []
    defaults = _gen_defaults(generation_config)
    context = int(defaults.get("max_length") or model.config.seq_length)
    max_new = kwargs.pop("max_new_tokens", None)
    # Room for the answer, but never so much that the question itself gets cut.
    wanted = max_new if max_new is not None else default_max_new_tokens(defaults, 0, context)
    reserve = min(int(wanted), context // 2)
    ids = encode_conversation(tokenizer, question, history_list, max_length=max(3, context - reserve))
    if max_new is None:
        max_new = default_max_new_tokens(defaults, len(ids), context)
    if chat_format(tokenizer) == "telechat":
        defaults.setdefault("user_token_id", tokenizer.user_id)
    if tokenizer.eos_id is not None:
        defaults.setdefault("eos_token_id", tokenizer.eos_id)
    _check_generation_kwargs(kwargs)
    params = resolve_params(defaults, model.config.vocab_size, max_new_tokens=int(max_new), **kwargs)
    if engine is None:
        engine = Engine(model)
    if compile is not None:
        engine.configure(compile=compile)
    decoder = StreamDecoder(tokenizer)
    stops = set(params.stop_ids)
    for (t,) in engine.iter_tokens([ids], [params], max_len=len(ids) + params.max_new_tokens):
        if t in stops:
            break
        delta = decoder.push(t)
        if delta:
            yield delta
    # Held-back bytes at the end are a character cut in half (by max_new_tokens or a stop id):
    # they would decode as U+FFFD, so they are dropped, streamed or not.
    tail = decoder.flush().rstrip("\ufffd")
    decoder.text = decoder.text.rstrip("\ufffd")
    if tail:
        yield tail
    history_list.append({"role": "user", "content": question})
    history_list.append({"role": "bot", "content": decoder.text})


def chat(model, tokenizer: Tokenizer, question: str, history: list[dict] | None = None, generation_config=None,
         stream: bool = False, engine: Engine | None = None, **kwargs):
    """`(answer, history)`, or with `stream=True` an iterator of text increments.

    `history` is extended in place (a new list when None) with the question and the answer.
    """
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer: this checkpoint folder has none")
    if history is None:
        history = []
    _check_generation_kwargs(kwargs)  # now, not at the first next() of a stream
    it = stream_chat(model, tokenizer, question, history, generation_config, engine=engine, **kwargs)
    if stream:
        return it
    answer = "".join(it)
    return answer, history

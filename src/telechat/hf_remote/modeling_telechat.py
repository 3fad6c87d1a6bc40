"""TeleChat for transformers (`AutoModelForCausalLM`, `trust_remote_code=True`); written by telechat.

The blocks are telechat's own (`telechat_model.py` beside this file in a saved folder, or the
installed `telechat` package). Generation through transformers recomputes the whole sequence each
step (no transformers KV cache); `telechat.load(folder).generate` is the fast path.
"""
import torch
import transformers
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_telechat import TelechatConfig

try:  # in a checkpoint folder written by telechat
    from .telechat_config import TeleChatConfig
    from .telechat_model import Transformer, causal_lm_loss
except ImportError:  # inside the telechat package
    from telechat.config import TeleChatConfig
    from telechat.model import Transformer, causal_lm_loss


class TelechatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TelechatConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = True
    if int(transformers.__version__.split(".")[0]) >= 5:
        _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}
    else:
        _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: TelechatConfig):
        super().__init__(config)
        tc = TeleChatConfig.from_dict({k: v for k, v in config.to_dict().items() if v is not None or k == "base_seqlen"})
        self.transformer = Transformer(tc)
        self.lm_head = torch.nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, torch.nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, torch.nn.Embedding):
            module.weight.data.normal_(0.0, std)

    def get_input_embeddings(self):
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _set_gradient_checkpointing(self, enable=True, gradient_checkpointing_func=None):
        self.transformer.gradient_checkpointing = enable

    def forward(self, input_ids=None, attention_mask=None, labels=None, return_dict=None, **kwargs):
        h = self.transformer(input_ids, attention_mask=attention_mask)
        logits = self.lm_head(h)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def chat(self, tokenizer, question, history=None, generation_config=None, stream=False, **kwargs):
        """TeleChat's published calling convention, on transformers' `generate`: `(answer, history)`, or
        with `stream=True` an iterator of text increments (the history is extended when it ends).

        history: [{"role": "user" | "bot" | "assistant" | "system", "content": str}]; generation_config:
        a `GenerationConfig` or a dict (telechat's `llm.generation_config`; default: the model's own);
        kwargs override single settings (max_new_tokens, do_sample, temperature, ...).
        """
        history = [] if history is None else history
        ids = _chat_ids(tokenizer, question, history)
        stops = [t for t in (tokenizer.eos_token_id, _token_id(tokenizer, "<_user>")) if t is not None]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [0])[0]
        config = _generation_config(self, generation_config, kwargs, eos_token_id=stops or None, pad_token_id=pad)
        call = dict(input_ids=torch.tensor([ids], device=self.device),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.device),
                    generation_config=config)

        def finish(answer):
            history.append({"role": "user", "content": question})
            history.append({"role": "bot", "content": answer})
            return answer

        if not stream:
            new = self.generate(**call)[0, len(ids):].tolist()
            new = new[:next((i for i, t in enumerate(new) if t in stops), len(new))]
            return finish(tokenizer.decode(new, skip_special_tokens=True)), history
        from threading import Thread

        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        failed = []

        def run():
            try:
                self.generate(**call, streamer=streamer)
            except BaseException as e:  # raised in the caller's thread, below
                failed.append(e)
                streamer.end()  # or the caller would wait for text forever

        worker = Thread(target=run, daemon=True)

        def pieces():
            worker.start()
            text = []
            for piece in streamer:
                if piece:
                    text.append(piece)
                    yield piece
            worker.join()
            if failed:
                raise failed[0]
            finish("".join(text))

        return pieces()


def _token_id(tokenizer, token):
    tid = tokenizer.convert_tokens_to_ids(token)
    return None if tid is None or tid == tokenizer.unk_token_id else tid


def _chat_ids(tokenizer, question, history):
    """The prompt: TeleChat's `<_user>q<_bot>a<_end>...<_user>q<_bot>`, or the tokenizer's chat template."""
    user, bot = _token_id(tokenizer, "<_user>"), _token_id(tokenizer, "<_bot>")
    roles = {"bot": "assistant"}
    if user is None or bot is None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has neither TeleChat's <_user>/<_bot> tokens nor a chat_template")
        messages = [{"role": roles.get(m["role"], m["role"]), "content": m["content"]} for m in history]
        text = tokenizer.apply_chat_template(messages + [{"role": "user", "content": question}],
                                             add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    ids = []
    for m in history:
        if m["role"] == "system":
            ids += [_token_id(tokenizer, "<_system>"), *encode(m["content"])]
        elif m["role"] == "user":
            ids += [user, *encode(m["content"])]
        else:
            ids += [bot, *encode(m["content"]), tokenizer.eos_token_id]
    return ids + [user, *encode(question), bot]


_SETTINGS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty")


def _generation_config(model, generation_config, overrides, **fixed):
    """A GenerationConfig from a GenerationConfig, a dict of telechat's settings or the model's own."""
    unknown = set(overrides) - set(_SETTINGS)
    if unknown:
        raise TypeError(f"unknown generation argument(s): {', '.join(sorted(unknown))}")
    if generation_config is None:
        generation_config = model.generation_config
    settings = generation_config.to_dict() if hasattr(generation_config, "to_dict") else dict(generation_config)
    settings = {k: settings[k] for k in _SETTINGS if settings.get(k) is not None}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    settings.setdefault("max_new_tokens", 512)
    if not settings.get("do_sample"):
        settings = {k: v for k, v in settings.items() if k not in ("temperature", "top_k", "top_p")}
    return transformers.GenerationConfig(**settings, **fixed)

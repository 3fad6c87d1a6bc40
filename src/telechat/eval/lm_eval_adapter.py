"""lm-evaluation-harness model "telechat" (needs `pip install lm-eval`).

lm-eval has no plugin discovery for models, and installing telechat runs no code in other
interpreters, so the model is registered explicitly: importing this module registers it. From
the shell, lm-eval's own command line with the model registered:

    telechat-lm-eval --model telechat --model_args pretrained=PATH --tasks ...
    python -m telechat.eval.lm_eval_adapter --model telechat --model_args pretrained=PATH --tasks ...

(a bare `lm_eval --model telechat` does not know it). From Python:

    import telechat.eval.lm_eval_adapter  # noqa: F401  (registers "telechat")
    lm_eval.simple_evaluate(model="telechat", model_args="pretrained=PATH", tasks=[...])

Log-likelihoods go through the harness's `LoglikEngine` (batched, shared prefixes computed once),
generation through the project's decoding loop.
"""
from __future__ import annotations

import sys

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from .generation import generate_until
from .loglik import LoglikEngine, rolling_windows


def _as_bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes", "on")


@register_model("telechat")
class TeleChatLM(TemplateLM):
    """model_args: pretrained (checkpoint folder or "default"), device, dtype, batch_size,
    max_length (context used for scoring), max_gen_toks (default generation length),
    share_prefix (true/false)."""

    def __init__(self, pretrained: str = "default", device: str = "cpu", dtype: str | None = None,
                 batch_size: int | str = 8, max_length: int | None = None, max_gen_toks: int = 256,
                 share_prefix: bool | str = True, llm=None, **kwargs):
        super().__init__()
        import torch

        import telechat

        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm-eval's command line asks for cuda by default
        self.llm = llm if llm is not None else telechat.load(pretrained, device=device, dtype=dtype)
        if self.llm.tokenizer is None:
            raise ValueError(f"{pretrained}: the checkpoint has no tokenizer files; lm-eval needs one")
        self.tokenizer_ = self.llm.tokenizer
        bs = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.batch_size = bs
        self._max_length = int(max_length or self.llm.config.seq_length)
        self.max_gen_toks = int(max_gen_toks)
        self.engine = LoglikEngine(self.llm.model, bs, _as_bool(share_prefix), self._max_length)

    # ---- tokens --------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        t = self.tokenizer_
        return int(t.eos_id if t.eos_id is not None else t.pad_id or 0)

    @property
    def prefix_token_id(self) -> int:
        t = self.tokenizer_
        return int(t.bos_id) if t.bos_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer_.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer_.decode(tokens)

    # ---- requests ------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        with tqdm(total=len(pairs), disable=disable_tqdm, desc="telechat loglikelihood") as bar:
            out = self.engine.loglikelihood(pairs, progress=bar.update)
        for (key, _, _), res in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            # Disjoint windows of the whole context, as lm-eval's own models score documents.
            w = rolling_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, self.max_length)
            windows.extend(w)
            owner.extend([i] * len(w))
        with tqdm(total=len(windows), disable=disable_tqdm, desc="telechat loglikelihood_rolling") as bar:
            scores = self.engine.loglikelihood(windows, progress=bar.update)
        totals = [0.0] * len(requests)
        for i, (s, _) in zip(owner, scores):
            totals[i] += s
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            _, kw = req.args
            groups.setdefault(repr(sorted((kw or {}).items())), []).append(i)
        out = [""] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="telechat generate_until") as bar:
            for idx in groups.values():
                kw = dict(requests[idx[0]].args[1] or {})
                until = kw.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
                do_sample = bool(kw.pop("do_sample", False))
                temperature = kw.pop("temperature", None)
                if temperature is not None and float(temperature) == 0.0:
                    do_sample, temperature = False, None
                prompts = [self.tok_encode(requests[i].args[0]) or [self.prefix_token_id] for i in idx]
                texts = generate_until(self.llm, prompts, max_new, stop=until, batch_size=self.batch_size,
                                       do_sample=do_sample, temperature=temperature, top_p=kw.pop("top_p", None),
                                       top_k=kw.pop("top_k", None), seed=kw.pop("seed", None), progress=bar.update)
                for i, t in zip(idx, texts):
                    out[i] = t
                    self.cache_hook.add_partial("generate_until", requests[i].args, t)
        return out


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line, with the "telechat" model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()

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

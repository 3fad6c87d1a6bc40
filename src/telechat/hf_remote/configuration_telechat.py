"""TeleChat config for transformers (`AutoConfig`, `trust_remote_code=True`); written by telechat."""
from transformers import PretrainedConfig


class TelechatConfig(PretrainedConfig):
    model_type = "telechat"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "intermediate_size": "ffn_hidden_size", "rms_norm_eps": "layer_norm_epsilon"}

    def __init__(self, vocab_size=120000, hidden_size=5120, n_layer=38, n_head=32, ffn_hidden_size=12288,
                 layer_norm_epsilon=1e-5, training_seqlen=8192, seq_length=8192, base_seqlen=None,
                 rope_theta=10000.0, num_key_value_heads=None, hidden_dropout=0.0, attention_dropout=0.0,
                 embed_layernorm=False, bias=True, qkv_bias=False, tie_word_embeddings=True, **kwargs):
        for alias in self.attribute_map:
            kwargs.pop(alias, None)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.ffn_hidden_size = ffn_hidden_size
        self.layer_norm_epsilon = layer_norm_epsilon
        self.training_seqlen = training_seqlen
        self.seq_length = seq_length
        self.base_seqlen = base_seqlen
        self.rope_theta = rope_theta
        self.num_key_value_heads = num_key_value_heads
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.embed_layernorm = embed_layernorm
        self.bias = bias
        self.qkv_bias = qkv_bias
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

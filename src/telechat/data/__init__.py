"""Training data: tokenizer training, SFT preparation with loss masks, pre-training token streams."""

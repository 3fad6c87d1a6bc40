"""transformers classes for TeleChat: written into saved folders as remote code, and registered with
the Auto classes after `import telechat`. The math is telechat's own `model.py`."""

"""telechat: TeleChat models in PyTorch: load official checkpoints, chat, generate, save.

Importing it has no side effects on other libraries: transformers' Auto classes learn "telechat"
through `telechat.hf.register_auto_classes()` (or `import telechat.hf_remote`), lm-eval's model
registry through `import telechat.eval.lm_eval_adapter`."""
from .chat import build_chat_ids
from .checkpoint import CheckpointError
from .config import ConfigError, TeleChatConfig, preset
from .llm import LLM, from_preset, load
from .model import TeleChat
from .tokenizer import Tokenizer, TokenizerError, load_tokenizer

__all__ = ["LLM", "load", "from_preset", "load_tokenizer", "build_chat_ids", "Tokenizer", "TeleChat",
           "TeleChatConfig", "preset", "CheckpointError", "ConfigError", "TokenizerError"]
__version__ = "0.1.0"

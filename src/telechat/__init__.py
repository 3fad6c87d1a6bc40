"""telechat: TeleChat models in PyTorch: load official checkpoints, chat, generate, save."""
from .chat import build_chat_ids
from .checkpoint import CheckpointError
from .config import ConfigError, TeleChatConfig, preset
from .llm import LLM, from_preset, load
from .model import TeleChat
from .tokenizer import Tokenizer, TokenizerError, load_tokenizer

__all__ = ["LLM", "load", "from_preset", "load_tokenizer", "build_chat_ids", "Tokenizer", "TeleChat",
           "TeleChatConfig", "preset", "CheckpointError", "ConfigError", "TokenizerError"]
__version__ = "0.1.0"

from .hf import install_auto_registration as _install_auto_registration  # noqa: E402

_install_auto_registration()

"""transformers classes for TeleChat: written into saved folders as remote code (`telechat.hf.write_remote_code`);
the math is telechat's own `model.py`. Importing this package registers them with transformers' Auto
classes (`import telechat.hf_remote`, the same as `telechat.hf.register_auto_classes()`): its modules
need transformers anyway, and nothing in telechat imports it otherwise."""
from .configuration_telechat import TelechatConfig
from .modeling_telechat import TelechatForCausalLM


def register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register("telechat", TelechatConfig)
        AutoModelForCausalLM.register(TelechatConfig, TelechatForCausalLM)
    except ValueError:  # already registered (called twice, or transformers knows it)
        pass


register()

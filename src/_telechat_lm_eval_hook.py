"""Registers the lm-evaluation-harness model "telechat" so that a bare `lm_eval --model telechat` works.

lm-eval has no plugin discovery for models. The installed `telechat-lm-eval.pth` imports this
module at interpreter start; it imports nothing heavy, only watches for `lm_eval.models` (which
lm-eval imports before it looks a model up) and then registers "telechat" as a lazy entry, so the
adapter (and torch) load only when the model is asked for.
"""
import sys
from importlib.machinery import PathFinder

_WATCHED = "lm_eval.models"
_TARGET = "telechat.eval.lm_eval_adapter:TeleChatLM"


def _register() -> None:
    from lm_eval.api import registry

    models = getattr(registry, "model_registry", None)
    if models is not None and hasattr(models, "register"):  # lm-eval >= 0.4.10: lazy entries
        if "telechat" not in models:
            models.register("telechat", target=_TARGET)
    else:  # older lm-eval: a plain dict filled by decorators
        import telechat.eval.lm_eval_adapter  # noqa: F401


class _Finder:
    """A meta-path finder that only wraps the loader of `lm_eval.models`."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != _WATCHED:
            return None
        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            try:
                _register()
            except Exception as e:  # never break lm-eval itself
                print(f"telechat: could not register the lm-eval model: {e}", file=sys.stderr)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if not any(f is _Finder for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder)
    if _WATCHED in sys.modules:  # already imported (e.g. installed late): register now
        _register()


install()

"""`telechat serve`: an OpenAI-compatible and TeleChat-compatible HTTP server over a continuous-batching engine."""
from ..engine import Engine, QueueFull, Sequence, Stream

__all__ = ["Engine", "QueueFull", "Sequence", "Stream", "create_app"]


def create_app(*args, **kwargs):
    """See `telechat.serve.app.create_app` (imported lazily: it needs fastapi)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)

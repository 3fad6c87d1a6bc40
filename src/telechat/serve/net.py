"""Connection hygiene for `telechat serve`: header-read and idle timeouts, a connection limit, and
log rate limiting, on top of uvicorn's pure-Python (h11) HTTP protocol.

uvicorn closes idle keep-alive connections but has no deadline for a request's headers and no cap
on open connections, so slow clients (slowloris) could hold every file descriptor; each failed
accept() then logged a traceback.
"""
from __future__ import annotations

import logging
import resource
import time

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("telechat.serve")

# File descriptors kept out of the connection limit: the model's files, the log, the listening socket,
# and the connections accepted in one burst before the limit closes the excess (see `backlog`).
_FD_RESERVE = 64
BACKLOG = 128


def default_max_connections() -> int:
    """1000, or fewer when the process may not open that many files."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1000
    return max(8, min(1000, soft - _FD_RESERVE - BACKLOG))


def guarded_protocol(max_connections: int, header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a header deadline and a cap on open connections.

    A connection has `header_timeout` seconds from its opening (or from the first byte of its next
    request on a kept-alive connection) to send complete request headers, else it is closed. Past
    `max_connections`, a new connection replaces the one idle the longest (waiting for headers or
    kept alive between requests); when every connection is busy with a request, the new one is
    answered 503 and closed.
    """
    if max_connections < 1:
        raise ValueError(f"max_connections must be >= 1, got {max_connections}")
    if not header_timeout > 0:
        raise ValueError(f"header_timeout must be > 0, got {header_timeout}")

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.idle_since: float | None = None  # monotonic time, while no request is in progress
            self.header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.idle_since = time.monotonic()
            if len(self.connections) > max_connections and not self._make_room():
                self._refuse()
                return
            self._arm_header_timer()

        def _make_room(self) -> bool:
            idle = [c for c in self.connections
                    if c is not self and getattr(c, "idle_since", None) is not None and not c.transport.is_closing()]
            if not idle:
                return False
            oldest = min(idle, key=lambda c: c.idle_since)
            log.warning("%d connections open (--max-connections): closing the one idle longest", len(self.connections))
            oldest.close_idle()
            return True

        def _refuse(self) -> None:
            log.warning("%d connections open (--max-connections), all busy: answering 503", len(self.connections))
            body = (b'{"error": {"message": "too many connections, retry later", "type": "server_error", '
                    b'"param": null, "code": "unavailable"}}')
            self.transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\nretry-after: 1\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(body), body))
            self.idle_since = None
            self.transport.close()

        def close_idle(self) -> None:
            self._cancel_header_timer()
            self.idle_since = None
            self.transport.close()

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self.header_timer = self.loop.call_later(header_timeout, self._header_timeout)

        def _cancel_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _header_timeout(self) -> None:
            self.header_timer = None
            if self.idle_since is not None and not self.transport.is_closing():
                self.idle_since = None
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)  # cancels the keep-alive timer; may start a request
            if self.idle_since is not None and self.header_timer is None and not self.transport.is_closing():
                self._arm_header_timer()  # the first bytes of a request on a kept-alive connection

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers are complete: it is being served
                self._cancel_header_timer()
                self.idle_since = None

        def on_response_complete(self) -> None:
            self.idle_since = time.monotonic()  # before: the parent may start a pipelined request
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._cancel_header_timer()
            self.idle_since = None
            super().connection_lost(exc)

    return GuardedH11Protocol


class RateLimit(logging.Filter):
    """Lets through at most `burst` records of one kind (logger, message start, exception type) per
    `interval` seconds; the first record after a quiet spell says how many were dropped. An accept()
    failing with EMFILE logs a traceback each time: a storm of them must not fill the disk."""

    def __init__(self, burst: int = 5, interval: float = 60.0):
        super().__init__()
        self.burst, self.interval = burst, interval
        self.kinds: dict[tuple, list] = {}  # kind -> [window start, records in window, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
        kind = (record.name, str(record.msg)[:80], exc)
        now = time.monotonic()
        state = self.kinds.get(kind)
        if state is None or now - state[0] >= self.interval:
            dropped = state[2] if state else 0
            if len(self.kinds) > 1000:  # many distinct messages: forget the old windows
                self.kinds.clear()
            self.kinds[kind] = [now, 1, 0]
            if dropped:
                record.msg = f"{record.msg} ({dropped} similar messages suppressed in the last {self.interval:g} s)"
            return True
        if state[1] < self.burst:
            state[1] += 1
            return True
        state[2] += 1
        return False


RATE_LIMITED_LOGGERS = ("asyncio", "uvicorn.error", "telechat.serve")


def rate_limit_logs(burst: int = 5, interval: float = 60.0) -> RateLimit:
    """Install one RateLimit filter on the loggers an accept or connection storm writes to."""
    f = RateLimit(burst, interval)
    for name in RATE_LIMITED_LOGGERS:
        logger = logging.getLogger(name)
        for old in [x for x in logger.filters if isinstance(x, RateLimit)]:
            logger.removeFilter(old)
        logger.addFilter(f)
    return f


def server_config(app, host: str = "127.0.0.1", port: int = 8000, *, max_connections: int | None = None,
                  header_timeout: float = 10.0, keep_alive_timeout: float = 5.0, log_level: str = "info",
                  **kwargs) -> uvicorn.Config:
    """A uvicorn.Config with the guarded protocol, on asyncio's loop, with rate-limited logs."""
    if not keep_alive_timeout > 0:
        raise ValueError(f"keep_alive_timeout must be > 0, got {keep_alive_timeout}")
    protocol = guarded_protocol(max_connections or default_max_connections(), header_timeout)
    config = uvicorn.Config(app, host=host, port=port, http=protocol, loop="asyncio", backlog=BACKLOG,
                            timeout_keep_alive=keep_alive_timeout, log_level=log_level, **kwargs)
    rate_limit_logs()  # after uvicorn.Config, which configures the uvicorn loggers
    return config

"""Slow and idle clients (issue 23, defect 6): header and body deadlines, the connection limit, and
rate-limited connection-error logs, against a real `telechat serve` stack in a subprocess whose
open-files limit is lowered."""
from __future__ import annotations

import logging
import os
import select
import socket
import subprocess
import sys
import time

import httpx
import pytest

from telechat.serve.net import RateLimit, default_max_connections, guarded_protocol

SERVER = r"""
import resource, socket, sys
nofile, max_connections, header_timeout, sp_model = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
import uvicorn, telechat
from telechat.serve.app import create_app
from telechat.serve.net import server_config
llm = telechat.from_preset("tiny", seed=0, tokenizer=telechat.load_tokenizer(sp_model), seq_length=128)
app = create_app(llm, model_name="t", max_concurrency=1, max_queue=4, body_timeout=header_timeout)
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
config = server_config(app, max_connections=None if max_connections == "default" else int(max_connections),
                       header_timeout=header_timeout, keep_alive_timeout=1, log_level="info")
print("PORT", sock.getsockname()[1], "MAX", config.http.__name__, flush=True)
uvicorn.Server(config).run(sockets=[sock])
"""


class Subserver:
    def __init__(self, sp_model, tmp_path, nofile: int, max_connections="default", header_timeout: float = 1.5):
        self.log_path = tmp_path / "server.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(nofile), str(max_connections),
                                      str(header_timeout), str(sp_model)],
                                     stdout=subprocess.PIPE, stderr=self.log,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = self.proc.stdout.readline().decode()
        if not line.startswith("PORT"):
            self.stop()
            pytest.fail(f"the server did not start: {line!r} {self.log_path.read_text()[-2000:]}")
        self.port = int(line.split()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                pytest.fail(f"the server did not come up: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def log_bytes(self) -> int:
        self.log.flush()
        return self.log_path.stat().st_size


def _slow_clients(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(3)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        except OSError:
            s.close()
            continue
        s.setblocking(False)
        socks.append(s)
    return socks


def _closed_by_server(s: socket.socket) -> bool:
    try:
        r, _, _ = select.select([s], [], [], 0)
        if r:
            s.recv(4096)  # EOF, or a 503 before it: the server let go
            return True
        s.send(b"X")  # a header byte now and then, as a slowloris client does
        return False
    except OSError:
        return True


def _drain(socks, until: float, check=None) -> tuple[int, list]:
    """Trickle header bytes into `socks` until all are closed by the server or `until` passes."""
    open_ = list(socks)
    results = []
    while open_ and time.monotonic() < until:
        open_ = [s for s in open_ if not _closed_by_server(s)]
        if check is not None:
            results.append(check())
        time.sleep(0.25)
    return len(open_), results


@pytest.mark.slow
def test_slowloris_is_bounded(sp_model, tmp_path):
    """300 slow clients against a server allowed 256 open files: /health answers throughout, every
    slow connection is closed within the header timeout, the log stays small, nothing leaks."""
    srv = Subserver(sp_model, tmp_path, nofile=256, header_timeout=1.5)
    socks = []
    try:
        start = time.monotonic()
        socks = _slow_clients(srv.port, 300)
        assert len(socks) >= 250

        def health():
            try:
                return httpx.get(srv.url + "/health", timeout=10).status_code
            except httpx.TransportError as e:
                return type(e).__name__

        left, answers = _drain(socks, start + 15, health)
        assert left == 0, f"{left} slow connections still open after 15 s (header timeout 1.5 s)"
        assert answers and set(answers) == {200}, answers
        # kept-alive connections that go quiet are closed too (keep-alive timeout 1 s)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            s.settimeout(10)
            while s.recv(4096):
                pass  # EOF when the server closes the idle connection
        # a body that never arrives: 408 after the body timeout
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                      b"content-length: 100\r\n\r\n{\"prompt\":")
            assert b" 408 " in s.recv(4096).split(b"\r\n")[0]
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        assert srv.log_bytes() < 20_000, srv.log_path.read_text()[-3000:]
    finally:
        for s in socks:
            s.close()
        srv.stop()


@pytest.mark.slow
def test_accept_storm_logs_little(sp_model, tmp_path):
    """A limit set above the open-files limit: accept() fails with EMFILE over and over; the log
    stays small and the server serves again once the storm is gone."""
    srv = Subserver(sp_model, tmp_path, nofile=160, max_connections=5000, header_timeout=2)
    socks = []
    try:
        start = time.monotonic()
        socks = _slow_clients(srv.port, 400)
        left, _ = _drain(socks, start + 20)
        for s in socks:
            s.close()
        socks = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(srv.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            pytest.fail("the server did not recover after the storm")
        text = srv.log_path.read_text()
        assert srv.log_bytes() < 30_000, text[-3000:]
    finally:
        for s in socks:
            s.close()
        srv.stop()


# ---- pieces, in process --------------------------------------------------------------------------
def test_rate_limit_filter():
    logger = logging.getLogger("telechat.test.ratelimit")
    logger.propagate = False
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    f = RateLimit(burst=3, interval=0.5)
    logger.addFilter(f)
    try:
        for i in range(1000):
            logger.error("socket.accept() out of system resource %d", i)
        logger.error("something else")
        assert len(records) == 4 and records[-1] == "something else"
        time.sleep(0.6)
        logger.error("socket.accept() out of system resource %d", 1)
        assert "997 similar messages suppressed" in records[-1]
    finally:
        logger.removeFilter(f)
        logger.removeHandler(handler)


def test_limits_are_checked():
    assert 8 <= default_max_connections() <= 1000
    with pytest.raises(ValueError, match="max_connections"):
        guarded_protocol(0, 1.0)
    with pytest.raises(ValueError, match="header_timeout"):
        guarded_protocol(10, 0)


def test_cli_serve_rejects_bad_limits(capsys):
    from telechat.cli import main

    for flag, value in (("--max-connections", "0"), ("--header-timeout", "-1"), ("--keep-alive-timeout", "0"),
                        ("--body-timeout", "nan")):
        assert main(["serve", "--model", "/nonexistent", flag, value]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag} must be > 0") and "Traceback" not in err

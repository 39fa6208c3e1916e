"""Bad socket messages and bad HTTP requests get a clear error and never take the daemon down."""
from __future__ import annotations

import json
import socket

import pytest

from conftest import http_get, metric_value, wait_for


@pytest.fixture
def daemon(daemon_factory):
    return daemon_factory().start()


def ask(path, payload: bytes, timeout=5.0) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(payload)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


@pytest.mark.parametrize("payload,needle", [
    (b"not json\n", "malformed request"),
    (b"[1, 2]\n", "malformed request"),
    (b'{"cmd": 42}\n', "malformed request"),
    (b'{"cmd": "reboot"}\n', "unknown command"),
    (b'{"cmd": "events", "limit": "many"}\n', "bad events request"),
    (b'{"cmd": "events", "since": "yesterday"}\n', "bad events request"),
    (b"\xff\xfe\x00garbage\n", "malformed request"),
    (b"x" * 70000 + b"\n", "larger than"),
])
def test_bad_socket_messages_get_clear_errors(daemon, payload, needle):
    reply = ask(daemon.socket, payload)
    assert reply["ok"] is False and needle in reply["error"], reply
    assert ask(daemon.socket, b'{"cmd": "status"}\n')["ok"] is True


def test_half_open_and_silent_clients_do_not_block_others(daemon):
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(daemon.socket)        # connects and says nothing
    try:
        assert ask(daemon.socket, b'{"cmd": "status"}\n')["ok"] is True
    finally:
        silent.close()


def test_bad_http_requests(daemon):
    host, port = "127.0.0.1", daemon.port
    for raw in (b"GARBAGE\r\n\r\n", b"GET /metrics HTTP/9.9\r\n\r\n", b"\x00\x01\x02\r\n\r\n",
                b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"POST /metrics HTTP/1.1\r\n"
                b"Content-Length: 5\r\n\r\nhello"):
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(raw)
            first = b""
            while len(first) < 400:
                chunk = s.recv(400)
                if not chunk:
                    break
                first += chunk
        # an error status (400, 405, 414, 501, 505), never a scrape
        assert any(code in first for code in (b"400", b"405", b"414", b"501", b"505")), \
            (raw[:20], first)
        assert b"gpucostd_" not in first
    before = metric_value(daemon.metrics(), "gpucostd_cycles_total")
    wait_for(lambda: metric_value(daemon.metrics(), "gpucostd_cycles_total") > before, 10,
             what="the loop still cycling")
    assert http_get(daemon.url + "/healthz")[0] == 200
    assert daemon.proc.poll() is None

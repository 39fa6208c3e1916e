"""The inference probe against a tiny local HTTP server (random free port on 127.0.0.1)."""
from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from gpucostd.probes.inference import InferenceProbe, InferenceReading, parse_metric

VLLM = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="meta-llama/Llama-3.1-8B-Instruct"} 12.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.2345e+06
vllm:generation_tokens_total{model_name="other model, with spaces {braces}"} 655.0
# HELP vllm:generation_tokens_created Number of generation tokens processed.
# TYPE vllm:generation_tokens_created gauge
vllm:generation_tokens_created{model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.7e+09
"""

TGI = """\
# TYPE tgi_request_generated_tokens histogram
tgi_request_generated_tokens_bucket{le="1.0"} 3
tgi_request_generated_tokens_bucket{le="+Inf"} 40
tgi_request_generated_tokens_sum 9000
tgi_request_generated_tokens_count 40
"""


class _Server:
    def __init__(self, body: str = VLLM, status: int = 200, delay: float = 0.0):
        self.body, self.status, self.delay = body, status, delay
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if outer.delay:
                    time.sleep(outer.delay)
                data = outer.body.encode() if isinstance(outer.body, str) else outer.body
                self.send_response(outer.status)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    servers = []

    def make(**kw):
        s = _Server(**kw)
        servers.append(s)
        return s
    yield make
    for s in servers:
        s.close()


def test_vllm_counter_summed_over_label_sets(server):
    s = server()
    r = InferenceProbe(s.url, "vllm:generation_tokens_total", 1.0).read()
    assert r.error is None and r.ok
    assert r.tokens_total == pytest.approx(1234500.0 + 655.0)
    assert r.series == 2 and r.metric == "vllm:generation_tokens_total"


def test_counter_increases_between_reads(server):
    s = server()
    p = InferenceProbe(s.url, "vllm:generation_tokens_total", 1.0)
    a = p.read()
    s.body = VLLM.replace("1.2345e+06", "1.2445e+06")
    b = p.read()
    assert b.tokens_total - a.tokens_total == pytest.approx(10000.0)
    assert b.time >= a.time


def test_tgi_histogram_uses_sum(server):
    s = server(body=TGI)
    r = InferenceProbe(s.url, "tgi_request_generated_tokens", 1.0).read()
    assert r.tokens_total == 9000 and r.metric == "tgi_request_generated_tokens_sum"


def test_sglang_name_with_colon():
    text = 'sglang:generation_tokens_total{model_name="m"} 7.557572e+06\n'
    assert parse_metric(text, "sglang:generation_tokens_total")[0] == pytest.approx(7557572.0)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_port_is_an_error_in_words():
    url = f"http://127.0.0.1:{_closed_port()}/metrics"
    r = InferenceProbe(url, "vllm:generation_tokens_total", 0.5).read()
    assert isinstance(r, InferenceReading) and r.tokens_total is None
    assert url in r.error and "unreachable" in r.error


def test_http_error_status(server):
    s = server(body="no such page", status=404)
    r = InferenceProbe(s.url, "vllm:generation_tokens_total", 1.0).read()
    assert "HTTP 404" in r.error and s.url in r.error


def test_metric_missing_says_which_and_how_to_fix(server):
    s = server()
    r = InferenceProbe(s.url, "sglang:generation_tokens_total", 1.0).read()
    assert "sglang:generation_tokens_total not found" in r.error
    assert "tokens_metric" in r.error


@pytest.mark.parametrize("body,words", [
    ("<html><body>Hello</body></html>\n", "not Prometheus text"),
    ("vllm:generation_tokens_total{model_name=\"m\"} lots\n", "not a number"),
    ("vllm:generation_tokens_total -5\n", "not a token count"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
])
def test_malformed_text_is_an_error(server, body, words):
    s = server(body=body)
    r = InferenceProbe(s.url, "vllm:generation_tokens_total", 1.0).read()
    assert r.tokens_total is None and words in r.error


def test_timeout_is_short_and_reported(server):
    s = server(delay=2.0)
    t0 = time.monotonic()
    r = InferenceProbe(s.url, "vllm:generation_tokens_total", 0.2).read()
    assert time.monotonic() - t0 < 1.5
    assert "did not answer within 0.2 s" in r.error


def test_bad_url_is_an_error():
    r = InferenceProbe("localhost:8000/metrics", "vllm:generation_tokens_total", 0.2).read()
    assert "not an http://" in r.error


class _RawServer:
    """A TCP server that answers every connection with `payload` (raw bytes, not necessarily
    HTTP), or trickles a body a line at a time when `trickle` is set."""

    def __init__(self, payload: bytes = b"", trickle: bool = False):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/metrics"
        self.payload, self.trickle = payload, trickle
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                conn.recv(65536)
                if self.trickle:
                    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n")
                    while not self.stop.is_set():
                        conn.sendall(b"# still here\n")
                        self.stop.wait(0.05)
                else:
                    conn.sendall(self.payload)
            except OSError:
                pass
            finally:
                conn.close()

    def close(self):
        self.stop.set()
        self.sock.close()


@pytest.mark.parametrize("payload, words", [
    (b"garbage\r\n\r\n", "did not answer with valid HTTP"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n", "did not answer with valid HTTP"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nvllm:generation_tokens_total 5\n",
     "before the end of its answer"),
])
def test_non_http_or_truncated_answer_is_an_error_not_an_exception(payload, words):
    s = _RawServer(payload)
    try:
        r = InferenceProbe(s.url, "vllm:generation_tokens_total", 1.0).read()
    finally:
        s.close()
    assert r.tokens_total is None and words in r.error and s.url in r.error
    assert "\n" not in r.error and "\r" not in r.error


def test_trickling_body_is_cut_at_the_timeout():
    s = _RawServer(trickle=True)
    try:
        t0 = time.monotonic()
        r = InferenceProbe(s.url, "vllm:generation_tokens_total", 0.3).read()
        elapsed = time.monotonic() - t0
    finally:
        s.close()
    assert elapsed < 1.5
    assert "did not finish its answer within 0.3 s" in r.error


def test_body_over_the_cap_is_refused(server, monkeypatch):
    import gpucostd.probes.inference as inf
    monkeypatch.setattr(inf, "MAX_BYTES", 1024)
    s = server(body=VLLM + "# pad\n" * 1000)
    r = InferenceProbe(s.url, "vllm:generation_tokens_total", 1.0).read()
    assert r.tokens_total is None and "returned more than" in r.error

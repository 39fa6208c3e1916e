"""Every major inference server's generated-token series, recognised on real expositions from
those projects (tests/fixtures/expositions/, each with its `# source:` line), plus label
selectors and the probe's one deadline for the whole HTTP exchange."""
from __future__ import annotations

import http.server
import socket
import threading
import time
from pathlib import Path

import pytest

from gpucostd.config import ConfigError, parse
from gpucostd.probes.inference import (TRTLLM_NO_COUNTER, Exposition, InferenceProbe,
                                       ParseError, read_tokens, serving_figures)

FIX = Path(__file__).resolve().parent / "fixtures" / "expositions"


def fixture(name):
    text = (FIX / name).read_text()
    assert text.startswith("# source:"), name     # provenance stays with the data
    return text


@pytest.mark.parametrize("name, server, series, tokens", [
    ("vllm_v1.prom", "vllm", "vllm:generation_tokens_total", 600),       # not the _created gauge
    ("vllm_v0.prom", "vllm", "vllm:generation_tokens_total", 218152),
    ("triton_vllm_backend.prom", "vllm", "vllm:generation_tokens_total", 16),
    ("sglang.prom", "sglang", "sglang:generation_tokens_total", 7557572),
    ("llamacpp.prom", "llama.cpp", "llamacpp:tokens_predicted_total", 3469),    # ik_llama.cpp fork
    ("llamacpp_upstream.prom", "llama.cpp", "llamacpp:tokens_predicted_total", 0),  # ggml-org b9041
    ("dynamo.prom", "dynamo", "dynamo_frontend_output_tokens_total", 300),
    # CONSTRUCTED (no published capture of a real TGI /metrics page was found): the _sum rule
    ("tgi_constructed.prom", "tgi", "tgi_request_generated_tokens_sum", 9000),
    ("trtllm_triton_token_histogram.prom", "tensorrt-llm",
     'nv_llm_output_token_len_sum{response_metric_type="total_output_tokens"}', 1234),
    # NVIDIA NIM for LLMs 1.0.0 (real page, Datadog's NIM check fixture): vLLM's families bare
    ("nim.prom", "nim", "generation_tokens_total", 174),
    # Ray Serve LLM on Ray's OpenTelemetry backend (Ray 2.60.0's own metrics page, captured here;
    # vLLM's counters driven as its Ray wrapper does): ray_vllm_*, two replicas summed
    ("ray_serve_vllm_otel.prom", "ray/vllm", "ray_vllm_generation_tokens_total", 292 + 188),
    # ... and before it, on OpenCensus (Ray 2.47.1's page, captured the same way): ray_vllm:*,
    # the ":" kept, a deprecated gauge ray_vllm:generation_tokens beside the counter
    ("ray_serve_vllm_opencensus.prom", "ray/vllm", "ray_vllm:generation_tokens_total", 480),
])
def test_auto_detects_each_server_and_uses_its_counter(name, server, series, tokens):
    total, used, _n, found = read_tokens(fixture(name), "auto")
    assert (found, used) == (server, series)
    assert total == pytest.approx(tokens)


def test_vllm_v1_histogram_named_total_and_created_gauges_are_not_tokens():
    text = fixture("vllm_v1.prom")
    assert "vllm:iteration_tokens_total_bucket" in text and "vllm:generation_tokens_created" in text
    total, _used, n, _s = read_tokens(text, "vllm:generation_tokens_total")
    assert (total, n) == (600, 1)


@pytest.mark.parametrize("name", ["trtllm_triton.prom", "trtllm_serve_dynamo.prom",
                                  "trtllm_serve_unprefixed.prom",
                                  "trtllm_serve_unprefixed_v1.1.prom"])
def test_tensorrt_llm_without_a_token_counter_says_so(name):
    with pytest.raises(ParseError) as e:
        read_tokens(fixture(name), "auto")
    assert str(e.value) == TRTLLM_NO_COUNTER
    assert "dynamo_frontend_output_tokens_total" in str(e.value)


def test_tensorrt_llm_under_dynamos_first_trtllm_colon_prefix_says_so():
    # Dynamo's first TensorRT-LLM release re-exported the MetricsCollector families as trtllm:...
    # (ai-dynamo/dynamo PR #3676: "add trtllm: prefix to TRT-LLM metrics"); no capture of that
    # release was found, so the real trtllm_ capture is renamed the way that release named it
    text = fixture("trtllm_serve_dynamo.prom").replace("trtllm_", "trtllm:")
    assert "trtllm:request_success_total{" in text and "trtllm_" not in text
    with pytest.raises(ParseError) as e:
        read_tokens(text, "auto")
    assert str(e.value) == TRTLLM_NO_COUNTER


def test_unprefixed_families_without_engine_type_are_not_taken_for_tensorrt_llm():
    text = "\n".join(line.replace('engine_type="undefined",', "")
                     for line in fixture("trtllm_serve_unprefixed.prom").splitlines())
    with pytest.raises(ParseError) as e:
        read_tokens(text, "auto")
    assert "no known generated-token counter found" in str(e.value)


def test_trtllm_serve_with_its_generation_token_counter_is_read_not_refused():
    # Newer trtllm-serve's MetricsCollector (NVIDIA/TensorRT-LLM, tensorrt_llm/metrics/
    # collector.py @050f80de) declares trtllm_generation_tokens_total and vLLM-like gauges. No
    # capture of it was found: CONSTRUCTED from the Dynamo capture (real trtllm_ families) plus
    # the three series under the names and labels that source declares
    text = fixture("trtllm_serve_dynamo.prom") + (
        '# TYPE trtllm_generation_tokens_total counter\n'
        'trtllm_generation_tokens_total{engine_type="trtllm",model_name="m"} 4321.0\n'
        'trtllm_num_requests_running{engine_type="trtllm",model_name="m"} 3.0\n'
        'trtllm_num_requests_waiting{engine_type="trtllm",model_name="m"} 1.0\n')
    exp = Exposition(text)
    assert read_tokens(exp, "auto") == (4321, "trtllm_generation_tokens_total", 1, "tensorrt-llm")
    figures = serving_figures(exp, "tensorrt-llm")
    assert (figures["running"], figures["waiting"]) == (3, 1)


def test_upstream_llamacpp_counter_at_zero_is_zero_not_absent():
    # a server that has served nothing yet still prints its counters, at 0 (unlike vLLM V0,
    # which declares families without samples): 0 tokens from one series, and its gauges
    exp = Exposition(fixture("llamacpp_upstream.prom"))
    assert read_tokens(exp, "auto") == (0, "llamacpp:tokens_predicted_total", 1, "llama.cpp")
    assert serving_figures(exp, "llama.cpp") == {"running": 0, "waiting": 0, "kv": None,
                                                 "preemptions": None, **NO_TIMING}


def test_label_selector_picks_one_series_of_a_mixed_family():
    # today's trap: the TensorRT-LLM v1 family mixes total generation tokens, context tokens
    # and empty slots; summing the name gives 25, the selector the 20 generation tokens
    text = fixture("trtllm_triton.prom")
    assert read_tokens(text, "nv_trt_llm_v1_metrics")[0] == 25
    sel = 'nv_trt_llm_v1_metrics{v1_specific_metric="total_generation_tokens"}'
    assert read_tokens(text, sel)[0] == 20
    with pytest.raises(ParseError) as e:
        read_tokens(text, 'nv_trt_llm_v1_metrics{v1_specific_metric="nope"}')
    assert "no series" in str(e.value) and "label values" in str(e.value)
    assert read_tokens(text, 'nv_trt_llm_v1_metrics{v1_specific_metric!="empty_generation_slots"}'
                       )[0] == 25


def test_declared_but_empty_family_is_absent_not_zero():
    with pytest.raises(ParseError) as e:
        read_tokens(fixture("vllm_v0_help_only.prom") + "# HELP vllm:generation_tokens_total x\n"
                    "# TYPE vllm:generation_tokens_total counter\n", "auto")
    assert "declared but has no samples" in str(e.value)


NO_TIMING = {"queue_seconds": None, "queue_requests": None, "inference_seconds": None,
             "inference_requests": None}


@pytest.mark.parametrize("name, server, want", [
    # vLLM's queue-time histogram (its sum and count: queue time vs inference time); this
    # capture has no request_inference_time_seconds family
    ("vllm_v1.prom", "vllm", {"running": 0.0, "waiting": 0.0, "kv": 0.0, "preemptions": 0.0,
                              "queue_seconds": 1.883227378129959e-05, "queue_requests": 2.0}),
    ("sglang.prom", "sglang", {"running": 162.0, "waiting": 2826.0, "kv": 0.28,
                               "preemptions": None}),
    ("trtllm_triton_token_histogram.prom", "tensorrt-llm", {"running": 9, "waiting": 4,
                                                            "kv": None, "preemptions": None}),
    ("vllm_v1_early.prom", "vllm", {"running": 0.0, "waiting": 0.0, "kv": 0.0,
                                    "preemptions": None}),    # old KV gauge name
])
def test_serving_figures_of_each_server(name, server, want):
    assert serving_figures(Exposition(fixture(name)), server) == {**NO_TIMING, **want}


@pytest.mark.parametrize("metric, words", [
    ('vllm:x{model_name="a"', "not a metric selector"),
    ('vllm:x{model_name=a}', "bad label matcher"),
])
def test_bad_selector_in_config_names_line_and_form(metric, words):
    with pytest.raises(ConfigError) as e:
        parse(f"[inference]\ntokens_metric = '{metric}'\n", "/etc/g.toml")
    assert str(e.value).startswith("/etc/g.toml:2:") and words in str(e.value)
    assert 'name{label="value"' in str(e.value)


def test_config_endpoint_errors():
    with pytest.raises(ConfigError) as e:
        parse('[inference]\nmetrics_url = "http://a:1/metrics"\n[[inference.endpoint]]\n'
              'url = "http://a:2/metrics"\n', "g.toml")
    assert "not both" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse('[[inference.endpoint]]\nurl = "a:2/metrics"\n', "g.toml")
    assert "g.toml:2:" in str(e.value) and "http://" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse('[inference]\ntimeout_seconds = 20\n', "g.toml")
    assert "out of range" in str(e.value)


# ------------------------------------------------------------------ one deadline per scrape
class _Trickle:
    """Answers the status line, then trickles header bytes (or redirects after a delay)."""

    def __init__(self, mode="headers", location="", delay=0.0, run_for=4.0):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/metrics"
        self.mode, self.location, self.delay, self.run_for = mode, location, delay, run_for
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            conn.recv(65536)
            if self.mode == "headers":
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                end = time.monotonic() + self.run_for
                while time.monotonic() < end and not self.stop.is_set():
                    conn.sendall(b"X")          # one byte of a header line, forever
                    self.stop.wait(0.05)
            else:
                self.stop.wait(self.delay)
                if self.mode == "redirect":
                    conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: " + self.location.encode()
                                 + b"\r\nContent-Length: 0\r\n\r\n")
                else:
                    body = b"vllm:generation_tokens_total 5\n"
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
                                 + body)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.stop.set()
        self.sock.close()


def test_headers_trickled_byte_by_byte_do_not_stall_the_loop():
    s = _Trickle("headers")
    try:
        t0 = time.monotonic()
        r = InferenceProbe(s.url, "auto", 0.3).read()
        elapsed = time.monotonic() - t0
    finally:
        s.close()
    assert elapsed < 1.0, elapsed
    assert r.tokens_total is None and "within 0.3 s" in r.error


def test_a_redirect_does_not_reset_the_deadline():
    # three hops that each answer within the timeout: one deadline for all of them
    target = _Trickle("body", delay=0.25)
    hops = [target]
    for _ in range(3):
        hops.append(_Trickle("redirect", location=hops[-1].url, delay=0.25))
    try:
        ok = InferenceProbe(hops[1].url, "auto", 2.0).read()     # a redirect is followed
        assert ok.tokens_total == 5, ok.error
        t0 = time.monotonic()
        r = InferenceProbe(hops[-1].url, "auto", 0.3).read()     # 4 x 0.25 s > 0.3 s
        elapsed = time.monotonic() - t0
    finally:
        for h in hops:
            h.close()
    assert r.tokens_total is None and "within 0.3 s" in r.error, r
    assert elapsed < 0.7, elapsed


def test_a_name_whose_lookup_hangs_costs_the_deadline_not_the_cycle(monkeypatch):
    # a dead DNS server: getaddrinfo of a name blocks for the resolver's own timeout (5 s and
    # more); the probe gives up at its deadline, and the next read waits on the same lookup
    import socket as socket_mod
    from gpucostd.probes import inference as inf
    release = threading.Event()
    calls = []
    real = socket_mod.getaddrinfo

    def slow(host, *a, **kw):
        if host == "inference.example":
            calls.append(host)
            release.wait(10)
            return real("127.0.0.1", *a, **kw)
        return real(host, *a, **kw)

    monkeypatch.setattr(inf.socket, "getaddrinfo", slow)
    try:
        for _ in range(2):
            t0 = time.monotonic()
            r = InferenceProbe("http://inference.example:1/metrics", "auto", 0.3).read()
            elapsed = time.monotonic() - t0
            assert r.tokens_total is None and "within 0.3 s" in r.error, r
            assert elapsed < 0.7, elapsed
        assert calls == ["inference.example"]        # one lookup in flight, not one per read
    finally:
        release.set()


@pytest.fixture
def tls_server(tmp_path, monkeypatch):
    """An HTTPS /metrics server with a throwaway certificate the probe is told to trust."""
    import shutil
    import ssl
    import subprocess
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed (needed to make a test certificate)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True,
                   capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    state = {"trickle": False}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if state["trickle"]:
                try:
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                    for _ in range(60):
                        self.wfile.write(b"X")
                        self.wfile.flush()
                        time.sleep(0.05)
                except OSError:
                    pass            # the probe gave up: that is the point
                return
            body = fixture("sglang.prom").encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}/metrics", state
    httpd.shutdown()
    httpd.server_close()


def test_https_endpoint_is_read_and_held_to_the_same_deadline(tls_server):
    url, state = tls_server
    r = InferenceProbe(url, "auto", 2.0).read()
    assert r.error is None and r.server == "sglang" and r.tokens_total == 7557572
    state["trickle"] = True
    t0 = time.monotonic()
    r = InferenceProbe(url, "auto", 0.3).read()
    assert time.monotonic() - t0 < 1.0
    assert r.tokens_total is None and "within 0.3 s" in r.error


# the NIM and Ray expositions carry no queue/inference time histograms gpucostd reads
NO_TIMING = {"queue_seconds": None, "queue_requests": None, "inference_seconds": None,
             "inference_requests": None}


def test_nim_and_ray_serve_llm_serving_figures_come_from_their_own_series():
    nim = fixture("nim.prom")
    assert serving_figures(nim, read_tokens(nim)[3]) == {
        "running": 1.0, "waiting": 0.0, "kv": pytest.approx(0.0002848191398461977),
        "preemptions": None, **NO_TIMING}
    # Ray Serve LLM, both spellings: the gauges carry the same prefix, one series per replica;
    # the KV usage is the replicas' mean ((0.625 + 0.25) / 2), running and waiting their sums
    for name, colon in (("ray_serve_vllm_otel.prom", False), ("ray_serve_vllm_opencensus.prom",
                                                              True)):
        ray = fixture(name)
        samples = [line for line in ray.splitlines() if not line.startswith("#")]
        assert any(line.startswith("ray_vllm:") for line in samples) == colon
        assert serving_figures(ray, read_tokens(ray)[3]) == {
            "running": 4.0, "waiting": 1.0, "kv": 0.4375, "preemptions": None, **NO_TIMING}


def test_ray_opencensus_deprecated_gauge_is_not_counted_twice():
    # Ray on OpenCensus prints each counter twice: ray_vllm:generation_tokens_total and a
    # DEPRECATED gauge ray_vllm:generation_tokens with the same values; only the counter counts
    exp = Exposition(fixture("ray_serve_vllm_opencensus.prom"))
    assert exp.select("ray_vllm:generation_tokens")[0] == 480
    assert read_tokens(exp, "auto") == (480, "ray_vllm:generation_tokens_total", 2, "ray/vllm")


def test_nim_page_is_not_taken_for_tensorrt_llm_or_vllm():
    # NIM's bare request_success_total / e2e histograms carry no engine_type label (the
    # trtllm-serve tell) and no vllm: prefix: it is NIM, by its bare generation counter
    exp = Exposition(fixture("nim.prom"))
    assert exp.has("request_success_total") and not exp.has("vllm:generation_tokens_total")
    assert read_tokens(exp, "auto") == (174, "generation_tokens_total", 1, "nim")


@pytest.mark.parametrize("text, server, series", [
    ("ray_sglang:generation_tokens_total 5\n", "ray/sglang", "ray_sglang:generation_tokens_total"),
    ("ray_sglang_generation_tokens_total 5\n", "ray/sglang", "ray_sglang_generation_tokens_total"),
    ("ray_llamacpp_tokens_predicted_total 5\n", "ray/llama.cpp",
     "ray_llamacpp_tokens_predicted_total"),
    ("myproxy_vllm:generation_tokens_total{a=\"1\"} 7\n", "myproxy/vllm",
     "myproxy_vllm:generation_tokens_total"),
])
def test_any_wrapper_prefix_on_a_known_counter_is_read(text, server, series):
    total, used, _n, found = read_tokens(text)
    assert (found, used) == (server, series) and total > 0


def test_a_prefix_that_is_not_a_wrapper_word_is_not_taken():
    with pytest.raises(ParseError, match="no known generated-token counter"):
        read_tokens("my:vllm:generation_tokens_total 5\nx_y_vllm_generation_tokens 3\n"
                    "x_y_vllm_generation_tokens_total 4\n")


@pytest.mark.parametrize("name, path, server, tokens, running", [
    ("nim.prom", "/v1/metrics", "nim", 174, 1),                  # NIM serves it under /v1
    ("ray_serve_vllm_otel.prom", "/metrics", "ray/vllm", 480, 4),  # Ray's metrics agent
    ("ray_serve_vllm_opencensus.prom", "/metrics", "ray/vllm", 480, 4),
])
def test_probe_reads_nim_and_ray_serve_llm_pages_in_auto_mode(name, path, server, tokens,
                                                              running):
    body = fixture(name).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path == path
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body) if ok else 0))
            self.end_headers()
            if ok:
                self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        r = InferenceProbe(f"http://127.0.0.1:{httpd.server_address[1]}{path}", "auto",
                           2.0).read()
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert r.error is None and (r.server, r.tokens_total) == (server, tokens)
    assert r.requests_running == running

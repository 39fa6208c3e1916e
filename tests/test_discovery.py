"""Discovery on a real node (issue 22, item 2): the processes of known inference servers and
their listening ports (psutil), each new port's /metrics asked once, the server recognised and
read with no inference config; new servers picked up at the refresh interval, vanished ones
dropped with an event; a port whose owner is not a known server never gets a request."""
from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import http_get, metric_value, wait_for
from gpucostd.part import Cycle
from gpucostd.parts.discovery import DiscoveryPart
from gpucostd.probes.discovery import (Process, candidates, known_server, psutil_processes)
from gpucostd.probes.inference import InferenceProbe

FIX = Path(__file__).resolve().parent / "fixtures" / "expositions"


@pytest.mark.parametrize("name, cmdline, server", [
    ("vllm", ["/usr/bin/python3", "/usr/local/bin/vllm", "serve", "Qwen/Qwen3-8B"], "vllm"),
    ("python3", ["python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "m"], "vllm"),
    ("python3", ["python3", "-m", "sglang.launch_server", "--model-path", "m"], "sglang"),
    ("trtllm-serve", ["/usr/local/bin/trtllm-serve", "m", "--port", "8000"], "tensorrt-llm"),
    ("tritonserver", ["tritonserver", "--model-repository=/models"], "triton"),
    ("text-generation", ["text-generation-launcher", "--model-id", "m"], "tgi"),
    ("text-generation", ["text-generation-router", "--port", "80"], "tgi"),
    ("llama-server", ["./llama-server", "-m", "m.gguf", "--metrics"], "llama.cpp"),
    ("python", ["python", "-c", "import xllamacpp; ..."], "llama.cpp"),
    ("python3", ["python3", "-m", "dynamo.frontend", "--http-port", "8000"], "dynamo"),
    ("python3", ["python3", "-m", "nim_llm.entrypoints"], "nim"),
    ("bash", ["/opt/nim/start_server.sh"], "nim"),
])
def test_known_servers_by_process_name_and_command_line(name, cmdline, server):
    assert known_server(name, cmdline) == server


@pytest.mark.parametrize("name, cmdline", [
    ("python3", ["python3", "-m", "http.server", "8000"]),
    ("bash", ["bash", "-c", "sleep 100"]),
    ("nginx", ["nginx: worker process"]),
    ("python3", ["python3", "/srv/vllm_dashboard.py"]),
])
def test_other_processes_are_not_servers(name, cmdline):
    assert known_server(name, cmdline) is None


def test_candidates_are_loopback_or_all_addresses_one_url_per_port():
    procs = [Process(10, "llama-server", ("llama-server",),
                     (("0.0.0.0", 8080), ("::", 8080), ("10.1.2.3", 9000), ("127.0.0.1", 8081))),
             Process(11, "python3", ("python3", "-m", "http.server"), (("0.0.0.0", 8000),)),
             Process(12, "tritonserver", ("tritonserver",), (("::1", 8002), ("::", 8001))),
             Process(13, "vllm", ("vllm", "serve"),
                     (("127.0.0.53", 8003), ("::ffff:127.0.0.1", 8004), ("fe80::1", 8005)))]
    got = [(c.server, c.pid, c.port, c.url) for c in candidates(procs)]
    assert got == [("llama.cpp", 10, 8080, "http://127.0.0.1:8080/metrics"),
                   ("llama.cpp", 10, 8081, "http://127.0.0.1:8081/metrics"),
                   ("triton", 12, 8001, "http://[::1]:8001/metrics"),
                   ("triton", 12, 8002, "http://[::1]:8002/metrics"),
                   ("vllm", 13, 8003, "http://127.0.0.53:8003/metrics"),
                   ("vllm", 13, 8004, "http://127.0.0.1:8004/metrics")]


def test_nim_is_asked_at_its_v1_metrics_path():
    # NIM for LLMs serves its exposition at /v1/metrics (tests/fixtures/expositions/nim.prom)
    procs = [Process(20, "python3", ("python3", "-m", "nim_llm.entrypoints"),
                     (("0.0.0.0", 8000),))]
    assert [c.url for c in candidates(procs)] == ["http://127.0.0.1:8000/v1/metrics"]


class Page:
    """A /metrics page on loopback that counts the requests it gets."""

    def __init__(self, text: str):
        self.text, self.requests = text, 0
        page = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                page.requests += 1
                data = page.text.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def pages():
    made = []

    def make(name):
        p = Page((FIX / name).read_text())
        made.append(p)
        return p
    yield make
    for p in made:
        p.close()


def _part(procs, probes, configured=(), interval=60.0):
    def make_probe(url):
        p = InferenceProbe(url, "auto", 2.0)
        p.discovered = True
        return p
    return DiscoveryPart(probes, lambda: list(configured), make_probe, interval,
                         lister=lambda: list(procs))


def _run(part, t):
    c = Cycle(1, 1000.0 + t, t)
    return part.run(c), c.events


def test_discovery_reads_known_servers_and_drops_vanished_ones(pages):
    llama, vllm, other = pages("llamacpp.prom"), pages("vllm_v1.prom"), pages("vllm_v1.prom")
    procs = [Process(100, "llama-server", ("llama-server", "-m", "x.gguf"),
                     (("127.0.0.1", llama.port),)),
             Process(101, "python3", ("python3", "-m", "http.server"),       # not a server
                     (("0.0.0.0", other.port),))]
    probes = []
    part = _part(procs, probes, interval=30.0)
    status, events = _run(part, 0.0)
    assert [(e.url, e.server, e.pid) for e in status.endpoints] == [
        (f"http://127.0.0.1:{llama.port}/metrics", "llama.cpp", 100)]
    assert [p.url for p in probes] == [status.endpoints[0].url]
    assert [(e.code, e.severity.name) for e in events] == [("inference_discovered", "OK")]
    assert "llama-server (pid 100)" in events[0].message
    assert probes[0].read().server == "llama.cpp"
    # a new server is picked up at the refresh interval, not every cycle
    procs.append(Process(102, "vllm", ("vllm", "serve", "m"), (("0.0.0.0", vllm.port),)))
    status, events = _run(part, 10.0)
    assert len(status.endpoints) == 1 and events == [] and vllm.requests == 0
    status, events = _run(part, 30.0)
    assert [e.server for e in status.endpoints] == ["llama.cpp", "vllm"] and vllm.requests == 1
    assert [e.code for e in events] == ["inference_discovered"]
    # asked once: a known server keeps its probe, not a second discovery request per scan
    _run(part, 60.0)
    assert (llama.requests, vllm.requests) == (2, 1)       # llama: discovery + the read above
    # gone: dropped with an event, its probe out of the list
    del procs[0]
    status, events = _run(part, 90.0)
    assert [e.server for e in status.endpoints] == ["vllm"]
    assert [(e.code, e.severity.name) for e in events] == [("inference_vanished", "WARN")]
    assert [p.url for p in probes] == [f"http://127.0.0.1:{vllm.port}/metrics"]
    # the port of a process that is no known server never got a request
    assert other.requests == 0


def test_configured_endpoints_stay_first_and_are_not_doubled(pages):
    llama = pages("llamacpp.prom")
    url = f"http://127.0.0.1:{llama.port}/metrics"
    configured = InferenceProbe(url, "auto", 1.0)
    probes = [configured]
    part = _part([Process(5, "llama-server", ("llama-server",), (("0.0.0.0", llama.port),))],
                 probes, configured=[url])
    status, events = _run(part, 0.0)
    assert status.endpoints == () and events == [] and probes == [configured]
    assert llama.requests == 0


def test_a_reload_that_rebuilds_the_list_gets_the_discovered_probes_back(pages):
    llama = pages("llamacpp.prom")
    probes = []
    part = _part([Process(5, "llama-server", ("llama-server",), (("0.0.0.0", llama.port),))],
                 probes)
    _run(part, 0.0)
    found = probes[0]
    probes[:] = [InferenceProbe("http://127.0.0.1:1/metrics")]       # what a reload does
    _run(part, 1.0)
    assert [p.url for p in probes] == ["http://127.0.0.1:1/metrics", found.url]
    assert probes[1] is found and llama.requests == 1


def test_a_port_without_a_token_counter_is_asked_once_per_look_and_said(pages):
    grpc_like = Page("garbage that is no exposition\n")
    try:
        probes = []
        part = _part([Process(7, "tritonserver", ("tritonserver",),
                              (("0.0.0.0", grpc_like.port),))], probes, interval=5.0)
        status, _ = _run(part, 0.0)
        _run(part, 1.0)
        _run(part, 2.0)
        assert status.endpoints == () and probes == [] and grpc_like.requests == 1
        # the next look asks again (a server still loading has its counter by then)
        _run(part, 5.0)
        assert grpc_like.requests == 2
        (url, how, why), = status.skipped
        assert "tritonserver (pid 7)" in how and "no known generated-token counter" in why
    finally:
        grpc_like.close()


def test_a_server_that_gets_its_counter_later_is_taken_at_the_next_look(pages):
    page = Page("# HELP vllm:generation_tokens_total Number of generation tokens processed.\n"
                "# TYPE vllm:generation_tokens_total counter\n")     # V0 before a request
    try:
        probes = []
        part = _part([Process(7, "vllm", ("vllm", "serve", "m"), (("0.0.0.0", page.port),))],
                     probes, interval=5.0)
        status, _ = _run(part, 0.0)
        assert status.endpoints == () and "declared but has no samples" in status.skipped[0][2]
        page.text = (FIX / "vllm_v1.prom").read_text()
        status, events = _run(part, 5.0)
        assert [e.server for e in status.endpoints] == ["vllm"] and status.skipped == ()
        assert [e.code for e in events] == ["inference_discovered"]
    finally:
        page.close()


def test_a_restarted_server_on_the_same_port_keeps_its_endpoint(pages):
    llama = pages("llamacpp.prom")
    procs = [Process(5, "llama-server", ("llama-server",), (("0.0.0.0", llama.port),))]
    probes = []
    part = _part(procs, probes, interval=5.0)
    _run(part, 0.0)
    procs[0] = Process(6, "llama-server", ("llama-server",), (("0.0.0.0", llama.port),))
    status, events = _run(part, 5.0)
    assert [(e.pid, e.server) for e in status.endpoints] == [(6, "llama.cpp")]
    assert events == [] and len(probes) == 1 and llama.requests == 1


def test_a_failing_process_list_keeps_what_was_found(pages):
    llama = pages("llamacpp.prom")
    state = {"fail": False}

    def lister():
        if state["fail"]:
            raise PermissionError("/proc is not readable")
        return [Process(5, "llama-server", ("llama-server",), (("0.0.0.0", llama.port),))]
    probes = []
    part = DiscoveryPart(probes, lambda: [], lambda u: _probe(u), 5.0, lister=lister)
    _run(part, 0.0)
    state["fail"] = True
    status, events = _run(part, 5.0)
    assert len(status.endpoints) == 1 and events == []
    assert "cannot list processes" in status.error and "/proc is not readable" in status.error


def test_a_server_whose_sockets_cannot_be_read_is_named_with_the_way_out():
    procs = [Process(9, "vllm", ("vllm", "serve", "m"), (), "its sockets cannot be read (...)"),
             Process(10, "bash", ("bash",), (), "its sockets cannot be read (...)")]
    probes = []
    part = DiscoveryPart(probes, lambda: [], _probe, 5.0, lister=lambda: procs)
    status, events = _run(part, 0.0)
    assert status.endpoints == () and events == [] and probes == []
    assert status.notes == ("vllm process vllm (pid 9): its sockets cannot be read (...)",)


def _probe(url):
    p = InferenceProbe(url, "auto", 2.0)
    p.discovered = True
    return p


# ------------------------------------------------------------------ a real process, psutil
SERVE = r"""
import http.server, sys
text = open(sys.argv[2]).read().encode()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", str(len(text)))
        self.end_headers(); self.wfile.write(text)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _free_port_in_range():
    """A port the kernel hands out (a fixed range would be shared by tests that run at
    once on xdist's workers)."""
    from conftest import free_port
    return free_port()


@pytest.fixture
def fake_llama_server(tmp_path):
    """A process the kernel calls llama-server (python run through a link of that name)
    serving a real llama.cpp exposition on a port of this branch's range."""
    exe = tmp_path / "llama-server"
    os.symlink(sys.executable, exe)
    script = tmp_path / "serve.py"
    script.write_text(SERVE)
    port = _free_port_in_range()
    proc = subprocess.Popen([str(exe), str(script), str(port), str(FIX / "llamacpp.prom")])
    try:
        wait_for(lambda: proc.poll() is None and
                 http_get(f"http://127.0.0.1:{port}/metrics", 1)[0] == 200, 10,
                 what="the fake llama-server")
        assert proc.poll() is None, "the fake llama-server exited (its port was taken?)"
        yield proc, port
    finally:
        proc.terminate()
        proc.wait(10)


def test_psutil_finds_a_real_server_process_and_its_port(fake_llama_server):
    proc, port = fake_llama_server
    mine = [p for p in psutil_processes() if p.pid == proc.pid]
    assert mine and mine[0].name == "llama-server"
    assert ("127.0.0.1", port) in mine[0].listening
    assert (f"http://127.0.0.1:{port}/metrics", "llama.cpp") in [
        (c.url, c.server) for c in candidates(mine)]


@pytest.mark.parametrize("node", ["real", "simulated"])
def test_the_daemon_reads_a_discovered_server_and_drops_it_when_it_stops(
        daemon_factory, fake_llama_server, node):
    # a real node (no --simulate; NVML may be absent) discovers by default, with no inference
    # config at all; a simulated one when asked
    proc, port = fake_llama_server
    url = f"http://127.0.0.1:{port}/metrics"
    d = daemon_factory(interval=0.5, scenario=None if node == "real" else "builtin:h100x8",
                       extra_config=(
        '\n[inference]\ndiscover_interval_seconds = 5\n' + (
            'discover = "on"\n' if node == "simulated" else ''))).start()

    def discovered():
        _rc, data = d.status_json()
        disc = data.get("inference_discovery") or {}
        return [e for e in disc.get("endpoints") or [] if e["url"] == url]
    (ep,) = wait_for(discovered, 20, what="the llama-server discovered")
    assert ep["server"] == "llama.cpp" and ep["pid"] == proc.pid
    assert f"llama-server (pid {proc.pid})" in ep["how"]
    text = d.metrics()
    assert metric_value(text, "gpucostd_inference_discovered", url=url, server="llama.cpp") == 1
    assert metric_value(text, "gpucostd_inference_endpoint_info", server="llama.cpp",
                        url=url) == 1
    out = d.cli("status").stdout
    assert f"llama.cpp at {url}" in out
    proc.terminate()
    proc.wait(10)
    wait_for(lambda: not discovered(), 20, what="the stopped server dropped")
    _rc, data = d.status_json()
    assert any(e["code"] == "inference_vanished" and url in e["message"]
               for e in data["events"]), data["events"]


@pytest.mark.parametrize("mode, simulated, one_shot, virtual, runs", [
    ("auto", False, False, False, True),       # a real node: on by default
    ("auto", True, False, False, False),       # --simulate: only when asked
    ("on", True, False, False, True),
    ("off", False, False, False, False),
    ("auto", False, True, False, False),       # one-shot commands
    ("on", False, False, True, False),         # replay's virtual clock
])
def test_discovery_runs_on_a_real_node_unless_told_otherwise(mode, simulated, one_shot,
                                                             virtual, runs):
    from types import SimpleNamespace

    from gpucostd.config import parse
    from gpucostd.parts.discovery import discovery_part
    cfg = parse(f'[inference]\ndiscover = "{mode}"\n')
    probes = []
    part = discovery_part(cfg.inference, cfg.daemon.interval_seconds, probes,
                          SimpleNamespace(virtual=virtual, monotonic=lambda: 0.0), simulated,
                          one_shot)
    assert (part is not None) == runs
    if runs:
        assert part.probes is probes and part.interval == 60.0
        assert part.probe_timeout == min(cfg.inference.timeout_seconds,
                                         0.5 * cfg.daemon.interval_seconds)
        assert part.make_probe("http://127.0.0.1:1/metrics").discovered is True


def test_many_new_ports_are_asked_a_few_per_cycle(pages):
    from gpucostd.parts.discovery import MAX_ASKS_PER_SCAN
    servers = [pages("llamacpp.prom") for _ in range(MAX_ASKS_PER_SCAN + 2)]
    procs = [Process(50 + i, "llama-server", ("llama-server",), (("127.0.0.1", p.port),))
             for i, p in enumerate(servers)]
    probes = []
    part = _part(procs, probes, interval=60.0)
    status, _ = _run(part, 0.0)
    assert len(status.endpoints) == MAX_ASKS_PER_SCAN
    status, events = _run(part, 1.0)          # the rest at once, not after the interval
    assert len(status.endpoints) == len(servers) and len(events) == 2
    assert all(p.requests == 1 for p in servers)


def test_status_text_says_what_was_discovered_and_how():
    from gpucostd.views.statustext import discovery_lines
    assert discovery_lines(None) == [] and discovery_lines({"enabled": False}) == []
    assert discovery_lines("garbage") == []
    lines = discovery_lines({
        "enabled": True, "error": None,
        "endpoints": [{"server": "vllm", "url": "http://127.0.0.1:8000/metrics",
                       "how": "process vllm (pid 7) listening on 0.0.0.0:8000"}],
        "skipped": [{"url": "http://127.0.0.1:8001/metrics", "how": "process tritonserver "
                     "(pid 8) listening on 0.0.0.0:8001", "why": "not Prometheus text"}],
        "notes": ["sglang process python3 (pid 9): its sockets cannot be read"]})
    text = "\n".join(lines)
    assert lines[0] == "Discovered inference servers: 1"
    assert "vllm at http://127.0.0.1:8000/metrics: process vllm (pid 7)" in text
    assert "not read: http://127.0.0.1:8001/metrics" in text and "not Prometheus text" in text
    assert "not seen: sglang process python3 (pid 9)" in text

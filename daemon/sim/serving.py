"""The simulated inference servers of a scenario's [serving] section: vLLM-compatible /metrics.

``SimulatedServing(node)`` renders, for each simulated endpoint, the text a vLLM V1 engine
serves on /metrics (the same families, HELP texts, labels and ``_created`` gauges as a real
capture, tests/fixtures/expositions/vllm_v1.prom)::

    vllm:generation_tokens_total    the endpoint's exact token integral (SimulatedNode)
    vllm:prompt_tokens_total        generated x prompt_tokens_per_generated
    vllm:num_requests_running, vllm:num_requests_waiting, vllm:kv_cache_usage_perc  gauges
    vllm:num_preemptions_total      preemptions_per_second x t
    vllm:request_queue_time_seconds histogram: one request per tokens_per_request tokens, each
                                    waiting queue_time_seconds
    vllm:request_inference_time_seconds  the same requests, each running inference_time_seconds

``start()`` serves each endpoint over HTTP on 127.0.0.1 with a free port (the daemon's
``--simulate``); ``fetch(k)`` returns the same text in-process (replay on a virtual clock,
where no time passes while a socket would answer).
"""
from __future__ import annotations

import logging
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, List, Optional, Tuple

log = logging.getLogger("gpucostd.sim.serving")

QUEUE_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def _num(x: float) -> str:
    return repr(float(x))


class SimulatedServing:
    """The [serving] endpoints of a SimulatedNode (gpucostd.sim.nvml)."""

    def __init__(self, node: Any):
        self.node = node
        self.model = node.scenario.serving
        self._servers: List[ThreadingHTTPServer] = []
        self._threads: List[threading.Thread] = []
        self.urls: List[str] = []
        self._created = node.clock.time()

    @property
    def endpoints(self) -> Tuple[Any, ...]:
        return self.model.endpoints if self.model is not None else ()

    def exposition(self, k: int) -> str:
        """The /metrics text of endpoint k now."""
        ep = self.endpoints[k]
        t = self.node.now()
        tokens = math.floor(self.node.endpoint_tokens(k, t))
        labels = f'engine="0",model_name="{ep.model_name}"'
        created = _num(self._created)
        requests = math.floor(tokens / self.model.tokens_per_request)
        out: List[str] = []

        def fam(name: str, kind: str, help_: str, value: float) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.append(f"{name}{{{labels}}} {_num(value)}")

        def counter(base: str, help_: str, value: float) -> None:
            fam(base + "_total", "counter", help_, value)
            fam(base + "_created", "gauge", help_, float(created))

        fam("vllm:num_requests_running", "gauge", "Number of requests in model execution "
            "batches.", ep.requests_running)
        fam("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
            ep.requests_waiting)
        fam("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
            ep.kv_cache_usage)
        counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                math.floor(ep.preemptions_per_second * max(0.0, t)))
        counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                math.floor(tokens * self.model.prompt_tokens_per_generated))
        counter("vllm:generation_tokens", "Number of generation tokens processed.", tokens)
        for name, help_, each in (
                ("vllm:request_queue_time_seconds",
                 "Histogram of time spent in WAITING phase for request.", ep.queue_time_seconds),
                ("vllm:request_inference_time_seconds",
                 "Histogram of time spent in RUNNING phase for request.",
                 ep.inference_time_seconds)):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} histogram")
            for le in QUEUE_BUCKETS:
                n = requests if each <= le else 0
                out.append(f'{name}_bucket{{engine="0",le="{le}",model_name="{ep.model_name}"}} '
                           f"{_num(n)}")
            out.append(f'{name}_bucket{{engine="0",le="+Inf",model_name="{ep.model_name}"}} '
                       f"{_num(requests)}")
            out.append(f"{name}_count{{{labels}}} {_num(requests)}")
            out.append(f"{name}_sum{{{labels}}} {_num(requests * each)}")
            fam(name.replace("_seconds", "_seconds_created"), "gauge", help_, float(created))
        return "\n".join(out) + "\n"

    def fetch(self, k: int) -> str:
        return self.exposition(k)

    # ------------------------------------------------------------------ HTTP
    def start(self, host: str = "127.0.0.1") -> List[str]:
        """Serve every endpoint on `host` with a free port; returns their /metrics URLs."""
        for k in range(len(self.endpoints)):
            server = ThreadingHTTPServer((host, 0), _handler(self, k))
            server.daemon_threads = True
            # a scrape the probe gave up on (its deadline passed) leaves a broken pipe here:
            # a debug line, not socketserver's traceback on the daemon's stderr
            server.handle_error = lambda request, address: log.debug(  # type: ignore
                "simulated serving: a client went away (%s)", address)
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                      name=f"gpucostd-sim-serving-{k}", daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
            self.urls.append(f"http://{host}:{server.server_address[1]}/metrics")
        log.info("simulated inference servers: %s", ", ".join(self.urls))
        return list(self.urls)

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()
        self._threads.clear()


def _handler(serving: SimulatedServing, k: int):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404, "only /metrics here")
                return
            try:
                body = serving.exposition(k).encode()
            except Exception as e:  # noqa: BLE001 - answer 500, never kill the server
                log.exception("simulated /metrics failed")
                self.send_error(500, str(e)[:100])
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


def endpoint_specs(serving: Optional[SimulatedServing], urls: List[str]) -> List[dict]:
    """[inference] endpoint entries for the simulated servers: url, gpus, parallel (or url and
    instances, for a server on MIG instances)."""
    if serving is None:
        return []
    return [{"url": url, "instances": list(ep.instances)} if ep.instances else
            {"url": url, "gpus": list(ep.gpus), "parallel": ep.parallel}
            for url, ep in zip(urls, serving.endpoints)]

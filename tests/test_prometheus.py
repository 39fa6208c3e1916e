"""Every PromQL expression of the rules and the Grafana dashboard, run by a real Prometheus
(Debian's `prometheus`, on loopback with a temporary data dir and a 1 s scrape interval) that
scrapes simulated daemons: one plain (tests/scenarios/fleet.toml, with a price and a fake
inference server, its target labelled served_model as the fleet-relative floor's model peers
expect), one over TLS with basic auth, and one with a wrong password (up == 0)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import REPO, DaemonProcess, free_port, wait_for

PROMETHEUS = shutil.which("prometheus")
RULES = REPO / "packaging" / "prometheus" / "gpucostd-rules.yml"
DASHBOARD = REPO / "packaging" / "grafana" / "gpucostd-dashboard.json"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (apt install "
                                                  "prometheus; dev-env.sh --test does)"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl for the TLS "
                                                               "target's certificate"),
]

# Expressions that return nothing on a healthy simulated node, and why. Anything else must
# return data.
EXPECTED_EMPTY = {
    'absent(up{job="gpucostd"})': "the gpucostd target exists",
    "gpucostd_gpu_missing": "no GPU is missing on the simulated node (the family has a series "
                            "only for a missing GPU)",
}


class _FakeVllm(BaseHTTPRequestHandler):
    """A vLLM /metrics endpoint whose token counter grows at 8,000 tokens/s."""
    start = time.monotonic()

    def do_GET(self):  # noqa: N802
        n = int((time.monotonic() - self.start) * 8000)
        body = ("# TYPE vllm:generation_tokens_total counter\n"
                f'vllm:generation_tokens_total{{model_name="m"}} {n}\n').encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


class Prom:
    def __init__(self, port):
        self.url = f"http://127.0.0.1:{port}"

    def api(self, path, **params):
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())

    def query(self, expr):
        data = urllib.parse.urlencode({"query": expr}).encode()
        req = urllib.request.Request(self.url + "/api/v1/query", data=data)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read())


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prom")
    # the TLS target's certificate and password
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "tls.key", "-out",
             "tls.crt", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext",
             "subjectAltName=IP:127.0.0.1", cwd=tmp)
    from test_webconfig import bcrypt_hash
    (tmp / "web.yml").write_text(f"tls_server_config:\n  cert_file: tls.crt\n  key_file: tls.key\n"
                                 f"basic_auth_users:\n  prometheus: '{bcrypt_hash('pw')}'\n")
    (tmp / "pass").write_text("pw")
    (tmp / "wrong").write_text("not-the-password")

    vllm = ThreadingHTTPServer(("127.0.0.1", 0), _FakeVllm)
    threading.Thread(target=vllm.serve_forever, daemon=True).start()
    (tmp / "plain").mkdir()
    # a Slurm whose sinfo reports this node idle: the drain part runs (a dry run), so the
    # drain alerts' series exist on the fleet node
    sinfo = tmp / "sinfo"
    sinfo.write_text("#!/bin/sh\necho 'fleetnode|idle|Unknown|none'\n")
    sinfo.chmod(0o755)
    plain = DaemonProcess(tmp / "plain",
                          scenario=str(REPO / "tests" / "scenarios" / "fleet.toml"),
                          kernel_log="auto", interval=0.5,
                          extra_config="[tuning.gpu]\npower_limit_watts = 650\n[cost]\n"
                                       "gpu_hour_usd = 2.0\n[efficiency]\n"
                                       "min_tokens_per_dollar = 1.0\n[inference]\nmetrics_url = "
                                       f'"http://127.0.0.1:{vllm.server_address[1]}/metrics"\n'
                                       '[drain]\nbackend = "slurm"\ndry_run = true\n'
                                       'node_name = "fleetnode"\n[drain.slurm]\n'
                                       f'sinfo = "{sinfo}"\nscontrol = "/bin/false"\n')
    (tmp / "tls").mkdir()
    tls = DaemonProcess(tmp / "tls", interval=0.5,
                        extra_config=f'web_config_file = "{tmp / "web.yml"}"\n')
    port = free_port()
    (tmp / "prometheus.yml").write_text(f"""
global: {{scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}}
rule_files: ["{RULES}"]
scrape_configs:
  - job_name: gpucostd
    static_configs: [{{targets: ["127.0.0.1:{plain.port}"], labels: {{served_model: m}}}}]
  - job_name: gpucostd-tls
    scheme: https
    tls_config: {{ca_file: "{tmp / 'tls.crt'}"}}
    basic_auth: {{username: prometheus, password_file: "{tmp / 'pass'}"}}
    static_configs: [{{targets: ["127.0.0.1:{tls.port}"]}}]
  - job_name: gpucostd-tls-wrong-password
    scheme: https
    tls_config: {{ca_file: "{tmp / 'tls.crt'}"}}
    basic_auth: {{username: prometheus, password_file: "{tmp / 'wrong'}"}}
    static_configs: [{{targets: ["127.0.0.1:{tls.port}"]}}]
""")
    log = open(tmp / "prometheus.log", "wb")
    proc = None
    try:
        plain.start()
        tls.start(wait=False)
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdout=log, stderr=subprocess.STDOUT)
        prom = Prom(port)

        def ready():
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()
            return prom.query('up{job="gpucostd"} == 1')["data"]["result"]
        wait_for(ready, 60, interval=0.5, what="Prometheus scraping the daemon")
        yield prom, plain, tls, tmp
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(20)
        log.close()
        for d in (plain, tls):
            try:
                d.stop()
            except AssertionError:
                pass
        vllm.shutdown()


# ---------------------------------------------------------------- collecting the expressions
def grafana_exprs():
    """(where, expression) for every query of the dashboard, Grafana variables substituted."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append((f"panel {p['title']!r} {t['refId']}", t["expr"]))
    for a in dash["annotations"]["list"]:
        out.append((f"annotation {a['name']!r}", a["expr"]))
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", v["query"]["query"])
            assert m, v
            out.append((f"variable {v['name']}", m.group(1)))
    return out


def substitute(expr, instance):
    for k, v in (("$__rate_interval", "1m"), ("$__interval", "15s"), ("$__range", "5m"),
                 ("$job", "gpucostd"), ("$instance", instance), ("$gpu", ".*")):
        expr = expr.replace(k, v)
    assert "$" not in expr, expr
    return expr


def split_comparison(expr):
    """(left, right) of the last top-level comparison, or None."""
    depth, quote, last = 0, None, None
    i = 0
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            for op in ("==", "!=", ">=", "<=", ">", "<"):
                if expr.startswith(op, i) and not expr.startswith("=~", i):
                    last = (i, op)
                    i += len(op) - 1
                    break
        i += 1
    if last is None:
        return None
    i, op = last
    right = expr[i + len(op):].strip()
    right = right[len("bool"):].strip() if right.startswith("bool") else right
    return expr[:i].strip(), right


def _check(prom, where, expr, failures, timeout):
    def has_data():
        r = prom.query(expr)
        if r.get("status") != "success":
            raise AssertionError(f"does not parse: {r.get('error')}")
        return r["data"]["result"]
    try:
        if expr in EXPECTED_EMPTY:
            r = prom.query(expr)
            assert r["status"] == "success", r
            assert r["data"]["result"] == [], (EXPECTED_EMPTY[expr], r["data"]["result"])
            return
        wait_for(has_data, timeout, interval=0.5, what="data")
    except AssertionError as e:
        failures.append(f"{where}: {expr}\n    {e}")


# ---------------------------------------------------------------- the tests
def test_every_rule_expression_parses_and_returns_data(fleet):
    prom, plain, _, _ = fleet
    groups = prom.api("/api/v1/rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == RULES.read_text().count("- alert:") + RULES.read_text().count("- record:")
    assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]
    failures = []
    for r in rules:
        if r["type"] == "recording":
            _check(prom, f"record {r['name']}", r["name"], failures, 60)
            continue
        # an alert is quiet on a healthy node: its sides must each have data
        parsed = prom.query(r["query"])
        if parsed.get("status") != "success":
            failures.append(f"alert {r['name']}: {r['query']}\n    does not parse: {parsed}")
            continue
        parts = split_comparison(r["query"])
        sides = [r["query"]] if parts is None else \
            [s for s in parts if not re.match(r"-?[0-9.]", s)]   # not a threshold
        for s in sides:
            _check(prom, f"alert {r['name']}", s, failures, 60)
    assert not failures, "\n".join(failures)


def test_every_dashboard_expression_parses_and_returns_data(fleet):
    prom, plain, _, _ = fleet
    instance = f"127.0.0.1:{plain.port}"
    failures = []
    exprs = grafana_exprs()
    assert len(exprs) > 20
    for where, expr in exprs:
        _check(prom, where, substitute(expr, instance), failures, 90)
    assert not failures, "\n".join(failures)


def test_some_alerts_fire_on_the_fleet_node(fleet):
    prom, plain, _, _ = fleet

    def firing():
        res = prom.query('ALERTS{alertstate="firing"}')["data"]["result"]
        return {a["metric"]["alertname"] for a in res}
    names = wait_for(lambda: "GpucostdGpuFellOffTheBus" in firing() and firing(), 60,
                     interval=0.5, what="the Xid 79 alert firing")
    assert "GpucostdAbsent" not in names and "GpucostdDown" not in names


def test_prometheus_scrapes_over_tls_with_basic_auth_and_a_wrong_password_is_refused(fleet):
    prom, _, tls, _ = fleet

    def up(job):
        res = prom.query(f'up{{job="{job}"}}')["data"]["result"]
        return res[0]["value"][1] if res else None
    wait_for(lambda: up("gpucostd-tls") == "1", 30, interval=0.5, what="TLS target up")
    res = prom.query('gpucostd_gpu_info{job="gpucostd-tls"}')["data"]["result"]
    assert len(res) == 8
    wait_for(lambda: up("gpucostd-tls-wrong-password") == "0", 30, interval=0.5,
             what="wrong-password target down")
    targets = prom.api("/api/v1/targets")["data"]["activeTargets"]
    wrong = [t for t in targets if t["labels"]["job"] == "gpucostd-tls-wrong-password"][0]
    assert "401" in wrong["lastError"], wrong["lastError"]

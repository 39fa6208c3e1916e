"""The Kubernetes drain back end against recorded API objects (tests/fixtures/kubernetes/
SOURCES.md): an HTTPS server on loopback with a certificate made here answers as the API server
does (a real Node from a v1.30 cluster, the apiserver's own Status bodies) and applies the JSON
Patches it is sent, and each test asserts the exact requests the back end made. No kube-apiserver
can be installed from the package registries here (SOURCES.md says what was searched)."""
from __future__ import annotations

import copy
import http.server
import json
import shutil
import socket
import ssl
import subprocess
import threading
import urllib.parse
from types import SimpleNamespace

import pytest

from conftest import REPO, free_port
from gpucostd.drain.backend import Condition, DrainError, FleetDrains
from gpucostd.drain.kubernetes import EvictionRefused, KubernetesBackend

FIX = REPO / "tests" / "fixtures" / "kubernetes"
NODE = json.loads((FIX / "node-minikube.json").read_text())
STATUS = json.loads((FIX / "statuses.json").read_text())
PODS = json.loads((FIX / "pods-on-minikube.json").read_text())
TOKEN = "eyJhbGciOiJSUzI1NiIsImtpZCI6InRlc3QifQ.gpucostd-test"
T0 = 1_765_000_000.0                  # 2025-12-06T05:46:40Z
REASON = "gpucostd: GPU 0 Xid 79 (fallen off the bus): reset the GPU or reboot the node"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="needs the openssl CLI to make the test CA")


class Clock:
    def __init__(self, t=T0):
        self.t = t

    def time(self):
        return self.t


def _unescape(token):
    return token.replace("~1", "/").replace("~0", "~")


def json_patch(doc, ops):
    """RFC 6902 (the operations the back end uses); raises ValueError as the apiserver's
    jsonpatch does when an operation fails."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [_unescape(t) for t in op["path"].split("/")[1:]]
        target = doc
        for p in parents:
            target = target[int(p)] if isinstance(target, list) else target[p]
        kind = op["op"]
        if kind == "test":
            here = target[int(last)] if isinstance(target, list) else target.get(last)
            if here != op["value"]:
                raise ValueError(f"testing value {op['path']} failed: test failed")
        elif kind in ("add", "replace"):
            if isinstance(target, list):
                if last == "-":
                    target.append(op["value"])
                elif kind == "add":
                    target.insert(int(last), op["value"])
                else:
                    target[int(last)] = op["value"]
            else:
                if kind == "replace" and last not in target:
                    raise ValueError("replace of a missing member")
                target[last] = op["value"]
        elif kind == "remove":
            if isinstance(target, list):
                del target[int(last)]
            else:
                del target[last]
        else:
            raise ValueError(f"unknown op {kind}")
    return doc


class FakeApiServer:
    """What the API server does with the requests this back end sends."""

    def __init__(self):
        self.nodes = {"minikube": copy.deepcopy(NODE)}
        self.pods = copy.deepcopy(PODS)
        self.requests = []
        self.forced = []                 # (method, path prefix, status, body): answered once
        self.pdb = set()                 # pod names a PodDisruptionBudget protects
        self.after_get = None            # called once after the next GET of a node
        self.lock = threading.Lock()

    # the state an operator changes with kubectl, behind gpucostd's back
    def operator(self, name, change):
        with self.lock:
            node = self.nodes[name]
            change(node)
            meta = node["metadata"]
            meta["resourceVersion"] = str(int(meta["resourceVersion"]) + 1)

    def add_node(self, name, annotations=None, labels=None, unschedulable=False):
        node = copy.deepcopy(NODE)
        node["metadata"]["name"] = name
        node["metadata"]["labels"]["kubernetes.io/hostname"] = name
        node["metadata"]["annotations"].update(annotations or {})
        node["metadata"]["labels"].update(labels or {})
        if unschedulable:
            node["spec"]["unschedulable"] = True
        self.nodes[name] = node

    def handle(self, method, path, headers, body):
        self.requests.append(SimpleNamespace(method=method, path=path, headers=headers,
                                             body=body))
        for i, (m, prefix, status, answer) in enumerate(self.forced):
            if m == method and path.startswith(prefix):
                del self.forced[i]
                return status, answer
        if headers.get("Authorization") != "Bearer " + TOKEN:
            return 401, STATUS["unauthorized"]
        url = urllib.parse.urlsplit(path)
        query = dict(urllib.parse.parse_qsl(url.query))
        parts = url.path.strip("/").split("/")
        with self.lock:
            if parts[:3] == ["api", "v1", "nodes"] and len(parts) == 3:
                return 200, self._list_nodes(query)
            if parts[:3] == ["api", "v1", "nodes"]:
                name = parts[3]
                node = self.nodes.get(name)
                if node is None:
                    return 404, dict(STATUS["not_found_node"],
                                     message=f'nodes "{name}" not found',
                                     details={"name": name, "kind": "nodes"})
                if method == "GET":
                    answer = copy.deepcopy(node)
                    hook, self.after_get = self.after_get, None
                    if hook:
                        hook(node)
                        node["metadata"]["resourceVersion"] = str(
                            int(node["metadata"]["resourceVersion"]) + 1)
                    return 200, answer
                if method == "PATCH" and len(parts) == 4:
                    assert headers["Content-Type"] == "application/json-patch+json"
                    try:
                        new = json_patch(node, body)
                    except (ValueError, KeyError, IndexError):
                        return 422, STATUS["invalid_json_patch"]
                    new["metadata"]["resourceVersion"] = str(
                        int(node["metadata"]["resourceVersion"]) + 1)
                    self.nodes[name] = new
                    return 200, new
                if method == "PATCH" and parts[4:] == ["status"]:
                    assert headers["Content-Type"] == "application/strategic-merge-patch+json"
                    conds = {c["type"]: c for c in node["status"]["conditions"]}
                    for c in body["status"]["conditions"]:
                        conds[c["type"]] = dict(conds.get(c["type"], {}), **c)
                    node["status"]["conditions"] = list(conds.values())
                    return 200, node
            if url.path == "/api/v1/pods":
                on = query["fieldSelector"].split("=", 1)[1]
                items = [p for p in self.pods["items"] if p["spec"]["nodeName"] == on]
                return 200, dict(self.pods, items=items)
            if method == "POST" and parts[-1] == "eviction":
                if parts[5] in self.pdb:
                    return 429, STATUS["eviction_pdb"]
                return 201, STATUS["eviction_created"]
        return 404, {"kind": "Status", "code": 404, "message": "the server could not find "
                     "the requested resource", "reason": "NotFound"}

    def _list_nodes(self, query):
        items = sorted(self.nodes.values(), key=lambda n: n["metadata"]["name"])
        selector = query.get("labelSelector")
        if selector:
            key, value = selector.split("=", 1)
            items = [n for n in items if n["metadata"].get("labels", {}).get(key) == value]
        meta = {"resourceVersion": "1328200"}
        start = int(query.get("continue", 0) or 0)
        limit = int(query.get("limit", 0) or 0)
        if limit and start + limit < len(items):
            meta["continue"] = str(start + limit)
            if not selector:         # the API counts what remains only without selectors
                meta["remainingItemCount"] = len(items) - start - limit
        items = items[start:start + limit] if limit else items[start:]
        return {"kind": "NodeList", "apiVersion": "v1", "metadata": meta,
                "items": copy.deepcopy(items)}

    def of(self, method, prefix=""):
        return [r for r in self.requests if r.method == method and r.path.startswith(prefix)]


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    d = tmp_path_factory.mktemp("k8s-ca")
    pem, key = d / "apiserver.crt", d / "apiserver.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(pem), "-days", "1", "-subj", "/CN=kube-apiserver",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return pem, key


@pytest.fixture
def api(cert):
    fake = FakeApiServer()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            status, answer = fake.handle(self.command, self.path, dict(self.headers), body)
            out = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_PATCH = do_POST = _serve

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    fake.url = f"https://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def settings(api, cert, tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    return SimpleNamespace(api_url=api.url, token_file=str(token), ca_file=str(cert[0]),
                           taint_key="gpucostd.io/unhealthy", taint_effect="NoSchedule",
                           opt_out_label="gpucostd.io/drain-opt-out", evict=False,
                           eviction_grace_seconds=30)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def backend(settings, clock):
    return KubernetesBackend(settings=settings, node_name="minikube", clock=clock)


DRAIN_PATCH = [
    {"op": "test", "path": "/metadata/resourceVersion", "value": "1327897"},
    {"op": "add", "path": "/spec/unschedulable", "value": True},
    {"op": "add", "path": "/spec/taints", "value": [
        {"key": "gpucostd.io/unhealthy", "value": "gpucostd", "effect": "NoSchedule"}]},
    {"op": "add", "path": "/metadata/annotations/gpucostd.io~1cordoned-by", "value": "gpucostd"},
    {"op": "add", "path": "/metadata/annotations/gpucostd.io~1reason", "value": REASON},
    {"op": "add", "path": "/metadata/annotations/gpucostd.io~1since",
     "value": "2025-12-06T05:46:40Z"},
    {"op": "add", "path": "/metadata/annotations/gpucostd.io~1set-unschedulable",
     "value": "true"},
    {"op": "add", "path": "/metadata/labels/gpucostd.io~1cordoned-by", "value": "gpucostd"},
]


def test_a_real_node_reads_as_free_with_the_service_account_token(api, backend):
    st = backend.state(5)
    assert (st.drained, st.ours, st.opted_out, st.blocked, st.reason) == \
        (False, False, False, "", "")
    (get,) = api.requests
    assert (get.method, get.path) == ("GET", "/api/v1/nodes/minikube")
    assert get.headers["Authorization"] == "Bearer " + TOKEN
    assert backend.describe() == ("kubernetes", "minikube")


def test_drain_sends_one_json_patch_guarded_by_the_resource_version(api, backend):
    backend.drain(REASON, 5)
    (patch,) = api.of("PATCH")
    assert patch.path == "/api/v1/nodes/minikube"
    assert patch.headers["Content-Type"] == "application/json-patch+json"
    assert patch.body == DRAIN_PATCH
    st = backend.state(5)
    assert (st.drained, st.ours, st.reason) == (True, True, REASON)
    node = api.nodes["minikube"]
    assert node["metadata"]["labels"]["kubernetes.io/hostname"] == "minikube"   # kept
    # a second drain of a node gpucostd already drained writes nothing
    backend.drain(REASON, 5)
    assert len(api.of("PATCH")) == 1


def test_undrain_removes_exactly_what_gpucostd_added(api, backend):
    before = copy.deepcopy(api.nodes["minikube"])
    backend.drain(REASON, 5)
    backend.undrain(5)
    undrain = api.of("PATCH")[1].body
    assert undrain == [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "1327898"},
        {"op": "remove", "path": "/spec/taints/0"},
        {"op": "remove", "path": "/spec/unschedulable"},
        {"op": "remove", "path": "/metadata/annotations/gpucostd.io~1cordoned-by"},
        {"op": "remove", "path": "/metadata/annotations/gpucostd.io~1reason"},
        {"op": "remove", "path": "/metadata/annotations/gpucostd.io~1since"},
        {"op": "remove", "path": "/metadata/annotations/gpucostd.io~1set-unschedulable"},
        {"op": "remove", "path": "/metadata/labels/gpucostd.io~1cordoned-by"},
    ]
    after = api.nodes["minikube"]
    assert after["metadata"]["annotations"] == before["metadata"]["annotations"]
    assert after["metadata"]["labels"] == before["metadata"]["labels"]
    assert after["spec"] == dict(before["spec"], taints=[])
    st = backend.state(5)
    assert (st.drained, st.ours) == (False, False)


def _operator_cordon(node):
    node["spec"]["unschedulable"] = True
    node["spec"]["taints"] = [{"key": "node.kubernetes.io/unschedulable",
                               "effect": "NoSchedule", "timeAdded": "2025-12-06T05:00:00Z"}]


def test_an_operators_cordon_is_kept_and_never_undone(api, backend):
    api.operator("minikube", _operator_cordon)
    st = backend.state(5)
    assert (st.drained, st.ours) == (True, False)
    assert st.reason == ("cordoned by someone else (spec.unschedulable); taints: "
                         "node.kubernetes.io/unschedulable=:NoSchedule")
    backend.undrain(5)                                   # not gpucostd's: nothing written
    assert api.of("PATCH") == []
    backend.drain(REASON, 5)                             # adds only gpucostd's marks
    (patch,) = api.of("PATCH")
    assert {"op": "add", "path": "/spec/unschedulable", "value": True} not in patch.body
    assert {"op": "add", "path": "/spec/taints/-", "value": {
        "key": "gpucostd.io/unhealthy", "value": "gpucostd", "effect": "NoSchedule"}} \
        in patch.body
    assert {"op": "add", "path": "/metadata/annotations/gpucostd.io~1set-unschedulable",
            "value": "false"} in patch.body
    st = backend.state(5)
    assert (st.drained, st.ours) == (True, True)
    assert "the cordon is someone else's" in st.reason
    backend.undrain(5)                                   # our taint and marks go, theirs stay
    node = api.nodes["minikube"]
    assert node["spec"]["unschedulable"] is True
    assert [t["key"] for t in node["spec"]["taints"]] == ["node.kubernetes.io/unschedulable"]
    assert "gpucostd.io/cordoned-by" not in node["metadata"]["annotations"]
    st = backend.state(5)
    assert (st.drained, st.ours) == (True, False)


def test_a_manual_uncordon_is_honoured_and_leaves_no_marks_behind(api, backend):
    backend.drain(REASON, 5)
    api.operator("minikube", lambda n: n["spec"].pop("unschedulable"))    # kubectl uncordon
    st = backend.state(5)
    assert (st.drained, st.ours) == (False, False)
    assert st.reason.startswith(f"uncordoned by hand after gpucostd cordoned it ({REASON})")
    assert "removed its leftover taint" in st.reason
    cleanup = api.of("PATCH")[1].body
    assert {"op": "remove", "path": "/spec/taints/0"} in cleanup
    assert not any(op["path"] == "/spec/unschedulable" for op in cleanup)
    node = api.nodes["minikube"]
    assert node["spec"].get("taints") == [] and "unschedulable" not in node["spec"]
    assert not any(k.startswith("gpucostd.io/") for k in node["metadata"]["annotations"])
    assert not any(k.startswith("gpucostd.io/") for k in node["metadata"]["labels"])


def test_a_dry_run_reports_a_manual_uncordon_and_writes_nothing(api, settings, clock, backend):
    backend.drain(REASON, 5)
    api.operator("minikube", lambda n: n["spec"].pop("unschedulable"))    # kubectl uncordon
    patches = len(api.of("PATCH"))
    dry = KubernetesBackend(settings=settings, node_name="minikube", clock=clock,
                            read_only=True)
    st = dry.state(5)
    assert (st.drained, st.ours) == (False, False) and "dry_run" in st.reason
    assert len(api.of("PATCH")) == patches            # the leftover marks stay
    assert "gpucostd.io/cordoned-by" in api.nodes["minikube"]["metadata"]["annotations"]


def test_a_change_between_read_and_write_is_not_overwritten(api, backend):
    api.after_get = _operator_cordon          # the operator cordons right after our read
    backend.drain(REASON, 5)
    first, second = (r.body for r in api.of("PATCH"))
    assert first[0] == {"op": "test", "path": "/metadata/resourceVersion", "value": "1327897"}
    assert second[0] == {"op": "test", "path": "/metadata/resourceVersion", "value": "1327898"}
    assert not any(op["path"] == "/spec/unschedulable" for op in second)
    node = api.nodes["minikube"]
    assert node["metadata"]["annotations"]["gpucostd.io/set-unschedulable"] == "false"
    assert [t["key"] for t in node["spec"]["taints"]] == [
        "node.kubernetes.io/unschedulable", "gpucostd.io/unhealthy"]


def test_the_opt_out_label_is_respected(api, backend):
    api.operator("minikube", lambda n: n["metadata"]["labels"].update(
        {"gpucostd.io/drain-opt-out": "true"}))
    assert backend.state(5).opted_out is True
    with pytest.raises(DrainError, match="opt-out label gpucostd.io/drain-opt-out"):
        backend.drain(REASON, 5)
    assert api.of("PATCH") == []


def test_a_node_the_api_does_not_know_is_blocked(api, settings, clock):
    gone = KubernetesBackend(settings=settings, node_name="gpu-node-9", clock=clock)
    st = gone.state(5)
    assert (st.drained, st.ours) == (False, False)
    assert "no node named 'gpu-node-9'" in st.blocked and "node_name" in st.blocked
    with pytest.raises(DrainError, match="no node named 'gpu-node-9'"):
        gone.drain(REASON, 5)


def test_forbidden_names_the_missing_rbac_verb(api, backend):
    api.forced.append(("PATCH", "/api/v1/nodes/minikube", 403,
                       STATUS["forbidden_patch_nodes"]))
    with pytest.raises(DrainError) as e:
        backend.drain(REASON, 5)
    text = str(e.value)
    assert 'lacks the RBAC verb "patch" on "nodes"' in text
    assert "packaging/kubernetes/gpucostd.yaml" in text
    assert 'cannot patch resource \\"nodes\\"' not in text and \
        'cannot patch resource "nodes" in API group' in text
    api.forced.append(("PATCH", "/api/v1/nodes/minikube/status", 403,
                       STATUS["forbidden_patch_nodes_status"]))
    with pytest.raises(DrainError, match='RBAC verb "patch" on "nodes/status"'):
        backend.report([Condition("GpucostdHealthy", True, "Healthy", "all GPUs OK")], 5)


def test_a_rejected_token_says_which_file_and_what_to_check(api, backend, settings):
    with open(settings.token_file, "w") as f:
        f.write("expired-token\n")
    with pytest.raises(DrainError) as e:
        backend.state(5)
    assert "401 Unauthorized" in str(e.value) and settings.token_file in str(e.value)


def test_eviction_skips_daemonset_mirror_and_finished_pods_and_reports_a_pdb_once(
        api, backend, settings):
    settings.evict = True
    api.pdb = {"vllm-7d9c5b6f4-k7p2m"}
    with pytest.raises(EvictionRefused) as e:
        backend.drain(REASON, 5)
    (listing,) = api.of("GET", "/api/v1/pods")
    assert listing.path == "/api/v1/pods?fieldSelector=spec.nodeName%3Dminikube"
    posts = api.of("POST")
    assert [p.path for p in posts] == [
        "/api/v1/namespaces/serving/pods/vllm-7d9c5b6f4-x2x8q/eviction",
        "/api/v1/namespaces/serving/pods/vllm-7d9c5b6f4-k7p2m/eviction"]      # once each
    assert posts[0].body == {"apiVersion": "policy/v1", "kind": "Eviction",
                             "metadata": {"name": "vllm-7d9c5b6f4-x2x8q",
                                          "namespace": "serving"},
                             "deleteOptions": {"gracePeriodSeconds": 30}}
    text = str(e.value)
    assert "evicted 1 of 2 pods" in text
    assert ("serving/vllm-7d9c5b6f4-k7p2m: Cannot evict pod as it would violate the pod's "
            "disruption budget. (The disruption budget vllm-pdb needs 1 healthy pods and has "
            "1 currently)") in text
    assert backend.state(5).drained is True                 # the cordon stands


def test_fleet_counts_gpucostds_marks_and_their_age_from_the_api(api, backend, clock):
    marks = {"gpucostd.io/cordoned-by": "gpucostd"}
    for i, age in enumerate((30, 200, 900)):
        api.add_node(f"gpu-{i}", annotations=dict(marks, **{
            "gpucostd.io/since": _rfc3339(clock.t - age)}), labels=marks, unschedulable=True)
    api.add_node("gpu-operator", unschedulable=True)      # an operator's cordon: not ours
    for i in range(5):
        api.add_node(f"gpu-free-{i}")
    assert backend.fleet(300, 5) == FleetDrains(ours=3, recent=2, nodes=10)
    paths = [r.path for r in api.of("GET")]
    assert paths[0] == "/api/v1/nodes?labelSelector=gpucostd.io%2Fcordoned-by%3Dgpucostd&limit=500"
    assert paths[1] == "/api/v1/nodes?limit=1"                # remainingItemCount: no full list


def _rfc3339(t):
    from datetime import datetime, timezone
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_conditions_go_in_a_status_patch_and_keep_their_transition_time(api, backend, clock):
    conds = [Condition("GpucostdHealthy", False, "XidCritical", "GPU 0: Xid 79"),
             Condition("GpucostdEfficient", True, "AboveFloor", "412 tokens/s per $/h")]
    backend.report(conds, 5)
    (patch,) = api.of("PATCH")
    assert patch.path == "/api/v1/nodes/minikube/status"
    assert patch.headers["Content-Type"] == "application/strategic-merge-patch+json"
    t0 = _rfc3339(clock.t)
    assert patch.body == {"status": {"conditions": [
        {"type": "GpucostdHealthy", "status": "False", "reason": "XidCritical",
         "message": "GPU 0: Xid 79", "lastHeartbeatTime": t0, "lastTransitionTime": t0},
        {"type": "GpucostdEfficient", "status": "True", "reason": "AboveFloor",
         "message": "412 tokens/s per $/h", "lastHeartbeatTime": t0,
         "lastTransitionTime": t0}]}}
    clock.t += 30
    backend.report(conds, 5)                 # unchanged, heartbeat 30 s old: read, no write
    assert len(api.of("PATCH")) == 1
    clock.t += 31
    t1 = _rfc3339(clock.t)
    backend.report([conds[0], Condition("GpucostdEfficient", False, "BelowFloor", "90")], 5)
    healthy, efficient = api.of("PATCH")[1].body["status"]["conditions"]
    assert (healthy["lastHeartbeatTime"], healthy["lastTransitionTime"]) == (t1, t0)
    assert (efficient["lastHeartbeatTime"], efficient["lastTransitionTime"]) == (t1, t1)
    clock.t += 61                            # unchanged, but the heartbeat is due
    backend.report([conds[0], Condition("GpucostdEfficient", False, "BelowFloor", "90")], 5)
    assert len(api.of("PATCH")) == 3
    kinds = [c["type"] for c in api.nodes["minikube"]["status"]["conditions"]]
    assert kinds[:4] == ["MemoryPressure", "DiskPressure", "PIDPressure", "Ready"]   # kept


def test_in_cluster_address_comes_from_the_service_environment(api, settings, clock,
                                                               monkeypatch):
    settings.api_url = ""
    host, port = api.url[len("https://"):].split(":")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
    b = KubernetesBackend(settings=settings, node_name="minikube", clock=clock)
    assert b.state(5).drained is False
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    with pytest.raises(DrainError, match="KUBERNETES_SERVICE_HOST is not set"):
        b.state(5)


def test_missing_files_and_a_foreign_certificate_are_errors_in_words(api, settings, clock,
                                                                     tmp_path):
    b = KubernetesBackend(settings=settings, node_name="minikube", clock=clock)
    settings.token_file = str(tmp_path / "absent")
    with pytest.raises(DrainError, match="token_file .*absent does not exist"):
        b.state(5)
    settings.token_file = str(tmp_path / "token")
    other = tmp_path / "other-ca.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(tmp_path / "other.key"), "-out", str(other), "-days", "1", "-subj",
                    "/CN=other-ca"], check=True, capture_output=True)
    settings.ca_file = str(other)
    with pytest.raises(DrainError, match="does not verify against"):
        b.state(5)


def test_an_api_server_that_never_answers_is_a_timeout_error(settings, clock):
    with socket.socket() as silent:               # accepts, never speaks TLS
        silent.bind(("127.0.0.1", free_port()))
        silent.listen(1)
        settings.api_url = f"https://127.0.0.1:{silent.getsockname()[1]}"
        b = KubernetesBackend(settings=settings, node_name="minikube", clock=clock)
        with pytest.raises(DrainError, match="no answer from the Kubernetes API server"):
            b.state(0.5)


def _rbac(request):
    """(verb, resource) as the API server's RBAC authorizer sees a request."""
    path = urllib.parse.urlsplit(request.path).path.strip("/").split("/")
    if path[:3] == ["api", "v1", "pods"]:
        return "list", "pods"
    if path[-1] == "eviction":
        return "create", "pods/eviction"
    if path[:3] == ["api", "v1", "nodes"]:
        if len(path) == 3:
            return "list", "nodes"
        sub = "/status" if path[4:] == ["status"] else ""
        return {"GET": "get", "PATCH": "patch"}[request.method], "nodes" + sub
    raise AssertionError(request.path)


def _granted(name):
    from gpucostd.views.webconfig import parse_yaml_documents
    path = REPO / "packaging" / "kubernetes" / name
    (role,) = [d for d in parse_yaml_documents(path.read_text(), name)
               if d["kind"] == "ClusterRole"]
    return {(v, r) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]
            if rule["apiGroups"] == [""]}


def test_the_cluster_roles_grant_exactly_the_requests_the_back_end_makes(api, backend,
                                                                         settings):
    backend.state(5)
    backend.fleet(300, 5)
    backend.report([Condition("GpucostdHealthy", True, "Healthy", "ok")], 5)
    backend.drain(REASON, 5)
    backend.undrain(5)
    assert {_rbac(r) for r in api.requests} == _granted("gpucostd.yaml")
    api.requests.clear()
    settings.evict = True
    backend.drain(REASON, 5)
    assert {_rbac(r) for r in api.requests} - _granted("gpucostd.yaml") == \
        _granted("drain-evict.yaml")


def test_a_conflict_is_read_again_and_a_server_error_is_said_in_words(api, backend, settings):
    api.forced.append(("PATCH", "/api/v1/nodes/minikube", 409, STATUS["conflict_node"]))
    backend.drain(REASON, 5)
    assert len(api.of("PATCH")) == 2 and backend.state(5).ours is True
    api.forced.append(("GET", "/api/v1/nodes/minikube", 500, {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "etcdserver: request timed out", "reason": "InternalError", "code": 500}))
    with pytest.raises(DrainError, match="HTTP 500 InternalError: etcdserver: request timed out"):
        backend.undrain(5)
    with open(settings.token_file, "w") as f:
        f.write("\u00e9t\u00e9\n")
    with pytest.raises(DrainError, match="does not hold a bearer token"):
        backend.state(5)

"""The Kubernetes drain back end: cordon, taint and annotate this node through the API server.

What gpucostd puts on a node it drains (NVIDIA NVSentinel's marks, node-problem-detector's
conditions):
- `spec.unschedulable: true` (a cordon), only when nobody had cordoned the node before;
- a taint `<taint_key>=gpucostd:<taint_effect>` (default `gpucostd.io/unhealthy`, NoSchedule);
- the annotations `gpucostd.io/cordoned-by: gpucostd` (the ownership mark), `gpucostd.io/reason`
  ("gpucostd: <finding>"), `gpucostd.io/since` (RFC 3339, UTC) and
  `gpucostd.io/set-unschedulable` ("true" when gpucostd set the cordon, "false" when the node
  was already cordoned by someone else and gpucostd only added its taint);
- the label `gpucostd.io/cordoned-by: gpucostd`, so the fleet brake lists gpucostd's nodes with
  a label selector instead of reading every node.

Every write is an RFC 6902 JSON Patch (application/json-patch+json) whose first operation is
`test /metadata/resourceVersion` = the version just read: a cordon, taint or uncordon made by an
operator between the read and the write fails the patch (HTTP 422) instead of being overwritten;
the back end then reads the node again and decides once more (twice at most). JSON Patch and not a
strategic merge patch because `spec.taints` has no merge key (a strategic merge patch replaces the
whole list) and because the test operation makes the precondition explicit in the patch itself.
The node conditions go, as node-problem-detector sends them, as a strategic merge patch of
`nodes/NAME/status` (conditions merge by `type`).

Only the standard library: http.client over ssl with the service account's token and CA, one
deadline per call. Tested against recorded API objects and Status bodies (tests/fixtures/
kubernetes/SOURCES.md); no kube-apiserver could be had from the package registries.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import time
import urllib.parse
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Sequence, Tuple

from gpucostd.drain.backend import (REASON_PREFIX, Condition, DrainBackend, DrainError,
                                    FleetDrains, NodeDrainState)
from gpucostd.statefile import UnreadableFile, read_regular

MARK = "gpucostd"
OWNER = "gpucostd.io/cordoned-by"          # annotation and label: gpucostd's ownership mark
REASON = "gpucostd.io/reason"
SINCE = "gpucostd.io/since"
SET_UNSCHEDULABLE = "gpucostd.io/set-unschedulable"
ANNOTATIONS = (OWNER, REASON, SINCE, SET_UNSCHEDULABLE)
MIRROR = "kubernetes.io/config.mirror"     # a static pod's mirror: the API cannot evict it
IN_CLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
MAX_BODY = 64 << 20                        # a node list of a large fleet fits
MAX_REASON = 1024
ATTEMPTS = 2                               # a write that lost a race is decided once more
HEARTBEAT_SECONDS = 60.0                   # an unchanged condition is written again after this


class EvictionRefused(DrainError):
    """The node is cordoned and tainted, but the API refused some evictions (a
    PodDisruptionBudget answers 429). Reported once; gpucostd does not retry in a loop."""


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: Any) -> Optional[float]:
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.strip().replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _pointer(key: str) -> str:
    """One JSON Pointer token (RFC 6901): `gpucostd.io/reason` -> `gpucostd.io~1reason`."""
    return key.replace("~", "~0").replace("/", "~1")


class _Call:
    """One back-end call: its deadline, and the API server it talks to."""

    def __init__(self, api: "_Api", timeout: float):
        self.api = api
        self.timeout = max(0.1, float(timeout))
        self.deadline = time.monotonic() + self.timeout

    def request(self, method: str, path: str, *, verb: str, resource: str, name: str = "",
                body: Any = None, content_type: str = "application/json",
                ok: Sequence[int] = (200, 201)) -> Tuple[int, Any]:
        """(status, decoded JSON). A status in `ok`, 404, 409, 422 and 429 come back to the
        caller; anything else is a DrainError that says what to do."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise DrainError(f"no answer from the Kubernetes API server at {self.api.url()} "
                             f"within {self.timeout:g} s ({verb} {resource}); "
                             f"raise [drain] timeout_seconds or check the API server")
        status, doc = self.api.send(method, path, body, content_type, remaining,
                                    f"{verb} {resource}")
        if status in ok or status in (404, 409, 422, 429):
            return status, doc
        raise self.api.failure(status, doc, verb, resource, name)


class _Api:
    """HTTPS to the API server with the service account's bearer token."""

    def __init__(self, settings: Any):
        self.settings = settings

    def url(self) -> str:
        url = str(getattr(self.settings, "api_url", "") or "").strip()
        if url:
            return url.rstrip("/")
        host = os.environ.get("KUBERNETES_SERVICE_HOST", "").strip()
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "").strip() or "443"
        if not host:
            raise DrainError("[drain.kubernetes] api_url is empty and KUBERNETES_SERVICE_HOST "
                             "is not set, so gpucostd is not running in a pod: set api_url "
                             "(and token_file, ca_file) to reach the API server")
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"                      # an IPv6 service address
        return f"https://{host}:{port}"

    def _token(self) -> str:
        path = str(getattr(self.settings, "token_file", "") or IN_CLUSTER_TOKEN)
        try:
            blob, _st = read_regular(path, 1 << 20)
        except FileNotFoundError:
            raise DrainError(f"[drain.kubernetes] token_file {path} does not exist: mount the "
                             f"service account token (automountServiceAccountToken: true on the "
                             f"DaemonSet) or point token_file at one") from None
        except UnreadableFile as e:
            raise DrainError(f"[drain.kubernetes] token_file {path} {e}") from None
        token = blob.decode("utf-8", "replace").strip()
        if not token:
            raise DrainError(f"[drain.kubernetes] token_file {path} is empty")
        if not all(33 <= ord(ch) < 127 for ch in token):
            raise DrainError(f"[drain.kubernetes] token_file {path} does not hold a bearer "
                             f"token (one line of printable ASCII): is it the right file?")
        return token            # read on every call: bound tokens are rotated by the kubelet

    def _context(self) -> ssl.SSLContext:
        ca = str(getattr(self.settings, "ca_file", "") or "")
        if not ca:
            return ssl.create_default_context()
        if not os.path.isfile(ca):
            raise DrainError(f"[drain.kubernetes] ca_file {ca} does not exist: mount the "
                             f"service account's ca.crt or point ca_file at the CA bundle that "
                             f"signs the API server's certificate")
        try:
            return ssl.create_default_context(cafile=ca)
        except (ssl.SSLError, OSError, ValueError) as e:
            raise DrainError(f"[drain.kubernetes] ca_file {ca} holds no usable CA "
                             f"certificate: {e}") from None

    def send(self, method: str, path: str, body: Any, content_type: str, timeout: float,
             what: str) -> Tuple[int, Any]:
        base = self.url()
        parts = urllib.parse.urlsplit(base)
        if parts.scheme != "https" or not parts.hostname:
            raise DrainError(f"[drain.kubernetes] api_url = {base!r}: must be an https:// URL "
                             f"of the API server")
        headers = {"Authorization": "Bearer " + self._token(), "Accept": "application/json",
                   "User-Agent": "gpucostd"}
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
            headers["Content-Type"] = content_type
        conn = http.client.HTTPSConnection(parts.hostname, parts.port or 443,
                                           context=self._context(), timeout=timeout)
        try:
            conn.request(method, (parts.path or "") + path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read(MAX_BODY + 1)
            status = resp.status
        except ssl.SSLCertVerificationError as e:
            raise DrainError(f"the Kubernetes API server at {base} presented a certificate "
                             f"that does not verify against [drain.kubernetes] ca_file "
                             f"({e.verify_message or e}); {what} not done") from None
        except (socket.timeout, TimeoutError):
            raise DrainError(f"no answer from the Kubernetes API server at {base} within "
                             f"{timeout:.1f} s ({what}); raise [drain] timeout_seconds or "
                             f"check the API server") from None
        except (OSError, http.client.HTTPException) as e:
            raise DrainError(f"cannot reach the Kubernetes API server at {base} ({what}): "
                             f"{e.__class__.__name__}: {e}") from None
        finally:
            conn.close()
        if len(raw) > MAX_BODY:
            raise DrainError(f"the Kubernetes API server's answer to {what} is over "
                             f"{MAX_BODY >> 20} MiB; not read")
        try:
            doc = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        except (UnicodeDecodeError, ValueError):
            if 200 <= status < 300:
                raise DrainError(f"the Kubernetes API server answered {what} with HTTP "
                                 f"{status} but not JSON: {raw[:120]!r}") from None
            doc = {"message": raw[:200].decode("utf-8", "replace").strip()}
        return status, doc if isinstance(doc, dict) else {}

    def failure(self, status: int, doc: Any, verb: str, resource: str, name: str
                ) -> DrainError:
        message = str(doc.get("message", "")) if isinstance(doc, dict) else ""
        target = f"{resource} {name}".strip()
        if status == 401:
            token = getattr(self.settings, "token_file", "") or IN_CLUSTER_TOKEN
            return DrainError(f"the Kubernetes API server rejected gpucostd's credentials "
                              f"(401 Unauthorized) on {verb} {target}: the token in {token} is "
                              f"missing, expired or not this cluster's; check the DaemonSet's "
                              f"serviceAccountName and token mount")
        if status == 403:
            role = ("gpucostd-evict of packaging/kubernetes/drain-evict.yaml"
                    if resource.startswith("pods") else
                    "gpucostd-drain of packaging/kubernetes/gpucostd.yaml")
            return DrainError(f"forbidden (403) to {verb} {target}: gpucostd's service account "
                              f"lacks the RBAC verb \"{verb}\" on \"{resource}\"; apply the "
                              f"ClusterRole {role} (API server: {message or 'no message'})")
        reason = str(doc.get("reason", "")) if isinstance(doc, dict) else ""
        return DrainError(f"{verb} {target}: the Kubernetes API server answered HTTP {status}"
                          f"{' ' + reason if reason else ''}: {message or 'no message'}")


class KubernetesBackend(DrainBackend):
    """This node in a Kubernetes cluster. `settings`: [drain.kubernetes] (api_url, token_file,
    ca_file, taint_key, taint_effect, opt_out_label, evict, eviction_grace_seconds)."""

    name = "kubernetes"

    def __init__(self, settings: Any, node_name: str, clock: Any = None,
                 read_only: bool = False):
        self.settings = settings
        self.read_only = read_only       # [drain] dry_run: state() leaves leftover marks alone
        self.node_name = str(node_name)
        self.clock = clock
        self._api = _Api(settings)
        self._node_path = "/api/v1/nodes/" + urllib.parse.quote(self.node_name, safe="")

    # -- reading ----------------------------------------------------------------------------

    def _now(self) -> float:
        return float(self.clock.time()) if self.clock is not None else time.time()

    def _get_node(self, call: _Call) -> Optional[Dict[str, Any]]:
        status, doc = call.request("GET", self._node_path, verb="get", resource="nodes",
                                   name=self.node_name, ok=(200,))
        if status == 404:
            return None
        if status != 200 or doc.get("kind") != "Node":
            raise call.api.failure(status, doc, "get", "nodes", self.node_name)
        return doc

    def _gone(self) -> str:
        return (f"the API server has no node named {self.node_name!r} (deleted, or [drain] "
                f"node_name is not this node's name in the cluster)")

    def _is_ours(self, node: Dict[str, Any]) -> bool:
        return _annotations(node).get(OWNER) == MARK

    def _our_taints(self, node: Dict[str, Any]) -> List[int]:
        key = self.settings.taint_key
        return [i for i, t in enumerate(_taints(node))
                if isinstance(t, dict) and t.get("key") == key and t.get("value") == MARK]

    def _opted_out(self, node: Dict[str, Any]) -> bool:
        label = self.settings.opt_out_label
        labels = _labels(node)
        return bool(label) and label in labels and str(labels[label]).lower() != "false"

    def state(self, timeout: float) -> NodeDrainState:
        """The node now. After a manual uncordon of a node gpucostd cordoned (its marks still
        there, `spec.unschedulable` false) the operator's decision is honoured at once: this
        read removes gpucostd's leftover taint, label and annotations (NVSentinel #1872: marks
        left behind block scheduling and mislead) and reports the node as not gpucostd's. A
        read-only back end ([drain] dry_run) only reports them."""
        call = _Call(self._api, timeout)
        node = self._get_node(call)
        if node is None:
            return NodeDrainState(drained=False, ours=False, blocked=self._gone())
        cordoned = _cordoned(node)
        ours = self._is_ours(node)
        opted = self._opted_out(node)
        blocked = ""
        if node.get("metadata", {}).get("deletionTimestamp"):
            blocked = f"node {self.node_name} is being deleted"
        if ours and not cordoned:
            why = _annotations(node).get(REASON, "")
            note = f"uncordoned by hand after gpucostd cordoned it ({why})"
            if self.read_only:
                return NodeDrainState(drained=False, ours=False, opted_out=opted,
                                      blocked=blocked, reason=f"{note}; gpucostd's leftover "
                                      f"marks stay while [drain] dry_run is on")
            try:
                self._remove_marks(call, node, uncordon=False)
            except DrainError as e:
                return NodeDrainState(drained=False, ours=True, opted_out=opted, blocked=blocked,
                                      reason=f"{note}; removing gpucostd's leftover taint and "
                                             f"annotations failed: {e}")
            return NodeDrainState(drained=False, ours=False, opted_out=opted, blocked=blocked,
                                  reason=f"{note}; gpucostd removed its leftover taint and "
                                         f"annotations")
        return NodeDrainState(drained=cordoned, ours=ours, reason=self._reason(node),
                              opted_out=opted, blocked=blocked)

    def _reason(self, node: Dict[str, Any]) -> str:
        ann = _annotations(node)
        if self._is_ours(node):
            why = ann.get(REASON, REASON_PREFIX + " (no reason recorded)")
            if ann.get(SET_UNSCHEDULABLE) == "false":
                return (f"{why} (the cordon is someone else's, set before gpucostd's drain; "
                        f"gpucostd added only its taint and keeps their cordon)")
            return why
        if _cordoned(node):
            others = [f"{t.get('key')}={t.get('value', '')}:{t.get('effect')}"
                      for t in _taints(node) if isinstance(t, dict)]
            return ("cordoned by someone else (spec.unschedulable)"
                    + (f"; taints: {', '.join(others)}" if others else ""))
        return ""

    # -- writing ----------------------------------------------------------------------------

    def _patch(self, call: _Call, ops: List[Dict[str, Any]], what: str) -> bool:
        """Apply a JSON Patch; False when the node changed since it was read (the patch's
        resourceVersion test failed: 422, or 409), so the caller reads again."""
        status, doc = call.request("PATCH", self._node_path, verb="patch", resource="nodes",
                                   name=self.node_name, body=ops,
                                   content_type="application/json-patch+json", ok=(200,))
        if status == 200:
            return True
        if status in (409, 422):
            return False
        if status == 404:
            raise DrainError(f"{what}: {self._gone()}")
        raise call.api.failure(status, doc, "patch", "nodes", self.node_name)

    def drain(self, reason: str, timeout: float) -> None:
        """Cordon (unless someone already did), taint and annotate; then evict the node's
        pods when [drain.kubernetes] evict is on."""
        call = _Call(self._api, timeout)
        text = str(reason)[:MAX_REASON]
        if not text.startswith(REASON_PREFIX):
            text = f"{REASON_PREFIX} {text}"
        for _attempt in range(ATTEMPTS):
            node = self._get_node(call)
            if node is None:
                raise DrainError(f"cannot drain: {self._gone()}")
            if self._opted_out(node):
                raise DrainError(f"node {self.node_name} carries the opt-out label "
                                 f"{self.settings.opt_out_label}; gpucostd does not drain it")
            if self._is_ours(node) and _cordoned(node) and self._our_taints(node):
                return                                     # already drained by gpucostd
            if self._patch(call, self._drain_ops(node, text), "drain"):
                break
        else:
            raise DrainError(f"node {self.node_name} changed between read and write "
                             f"{ATTEMPTS} times (another controller is writing it); not drained "
                             f"this time")
        if self.settings.evict:
            self._evict(call)

    def _drain_ops(self, node: Dict[str, Any], reason: str) -> List[Dict[str, Any]]:
        meta = node.get("metadata", {})
        ops: List[Dict[str, Any]] = [{"op": "test", "path": "/metadata/resourceVersion",
                                      "value": meta.get("resourceVersion", "")}]
        cordoned = _cordoned(node)
        set_by_us = _annotations(node).get(SET_UNSCHEDULABLE) if self._is_ours(node) else None
        if not cordoned:
            ops.append({"op": "add", "path": "/spec/unschedulable", "value": True})
            set_by_us = "true"
        elif set_by_us is None:
            set_by_us = "false"                 # someone else's cordon: keep it, add our marks
        taint: Dict[str, Any] = {"key": self.settings.taint_key, "value": MARK,
                                 "effect": self.settings.taint_effect}
        if taint["effect"] == "NoExecute":      # the API keeps timeAdded for NoExecute only
            taint["timeAdded"] = rfc3339(self._now())
        ours = self._our_taints(node)
        if ours:
            ops.append({"op": "replace", "path": f"/spec/taints/{ours[0]}", "value": taint})
        elif "taints" in node.get("spec", {}):
            ops.append({"op": "add", "path": "/spec/taints/-", "value": taint})
        else:
            ops.append({"op": "add", "path": "/spec/taints", "value": [taint]})
        marks = {OWNER: MARK, REASON: reason, SINCE: rfc3339(self._now()),
                 SET_UNSCHEDULABLE: set_by_us}
        ops += _add_map(meta, "annotations", marks)
        ops += _add_map(meta, "labels", {OWNER: MARK})
        return ops

    def undrain(self, timeout: float) -> None:
        """Remove gpucostd's taint, label and annotations, and the cordon only when gpucostd
        set it. A node without gpucostd's mark is left as it is."""
        call = _Call(self._api, timeout)
        for _attempt in range(ATTEMPTS):
            node = self._get_node(call)
            if node is None:
                raise DrainError(f"cannot undrain: {self._gone()}")
            if not self._is_ours(node):
                return                 # not gpucostd's (or already undone): never another's
            if self._remove_marks(call, node, uncordon=True):
                return
        raise DrainError(f"node {self.node_name} changed between read and write {ATTEMPTS} "
                         f"times (another controller is writing it); not undrained this time")

    def _remove_marks(self, call: _Call, node: Dict[str, Any], uncordon: bool) -> bool:
        meta = node.get("metadata", {})
        ops: List[Dict[str, Any]] = [{"op": "test", "path": "/metadata/resourceVersion",
                                      "value": meta.get("resourceVersion", "")}]
        for i in sorted(self._our_taints(node), reverse=True):
            ops.append({"op": "remove", "path": f"/spec/taints/{i}"})
        ann = _annotations(node)
        if uncordon and _cordoned(node) and ann.get(SET_UNSCHEDULABLE) == "true":
            ops.append({"op": "remove", "path": "/spec/unschedulable"})
        for key in ANNOTATIONS:
            if key in ann:
                ops.append({"op": "remove", "path": f"/metadata/annotations/{_pointer(key)}"})
        if _labels(node).get(OWNER) == MARK:
            ops.append({"op": "remove", "path": f"/metadata/labels/{_pointer(OWNER)}"})
        return self._patch(call, ops, "undrain")

    def _evict(self, call: _Call) -> None:
        query = urllib.parse.urlencode({"fieldSelector": f"spec.nodeName={self.node_name}"})
        status, doc = call.request("GET", f"/api/v1/pods?{query}", verb="list", resource="pods",
                                   ok=(200,))
        if status != 200:
            raise call.api.failure(status, doc, "list", "pods", "")
        grace = int(self.settings.eviction_grace_seconds)
        evicted, refused, failed, skipped = 0, [], [], 0
        pods = [p for p in doc.get("items", []) if isinstance(p, dict)]
        for pod in pods:
            meta = pod.get("metadata", {})
            ns, name = meta.get("namespace", ""), meta.get("name", "")
            if _skip_eviction(pod):
                skipped += 1
                continue
            body = {"apiVersion": "policy/v1", "kind": "Eviction",
                    "metadata": {"name": name, "namespace": ns},
                    "deleteOptions": {"gracePeriodSeconds": grace}}
            path = (f"/api/v1/namespaces/{urllib.parse.quote(ns, safe='')}/pods/"
                    f"{urllib.parse.quote(name, safe='')}/eviction")
            status, answer = call.request("POST", path, verb="create", resource="pods/eviction",
                                          name=f"{ns}/{name}", body=body,
                                          ok=(200, 201))
            if status in (200, 201, 404):                  # 404: the pod is already gone
                evicted += 1
            elif status == 429:
                causes = [str(c.get("message", "")) for c in
                          (answer.get("details") or {}).get("causes", []) if isinstance(c, dict)]
                refused.append(f"{ns}/{name}: {answer.get('message', 'refused')}"
                               + (f" ({'; '.join(c for c in causes if c)})" if any(causes)
                                  else ""))
            else:
                failed.append(f"{ns}/{name}: HTTP {status} {answer.get('message', '')}".strip())
        if refused or failed:
            raise EvictionRefused(
                f"node {self.node_name} is cordoned and tainted; evicted {evicted} of "
                f"{len(pods) - skipped} pods (DaemonSet, mirror and finished pods skipped)"
                + (f"; refused by a PodDisruptionBudget: {', '.join(refused)}" if refused else "")
                + (f"; failed: {', '.join(failed)}" if failed else "")
                + "; gpucostd does not retry evictions: scale the workload or relax its budget, "
                  "then `kubectl drain` the node")

    # -- the fleet and the conditions -------------------------------------------------------

    def fleet(self, window_seconds: float, timeout: float) -> FleetDrains:
        call = _Call(self._api, timeout)
        selector = urllib.parse.urlencode({"labelSelector": f"{OWNER}={MARK}"})
        ours, recent = 0, 0
        now = self._now()
        for node in self._list(call, f"/api/v1/nodes?{selector}", 500):
            if _annotations(node).get(OWNER) != MARK:
                continue
            ours += 1
            since = parse_rfc3339(_annotations(node).get(SINCE))
            if since is not None and now - since <= window_seconds:
                recent += 1
        status, doc = call.request("GET", "/api/v1/nodes?limit=1", verb="list", resource="nodes",
                                   ok=(200,))
        if status != 200:
            raise call.api.failure(status, doc, "list", "nodes", "")
        remaining = (doc.get("metadata") or {}).get("remainingItemCount")
        if isinstance(remaining, int):
            total = len(doc.get("items", [])) + remaining
        elif (doc.get("metadata") or {}).get("continue"):
            total = sum(1 for _n in self._list(call, "/api/v1/nodes", 500))
        else:
            total = len(doc.get("items", []))
        return FleetDrains(ours=ours, recent=recent, nodes=max(total, ours))

    def _list(self, call: _Call, path: str, limit: int):
        token = ""
        while True:
            sep = "&" if "?" in path else "?"
            page = f"{path}{sep}limit={limit}"
            if token:
                page += "&" + urllib.parse.urlencode({"continue": token})
            status, doc = call.request("GET", page, verb="list", resource="nodes", ok=(200,))
            if status != 200:
                raise call.api.failure(status, doc, "list", "nodes", "")
            for item in doc.get("items", []) or []:
                if isinstance(item, dict):
                    yield item
            token = (doc.get("metadata") or {}).get("continue") or ""
            if not token:
                return

    def report(self, conditions: Sequence[Condition], timeout: float) -> None:
        """Set the node's conditions (GpucostdHealthy, GpucostdEfficient) in its status, as
        node-problem-detector does: lastTransitionTime moves only when the status changes.
        Conditions unchanged since a heartbeat under HEARTBEAT_SECONDS old (as the API server
        holds them) are not written again: one read, no write."""
        if not conditions:
            return
        call = _Call(self._api, timeout)
        node = self._get_node(call)
        if node is None:
            raise DrainError(f"cannot report conditions: {self._gone()}")
        now = rfc3339(self._now())
        current = {c.get("type"): c for c in (node.get("status") or {}).get("conditions", [])
                   if isinstance(c, dict)}
        if all(self._fresh(current.get(c.type), c) for c in conditions):
            return              # unchanged, and the API's heartbeat is recent: no write
        out = []
        for c in conditions:
            status = "True" if c.ok else "False"
            old = current.get(c.type)
            since = old.get("lastTransitionTime") if old and old.get("status") == status else now
            out.append({"type": c.type, "status": status, "reason": c.reason,
                        "message": c.message[:MAX_REASON], "lastHeartbeatTime": now,
                        "lastTransitionTime": since or now})
        status, doc = call.request("PATCH", self._node_path + "/status", verb="patch",
                                   resource="nodes/status", name=self.node_name,
                                   body={"status": {"conditions": out}},
                                   content_type="application/strategic-merge-patch+json",
                                   ok=(200,))
        if status == 404:
            raise DrainError(f"cannot report conditions: {self._gone()}")
        if status != 200:
            raise call.api.failure(status, doc, "patch", "nodes/status", self.node_name)

    def _fresh(self, old: Optional[Dict[str, Any]], new: Condition) -> bool:
        if not old or (old.get("status"), old.get("reason"), old.get("message")) != \
                ("True" if new.ok else "False", new.reason, new.message[:MAX_REASON]):
            return False
        beat = parse_rfc3339(old.get("lastHeartbeatTime"))
        return beat is not None and 0 <= self._now() - beat < HEARTBEAT_SECONDS

    def describe(self) -> Tuple[str, Optional[str]]:
        return self.name, self.node_name


def _annotations(node: Dict[str, Any]) -> Dict[str, Any]:
    ann = (node.get("metadata") or {}).get("annotations")
    return ann if isinstance(ann, dict) else {}


def _labels(node: Dict[str, Any]) -> Dict[str, Any]:
    labels = (node.get("metadata") or {}).get("labels")
    return labels if isinstance(labels, dict) else {}


def _taints(node: Dict[str, Any]) -> List[Any]:
    taints = (node.get("spec") or {}).get("taints")
    return taints if isinstance(taints, list) else []


def _cordoned(node: Dict[str, Any]) -> bool:
    return (node.get("spec") or {}).get("unschedulable") is True


def _add_map(meta: Dict[str, Any], field: str, values: Dict[str, str]) -> List[Dict[str, Any]]:
    """JSON Patch ops that set `values` in metadata.<field>, creating the map when absent
    (`add` on an existing member replaces it, RFC 6902 4.1)."""
    if not isinstance(meta.get(field), dict):
        return [{"op": "add", "path": f"/metadata/{field}", "value": dict(values)}]
    return [{"op": "add", "path": f"/metadata/{field}/{_pointer(k)}", "value": v}
            for k, v in values.items()]


def _skip_eviction(pod: Dict[str, Any]) -> bool:
    """DaemonSet pods (they come back at once and tolerate the cordon), mirror pods (static:
    the API cannot evict them), pods already terminating or finished."""
    meta = pod.get("metadata") or {}
    if any(isinstance(o, dict) and o.get("kind") == "DaemonSet"
           for o in meta.get("ownerReferences") or []):
        return True
    if MIRROR in (meta.get("annotations") or {}):
        return True
    if meta.get("deletionTimestamp"):
        return True
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


__all__ = ["KubernetesBackend", "EvictionRefused", "MARK", "OWNER", "REASON", "SINCE",
           "SET_UNSCHEDULABLE"]

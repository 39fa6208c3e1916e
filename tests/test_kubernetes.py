"""packaging/kubernetes/: the manifests against what the daemon needs (config path and validity,
port, probe path, writable paths, capabilities), the PrometheusRule against the rules file,
the PodMonitor against the pod, the drain back end's RBAC bindings."""
from __future__ import annotations

import re

import pytest

from conftest import REPO
from gpucostd.config import parse
from gpucostd.views.webconfig import parse_yaml_documents

K8S = REPO / "packaging" / "kubernetes"


def docs(name):
    return {d["kind"]: d for d in parse_yaml_documents((K8S / name).read_text(), name)}


@pytest.fixture(scope="module")
def objs():
    return docs("gpucostd.yaml")


@pytest.fixture(scope="module")
def pod(objs):
    return objs["DaemonSet"]["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod):
    (c,) = pod["containers"]
    return c


@pytest.fixture(scope="module")
def cfg(objs, container):
    args = container["args"]
    assert args[0] == "run" and args[1] == "--config"
    path = args[2]
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    vol = next(v for v in container_volumes(objs) if v["name"] == mount["name"])
    cm = objs["ConfigMap"]
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    return parse(cm["data"][path[len(mount["mountPath"]) + 1:]], "configmap")


def container_volumes(objs):
    return objs["DaemonSet"]["spec"]["template"]["spec"]["volumes"]


def mounted(container, path):
    return any(path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
               for m in container["volumeMounts"])


def test_the_config_in_the_configmap_is_valid_and_matches_the_pod(cfg, container, pod):
    port = int(cfg.daemon.listen_address.rpartition(":")[2])
    (p,) = container["ports"]
    assert p["containerPort"] == port and p["name"] == "metrics"
    assert cfg.daemon.listen_address.startswith("0.0.0.0:")     # the node IP is scraped
    assert pod["hostNetwork"] is True                            # NIC tuning, <node>:9477
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    src = (REPO / "daemon" / "views" / "httpserver.py").read_text()
    assert 'path == "/healthz"' in src


def test_every_path_the_daemon_writes_is_a_mount_of_a_read_only_root(cfg, container, objs):
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    for path in (cfg.daemon.state_dir, cfg.daemon.socket_path.rpartition("/")[0], "/tmp"):
        assert mounted(container, path), path
    # the saved originals survive the pod: the state dir is the host's
    state = next(m for m in container["volumeMounts"] if m["mountPath"] == cfg.daemon.state_dir)
    vol = next(v for v in container_volumes(objs) if v["name"] == state["name"])
    assert vol["hostPath"]["path"] == "/var/lib/gpucostd"


def test_the_kernel_log_source_is_mounted(cfg, container):
    assert cfg.daemon.kernel_log == "journal"
    for path in ("/var/log/journal", "/run/log/journal", "/etc/machine-id"):
        m = next(m for m in container["volumeMounts"] if m["mountPath"] == path)
        assert m["readOnly"] is True


def test_capabilities_are_what_the_tuners_need_and_no_more(container, pod):
    sc = container["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    added = set(sc["capabilities"]["add"])
    assert added == {"SYS_ADMIN", "NET_ADMIN", "CHOWN"}
    unit = (REPO / "systemd" / "gpucostd.service").read_text()
    bounding = set(re.search(r"^CapabilityBoundingSet=(.*)$", unit, re.M).group(1).split())
    # the unit's set, less CAP_SYSLOG (only for /dev/kmsg; the pod reads the journal)
    assert {"CAP_" + c for c in added} == bounding - {"CAP_SYSLOG"}
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["runAsUser"] == 0             # NVML's setters want uid 0 with CAP_SYS_ADMIN


def test_gpus_come_from_the_nvidia_runtime_without_taking_a_gpu(container, pod):
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert pod["runtimeClassName"] == "nvidia"
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert "utility" in env["NVIDIA_DRIVER_CAPABILITIES"]     # libnvidia-ml
    assert "nvidia.com/gpu" not in str(container.get("resources"))
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def test_stopping_leaves_time_to_restore_the_originals(pod):
    unit = (REPO / "systemd" / "gpucostd.service").read_text()
    stop = int(re.search(r"^TimeoutStopSec=(\d+)", unit, re.M).group(1))
    assert pod["terminationGracePeriodSeconds"] >= stop


def test_the_podmonitor_scrapes_the_pod_as_job_gpucostd(objs, container):
    pm = docs("podmonitor.yaml")["PodMonitor"]["spec"]
    labels = objs["DaemonSet"]["spec"]["template"]["metadata"]["labels"]
    assert pm["selector"]["matchLabels"].items() <= labels.items()
    assert labels[pm["jobLabel"]] == "gpucostd"                # the rules assume job="gpucostd"
    (ep,) = pm["podMetricsEndpoints"]
    assert ep["port"] == container["ports"][0]["name"] and ep["path"] == "/metrics"
    assert pm["namespaceSelector"]["matchNames"] == [objs["Namespace"]["metadata"]["name"]]


def test_the_prometheusrule_carries_exactly_the_rules_file():
    rule = (K8S / "prometheusrule.yaml").read_text()
    assert "kind: PrometheusRule" in rule
    spec = rule.split("\nspec:\n", 1)[1]
    rules = (REPO / "packaging" / "prometheus" / "gpucostd-rules.yml").read_text()
    groups = rules[rules.index("groups:"):]
    assert spec == "".join(("  " + ln if ln.strip() else ln) for ln in groups.splitlines(True)), \
        "prometheusrule.yaml is out of date: regenerate it (see its header)"


def test_the_drain_rbac_is_bound_to_the_daemonsets_service_account(objs, pod):
    """The verbs themselves are checked against the back end's own requests in
    tests/test_drain_kubernetes.py; here: the bindings reach the pod's service account."""
    evict = docs("drain-evict.yaml")
    for doc in (objs, evict):
        binding = doc["ClusterRoleBinding"]
        assert binding["roleRef"]["name"] == doc["ClusterRole"]["metadata"]["name"]
        (subject,) = binding["subjects"]
        assert (subject["kind"], subject["name"], subject["namespace"]) == \
            ("ServiceAccount", pod["serviceAccountName"], objs["ServiceAccount"]["metadata"][
                "namespace"])
    assert not (K8S / "cordon-hook.yaml").exists()       # the drain back end replaced it


def test_the_daemonset_runs_the_image_of_this_version(container):
    import sys
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert container["image"] == f"gpucostd:{version}", \
        "bump the image tag in packaging/kubernetes/gpucostd.yaml with the version"

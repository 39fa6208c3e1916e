"""The container image (packaging/kubernetes/build-image.sh: a debootstrap rootfs with the .deb,
packed as an OCI layout by our oci-pack.py): its layout is valid, it matches the DaemonSet, and
its filesystem, run with systemd-nspawn, serves `gpucostd run --simulate`.

Slow the first time (debootstrap, packaging/build.sh); the base rootfs and the image are cached
(build/image/SOURCE) and rebuilt only when the .deb changes. The .deb is dist/'s, the one
packaging/build.sh last built (it is built when missing); rebuild it to test a changed tree."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import REPO, free_port, http_get, metric_value, wait_for

K8S = REPO / "packaging" / "kubernetes"
LAYOUT = REPO / "build" / "image" / "gpucostd-oci"
BASE = os.environ.get("GPUCOSTD_IMAGE_BASE", "/var/cache/gpucostd-image/bookworm-base")


def _skip_reason():
    if os.geteuid() != 0:
        return "needs root: debootstrap, dpkg in a chroot and systemd-nspawn"
    if shutil.which("systemd-nspawn") is None:
        return "systemd-nspawn not installed (apt-get install systemd-container)"
    if not os.path.isfile(os.path.join(BASE, "etc/debian_version")) and \
            shutil.which("debootstrap") is None:
        return "no cached base rootfs and no debootstrap (apt-get install debootstrap)"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.root,
              pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]


@pytest.fixture(scope="module")
def layout():
    from test_packaging import build_lock, built_packages
    built_packages()        # this tree's .deb, built once per run (other workers share it)
    with build_lock():      # no packaging/build.sh rewrites dist/ while the image reads it
        r = subprocess.run([str(K8S / "build-image.sh")], cwd=str(REPO), capture_output=True,
                           text=True, timeout=1500)
    assert r.returncode == 0, f"build-image.sh failed:\n{r.stdout}\n{r.stderr[-4000:]}"
    return LAYOUT


def _blob(layout, digest):
    return (layout / "blobs" / "sha256" / digest.partition(":")[2]).read_bytes()


def test_the_oci_layout_is_valid_and_matches_the_daemonset(layout):
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    (desc,) = index["manifests"]
    manifest_bytes = _blob(layout, desc["digest"])
    assert len(manifest_bytes) == desc["size"]
    assert "sha256:" + hashlib.sha256(manifest_bytes).hexdigest() == desc["digest"]
    manifest = json.loads(manifest_bytes)
    for d in [manifest["config"]] + manifest["layers"]:
        data = _blob(layout, d["digest"])
        assert len(data) == d["size"] and "sha256:" + hashlib.sha256(data).hexdigest() == \
            d["digest"]
    config = json.loads(_blob(layout, manifest["config"]["digest"]))
    assert config["os"] == "linux" and config["rootfs"]["type"] == "layers"
    assert config["config"]["Entrypoint"] == ["/usr/bin/gpucostd"]
    assert "9477/tcp" in config["config"]["ExposedPorts"]
    # the DaemonSet runs this image with args ["run", "--config", ...] on port 9477
    from gpucostd.views.webconfig import parse_yaml_documents
    ds = [d for d in parse_yaml_documents((K8S / "gpucostd.yaml").read_text(), "k8s")
          if d["kind"] == "DaemonSet"][0]
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    name, _, tag = c["image"].partition(":")
    assert name == "gpucostd" and tag == desc["annotations"]["org.opencontainers.image.ref.name"]
    assert c["ports"][0]["containerPort"] == 9477 and c["args"][0] == "run"
    assert (layout.parent / "gpucostd-oci.tar").is_file()


def test_the_image_runs_the_simulated_daemon_and_is_scraped(layout, tmp_path):
    rootfs = tmp_path / "rootfs"
    r = subprocess.run([sys.executable, str(K8S / "oci-pack.py"), "--unpack", str(layout),
                        str(rootfs)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    port = free_port()
    (rootfs / "etc/gpucostd/test.toml").write_text(
        f'[daemon]\ninterval_seconds = 0.5\nlisten_address = "127.0.0.1:{port}"\n'
        f'socket_path = "/run/gpucostd/gpucostd.sock"\nstate_dir = "/var/lib/gpucostd"\n'
        f'kernel_log = "none"\n')
    log = open(tmp_path / "nspawn.log", "wb")
    # the host's network (no --private-network): the test scrapes 127.0.0.1:port
    proc = subprocess.Popen(["systemd-nspawn", "--quiet", "--register=no", "--keep-unit",
                             "--kill-signal=SIGTERM",   # nspawn forwards our SIGTERM to PID 1
                             "--machine", f"gpucostd-image-{port}", "-D", str(rootfs),
                             "/usr/bin/gpucostd", "run", "--simulate",
                             "--config", "/etc/gpucostd/test.toml"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready():
            if proc.poll() is not None:
                raise AssertionError((tmp_path / "nspawn.log").read_text())
            return http_get(url + "/healthz", timeout=1)[0] == 200
        wait_for(ready, 60, interval=0.5, what="the daemon in the image answering /healthz")
        code, text = http_get(url + "/metrics")
        assert code == 200
        assert sum(1 for i in range(8) if metric_value(text, "gpucostd_gpu_info", gpu=str(i))) \
            == 8
        assert metric_value(text, "gpucostd_nvml_up") == 1
        code, page = http_get(url + "/")
        assert code == 200 and "gpucostd" in page
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    out = (tmp_path / "nspawn.log").read_text()
    assert "Traceback" not in out, out
    assert proc.returncode == 0, out

"""Shared test helpers: wait-with-deadline, free ports, a running daemon process."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# pytest-xdist runs the suite on several workers (pyproject.toml: addopts). Tests that share
# state run in one group each, on one worker, one after another: the kernel's /dev/kmsg (lines
# one test writes would reach another's daemon; printk_devkmsg), the network namespaces and
# veth pairs, each booted container with the tests that use it (test_nspawn's module fixture
# per Debian release), the upgrade proof, the Python 3.13 run, the package tests and the
# image. The packages are built once per run by whichever worker asks first (test_packaging:
# built_packages, under a lock); the root filesystem caches are made under a lock too.
#
# The groups are this file's own scheduler (pytest_xdist_make_scheduler below): xdist's
# loadgroup marks a group by appending "@group" to the node id, which pytest 9 no longer lets
# it change, so its groups silently split.
XDIST_GROUPS = {"test_packaging.py": "packaging", "test_image.py": "image",
                "test_kmsg_root.py": "kmsg", "test_tuners_nic.py": "netns",
                "test_live_server.py": "live_server",     # one llama.cpp venv and server
                "test_drain_slurm.py": "slurm",           # one slurmctld, slurmd and munged
                # a module-scoped fixture that starts processes, shared by the module's tests
                # only when they run on one worker (as units of their own, each worker that
                # ran one started its own): Prometheus and two daemons, a daemon's scrape
                "test_prometheus.py": "prometheus", "test_docs.py": "docs",
                "test_metrics_reference.py": "metrics_reference"}
# tests elsewhere that use the writable_kmsg fixture (collection fails on one not listed)
KMSG_TESTS = {
    ("test_health_integration.py",
     "test_kmsg_line_reaches_status_and_events_within_a_second_and_once_after_restart"),
    ("test_health_integration.py",
     "test_simulated_node_ignores_the_hosts_kernel_log_unless_the_config_names_it"),
    ("test_health_nvidia_integration.py",
     "test_xid_154_makes_the_recovery_action_be_read_at_once"),
    ("test_reliability.py",
     "test_kernel_log_flood_loss_is_a_metric_a_status_field_and_a_finding"),
}
# the long groups start first (mostly waiting on containers: they overlap the rest), the
# package tests and the image last (the containers' groups have built the packages by then)
FIRST = ("nspawn-30", "nspawn-bookworm", "nspawn-trixie", "nspawn-20", "live_server")
LAST = ("packaging", "image")


def xdist_group_of(nodeid: str) -> "str | None":
    path, _, rest = nodeid.partition("::")
    name = path.rsplit("/", 1)[-1]
    if name == "test_nspawn.py":
        if rest.endswith("]"):
            return "nspawn-" + rest[rest.rindex("[") + 1:-1]      # [bookworm], [trixie]
        return "nspawn-" + rest.split("_")[1]                       # test_20_..., test_30_...
    if (name, rest.split("[")[0]) in KMSG_TESTS:
        return "kmsg"
    return XDIST_GROUPS.get(name)


def pytest_itemcollected(item):
    if "writable_kmsg" in getattr(item, "fixturenames", ()) and \
            xdist_group_of(item.nodeid) != "kmsg":
        raise pytest.UsageError(f"{item.nodeid} uses writable_kmsg: add it to KMSG_TESTS in "
                                f"tests/conftest.py (its tests run one at a time)")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        group = xdist_group_of(item.nodeid)
        if group in FIRST:
            return FIRST.index(group)
        return len(FIRST) + (1 + LAST.index(group) if group in LAST else 0)
    items.sort(key=rank)            # stable: the order inside a rank stays


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        """Each group one unit of work on one worker; every other test a unit of its own."""

        def _split_scope(self, nodeid: str) -> str:
            return xdist_group_of(nodeid) or nodeid

    return GroupScheduling(config, log)


def wait_for(cond, timeout=10.0, interval=0.05, what="condition"):
    """Poll cond() until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = cond()
        except Exception as e:  # noqa: BLE001 - keep polling until the deadline
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


@pytest.fixture
def sim_nvml():
    """The simulated NVML below the real pynvml (skipped without nvidia-ml-py).

    sim_nvml(scenario="builtin:h100x8", clock=None, gateway=True, **gateway_kw)
    -> (node, gateway, clock). `scenario` is a builtin name or a scenario's TOML text; clock
    defaults to a new VirtualClock. With gateway=False no NvmlGateway is made (None in its
    place): the library is installed as pynvml's loaded one and nvmlInit called, for tests of
    the simulator at the library boundary. Afterwards the nodes are closed (hung calls
    return), the gateways shut down and pynvml's own library restored."""
    pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py (pynvml) is not installed")
    from gpucostd.clock import VirtualClock
    from gpucostd.hw.nvml import NvmlGateway
    from gpucostd.sim.nvml import SimulatedNode
    from gpucostd.sim.scenario import parse_scenario

    saved = pynvml.nvmlLib
    nodes, gateways = [], []

    def make(scenario="builtin:h100x8", clock=None, gateway=True, **gateway_kw):
        clock = clock or VirtualClock()
        if isinstance(scenario, str) and not scenario.startswith("builtin:"):
            scenario = parse_scenario(scenario, "test.toml")
        node = SimulatedNode(scenario, clock)
        nodes.append(node)
        if not gateway:
            with pynvml.libLoadLock:
                pynvml.nvmlLib = node.library
                pynvml._nvmlGetFunctionPointer_cache.clear()
            pynvml.nvmlInit()
            return node, None, clock
        gw = NvmlGateway(library=node.library, clock=clock, **gateway_kw)
        gateways.append(gw)
        return node, gw, clock

    yield make
    for node in nodes:
        node.close()
    for gw in gateways:
        gw.shutdown()
    with pynvml.libLoadLock:
        pynvml.nvmlLib = saved
        pynvml._nvmlGetFunctionPointer_cache.clear()


_PORTS = {"next": None}


def free_port() -> int:
    """A loopback port no other test worker will be handed.

    Port 0 would give one from the kernel's ephemeral range, which every
    outgoing connection on the host also draws from: a port probed free here
    could be a client's source port (or another worker's pick) by the time
    the daemon binds it. So each xdist worker walks its own block of 400
    ports below the ephemeral range (from 20000) and hands out one that binds.
    The blocks of one run start at an offset drawn from the run's id (the pid
    without xdist), so two runs on one machine (the Debian 13 container's beside the host's) seldom
    walk the same block.
    """
    if _PORTS["next"] is None:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
        index = int(worker[2:]) if worker[2:].isdigit() else 0
        run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
        index += zlib.crc32(run.encode())
        _PORTS["base"] = 20000 + 400 * (index % 30)
        _PORTS["next"] = 0
    for _ in range(400):
        port = _PORTS["base"] + _PORTS["next"]
        _PORTS["next"] = (_PORTS["next"] + 1) % 400
        with socket.socket() as s:
            # no SO_REUSEADDR: a port an earlier test's connections still hold in TIME_WAIT
            # is skipped, so a caller that binds without it gets the port too
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free loopback port in this worker's block")


def http_get(url, timeout=2.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def gpucostd_cmd():
    return [sys.executable, "-m", "gpucostd"]


class DaemonProcess:
    """`gpucostd run` as a subprocess with its own config, socket, state dir and port."""

    def __init__(self, tmp: Path, extra_config: str = "", scenario: str = "builtin:h100x8",
                 state_dir: Path = None, kernel_log: str = "none", interval: float = 0.2):
        self.tmp = tmp
        self.port = free_port()
        self.socket = str(tmp / "gpucostd.sock")
        self.state_dir = state_dir or (tmp / "state")
        self.config = tmp / "gpucostd.toml"
        self.scenario = scenario
        self.base_config = (
            f'[daemon]\ninterval_seconds = {interval}\nlisten_address = "127.0.0.1:{self.port}"\n'
            f'socket_path = "{self.socket}"\nstate_dir = "{self.state_dir}"\n'
            f'kernel_log = "{kernel_log}"\n')
        self.write_config(extra_config)
        self.proc = None
        self.log = tmp / f"daemon-{self.port}.log"

    def write_config(self, extra: str = "") -> None:
        self.config.write_text(self.base_config + extra)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait=True):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("NOTIFY_SOCKET", None)
        env.pop("JOURNAL_STREAM", None)
        self._logf = open(self.log, "ab")
        simulate = ["--simulate", self.scenario] if self.scenario else []
        self.proc = subprocess.Popen(
            gpucostd_cmd() + ["run", "--config", str(self.config)] + simulate,
            stdout=self._logf, stderr=subprocess.STDOUT, env=env)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout=30.0):
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.output()}")
            return http_get(self.url + "/healthz", timeout=1)[0] == 200
        try:
            wait_for(ready, timeout, what="daemon /healthz 200")
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- daemon output ---\n{self.output()}") from None

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def metrics(self) -> str:
        code, body = http_get(self.url + "/metrics")
        assert code == 200, body
        return body

    def cli(self, *args, timeout=30):
        return subprocess.run(gpucostd_cmd() + list(args) + ["--config", str(self.config)],
                              capture_output=True, text=True, timeout=timeout)

    def status_json(self):
        r = self.cli("status", "--json")
        return r.returncode, json.loads(r.stdout)

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, timeout=10.0):
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not stop within {timeout} s:\n{self.output()}")
        finally:
            self._logf.close()


def metric_value(text: str, name: str, **labels):
    """Value of one sample in exposition text, or None."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if head == name and not labels:
            return float(value)
        if head.startswith(name + "{") and all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None


@pytest.fixture
def daemon_factory(tmp_path):
    started = []

    def make(**kw):
        d = DaemonProcess(tmp_path, **kw)
        started.append(d)
        return d
    yield make
    for d in started:
        try:
            d.stop()
        except AssertionError:
            pass


def need_root(reason: str):
    return pytest.mark.skipif(os.geteuid() != 0, reason=f"needs root: {reason}")


KMSG = "/dev/kmsg"
DEVKMSG = Path("/proc/sys/kernel/printk_devkmsg")


NVIDIA_DRIVER_SIGNS = ("proc/driver/nvidia", "sys/module/nvidia")


def nvidia_driver_loaded(root: str = "/"):
    """Why this host's kernel log must not get test lines (an NVIDIA driver is loaded), or
    None. On a GPU node the kernel log is watched (gpud, DCGM, node-problem-detector, gpucostd
    itself): a test Xid line would page whoever watches it, and a flood would push the real
    lines out of the ring buffer."""
    for sign in NVIDIA_DRIVER_SIGNS:
        path = os.path.join(root, sign)
        if os.path.exists(path):
            return (f"an NVIDIA driver is loaded ({'/' + sign} exists): this test writes "
                    "Xid-shaped lines (or a flood) into /dev/kmsg, which the kernel log's "
                    "watchers on a GPU node would take for GPU faults; run it on a host "
                    "without the driver (CI, a VM)")
    return None


def kmsg_write_refusal():
    """Why a test may not write to /dev/kmsg here (not root, not writable, a GPU node), or
    None."""
    if os.geteuid() != 0:
        return ("needs root: writes test lines to /dev/kmsg and sets "
                "/proc/sys/kernel/printk_devkmsg (run the suite as root, e.g. in CI)")
    driver = nvidia_driver_loaded()
    if driver:
        return driver
    if not os.access(KMSG, os.R_OK | os.W_OK):
        return f"{KMSG} is not readable and writable here (container without kmsg?)"
    return None


@pytest.fixture
def writable_kmsg():
    """/dev/kmsg writable without rate limit (printk_devkmsg=on), restored afterwards; skips
    where kmsg_write_refusal() says why not (never on a host with an NVIDIA driver)."""
    refusal = kmsg_write_refusal()
    if refusal:
        pytest.skip(refusal)
    old = None
    try:
        if DEVKMSG.exists():
            old = DEVKMSG.read_text().strip()
            try:
                DEVKMSG.write_text("on\n")     # no rate limit on our writes
            except OSError as e:
                pytest.skip(f"cannot set {DEVKMSG} to on: {e}")
        yield
    finally:
        if old is not None:
            DEVKMSG.write_text(old + "\n")


def write_kmsg(text):
    """One line into the host's kernel log: only from a test that took `writable_kmsg` (or
    checked kmsg_write_refusal()), so never on a GPU node."""
    refusal = kmsg_write_refusal()
    if refusal:
        raise AssertionError(f"write_kmsg refused: {refusal}")
    fd = os.open(KMSG, os.O_WRONLY)
    try:
        os.write(fd, f"<4>{text}\n".encode())
    finally:
        os.close(fd)


def exposition(families) -> str:
    """Render metric families (an iterable, e.g. module.metric_families(snapshot)) as a scrape."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.registry import CollectorRegistry

    fams = list(families)

    class _Collector:
        def collect(self):
            return fams
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return generate_latest(registry).decode()


def builtin_throttled_from(t: float) -> str:
    """builtin:h100x8's TOML with GPU 0's HW thermal slowdown (1410 MHz) from `t` instead of
    20 s, for process tests that wait for it in real time; the same GPUs (UUIDs, bus ids), so a
    daemon on the builtin afterwards is the same node."""
    from gpucostd.sim.scenario import BUILTIN_DIR
    text = (Path(BUILTIN_DIR) / "h100x8.toml").read_text()
    assert text.count("\nt = 20\n") == 1, "builtin:h100x8 changed: update builtin_throttled_from"
    return text.replace("\nt = 20\n", f"\nt = {t:g}\n")

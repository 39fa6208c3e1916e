"""NIC ring buffers: validation with a fake netlink object, and the real kernel in a network
namespace made by the test (root only). The host's own NICs are only ever read, never changed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gpucostd.clock import VirtualClock
from gpucostd.config import parse
from gpucostd.hw.netlink import NetlinkError, Rings
from gpucostd.probes.host import HostProbe
from gpucostd.tuners.manager import TuningManager, format_plan
from gpucostd.tuners.originals import OriginalsStore

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "host"


class FakeNetlink:
    """The daemon.netlink.Netlink surface over dicts: {ifname: (current, maximum)}."""

    def __init__(self, nics, unsupported=(), driver=None, sticky=()):
        self.nics = {k: (dict(c), dict(m)) for k, (c, m) in nics.items()}
        self.unsupported = set(unsupported)
        self.driver_name = driver
        self.sticky = set(sticky)       # writes accepted but ignored (a masked error)
        self.writes = []

    def _check(self, ifname):
        if ifname not in self.nics:
            raise NetlinkError("no_device", ifname, f"{ifname}: no such network interface")
        if ifname in self.unsupported:
            d = self.driver_name
            raise NetlinkError("not_supported", ifname, f"{ifname}: "
                               f"{'driver ' + d if d else 'its driver'} does not support ring "
                               f"buffer changes", 95, d)

    def get_rings(self, ifname):
        self._check(ifname)
        cur, mx = self.nics[ifname]
        return Rings(ifname, dict(cur), dict(mx))

    def set_rings(self, ifname, values):
        self._check(ifname)
        self.writes.append((ifname, dict(values)))
        if ifname not in self.sticky:
            self.nics[ifname][0].update(values)
        after = self.get_rings(ifname)
        for q, v in values.items():
            if after.current.get(q) != v:
                raise NetlinkError("not_applied", ifname, f"{ifname}: ring sizes not applied: "
                                   f"asked {q} = {v} (NIC reports {after.current.get(q)})")
        return after

    def close(self):
        pass


def make(tmp_path, text, netlink, host_root=None, gateway=None, interval=5):
    cfg = parse(f"[tuning]\nverify_interval_seconds = {interval}\n" + text)
    clock = VirtualClock()
    from gpucostd.probes.host import HostProbe
    m = TuningManager(cfg, gateway, str(tmp_path / "state"), clock, netlink=netlink,
                      nic_driver=HostProbe(str(host_root or tmp_path)).nic_driver)
    return m, clock


def by_key(items):
    return {(s.name, s.subject): s for s in items}


ETH0 = {"eth0": ({"rx": 1024, "tx": 1024}, {"rx": 8192, "tx": 4096})}


def test_ring_above_max_is_refused_and_others_apply(tmp_path):
    nl = FakeNetlink(ETH0)
    m, _ = make(tmp_path, "[tuning.nic.eth0]\nrx = 16384\ntx = \"max\"\n", nl)
    plan = by_key(m.plan(()))
    rx, tx = plan[("ring_rx", "nic:eth0")], plan[("ring_tx", "nic:eth0")]
    assert rx.error == 'eth0: rx = 16384 is above the maximum 8192 of the NIC; allowed ' \
                       '1..8192 or "max"'
    assert (tx.desired, tx.actual, tx.error) == (4096, 1024, None)
    assert tx.source == 'tuning.nic.eth0 ("max")'
    changes = m.apply(())
    assert [(c.name, c.ok) for c in changes] == [("ring_rx", False), ("ring_tx", True)]
    assert nl.writes == [("eth0", {"tx": 4096})]             # nothing written for rx
    assert nl.nics["eth0"][0] == {"rx": 1024, "tx": 4096}
    assert m.nic_rings == {"eth0": {"current": {"rx": 1024, "tx": 4096},
                                    "max": {"rx": 8192, "tx": 4096}}}
    store = OriginalsStore(str(tmp_path / "state"))
    assert store.get("ring_tx", "nic:eth0") == (True, 1024)
    assert not store.get("ring_rx", "nic:eth0")[0]


def test_missing_interface_and_unsupported_driver_are_errors_in_words(tmp_path):
    nl = FakeNetlink(ETH0 | {"veth9": ({}, {})}, unsupported={"veth9"}, driver="veth")
    text = ("[tuning.nic.eth3]\nrx = 256\n[tuning.nic.veth9]\nrx = 256\n"
            "[tuning.nic.eth0]\nrx = 2048\n")
    m, _ = make(tmp_path, text, nl)
    changes = {c.subject: c for c in m.apply(())}
    assert changes["nic:eth3"].error == "eth3: no such network interface"
    assert changes["nic:veth9"].error == "veth9: driver veth does not support ring buffer changes"
    assert changes["nic:eth0"].ok and nl.nics["eth0"][0]["rx"] == 2048


def test_unsupported_driver_name_from_sysfs_when_netlink_cannot_tell(tmp_path):
    nl = FakeNetlink({"ens1f0np0": ({}, {})}, unsupported={"ens1f0np0"}, driver=None)
    m, _ = make(tmp_path, "[tuning.nic.ens1f0np0]\nrx = 256\n", nl,
                host_root=FIXTURES / "intel_iommu_on")
    (s,) = m.plan(())
    assert s.error == "ens1f0np0: driver mlx5_core does not support ring buffer changes"


def test_queue_the_nic_does_not_have_is_refused(tmp_path):
    nl = FakeNetlink(ETH0)
    m, _ = make(tmp_path, "[tuning.nic.eth0]\nrx_jumbo = 512\n", nl)
    (s,) = m.plan(())
    assert "the NIC has no rx_jumbo ring" in s.error
    assert m.apply(()) and nl.writes == []


def test_write_that_does_not_stick_is_an_error(tmp_path):
    nl = FakeNetlink(ETH0, sticky={"eth0"})
    m, _ = make(tmp_path, "[tuning.nic.eth0]\nrx = 2048\n", nl)
    (c,) = m.apply(())
    assert not c.ok and "NIC reports 1024" in c.error
    # nothing changed after all: no original left to restore
    assert len(OriginalsStore(str(tmp_path / "state"))) == 0


def test_nic_drift_and_restore(tmp_path):
    nl = FakeNetlink(ETH0)
    m, clock = make(tmp_path, "[tuning.nic.eth0]\nrx = \"max\"\n", nl)
    m.apply(())
    nl.nics["eth0"][0]["rx"] = 512                     # someone ran ethtool -G
    clock.advance(5)
    settings, events = m.verify((), clock.monotonic())
    assert len(events) == 1 and events[0].subject == "nic:eth0"
    assert "from 8192 to 512" in events[0].message
    assert nl.nics["eth0"][0]["rx"] == 8192
    changes = m.restore()
    assert [(c.name, c.old, c.new, c.ok) for c in changes] == [("ring_rx", 8192, 1024, True)]
    assert nl.nics["eth0"][0]["rx"] == 1024
    assert "eth0" in format_plan(m.plan(()))


# ------------------------------------------------------------------ real kernel (root)
def _need_root_and_ip():
    if os.geteuid() != 0:
        pytest.skip("needs root to create a network namespace (run the suite as root)")
    if shutil.which("ip") is None:
        pytest.skip("needs the `ip` command (iproute2) to create a network namespace")
    pytest.importorskip("pyroute2", reason="pyroute2 is not installed")


@pytest.fixture
def veth_netns():
    """A network namespace gpucostd-test-<pid> with a veth pair gct0/gct1; always removed."""
    _need_root_and_ip()
    name = f"gpucostd-test-{os.getpid()}"
    created = False
    try:
        r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot create a network namespace: {r.stderr.strip()}")
        created = True
        r = subprocess.run(["ip", "-n", name, "link", "add", "gct0", "type", "veth", "peer",
                            "name", "gct1"], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot create a veth pair: {r.stderr.strip()}")
        yield name
    finally:
        if created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.root
def test_veth_in_netns_gives_the_clear_not_supported_error(tmp_path, veth_netns):
    from gpucostd.hw.netlink import Netlink
    from test_tuners_gpu import FakeGateway, readings

    gw = FakeGateway(n=2)
    nl = Netlink(netns=veth_netns)
    try:
        text = ("[tuning.gpu]\npower_limit_watts = 600\n"
                "[tuning.nic.gct0]\nrx = 256\n[tuning.nic.nosuch0]\ntx = 256\n")
        m, _ = make(tmp_path, text, nl, gateway=gw)
        changes = {(c.name, c.subject): c for c in m.apply(readings(gw))}
        err = changes[("ring_rx", "nic:gct0")].error
        print("veth error:", err)
        assert err == "gct0: driver veth does not support ring buffer changes"
        assert changes[("ring_tx", "nic:nosuch0")].error == "nosuch0: no such network interface"
        assert changes[("power_limit_watts", "gpu:0")].ok        # other settings still apply
        assert gw.limits == {0: 600.0, 1: 600.0}
        with pytest.raises(NetlinkError) as ei:                  # the raw module, too
            nl.set_rings("gct1", {"rx": 256})
        assert ei.value.kind == "not_supported" and ei.value.driver == "veth"
        assert ei.value.errno == 95
    finally:
        nl.close()


class ReadOnlyNetlink:
    """Wraps the real Netlink and refuses writes: the host's NICs must never be changed."""

    def __init__(self, inner):
        self.inner = inner

    def get_rings(self, ifname):
        return self.inner.get_rings(ifname)

    def set_rings(self, ifname, values):
        raise AssertionError(f"test tried to change the host NIC {ifname}")

    def close(self):
        self.inner.close()


def test_host_nic_rings_can_be_read(tmp_path):
    """Reading rings needs no privilege; the test never writes (ReadOnlyNetlink)."""
    pytest.importorskip("pyroute2", reason="pyroute2 is not installed")
    from gpucostd.hw.netlink import Netlink
    nl = Netlink()
    try:
        found = None
        for nic in HostProbe("/").nics():
            if nic.virtual:
                continue
            try:
                rings = nl.get_rings(nic.name)
            except NetlinkError:
                continue
            if rings.maximum:
                found = (nic, rings)
                break
        if found is None:
            pytest.skip("no host NIC reports ring sizes (a virtio or physical NIC does)")
        nic, rings = found
        for q, mx in rings.maximum.items():
            assert 0 < rings.current[q] <= mx
        # the manager's plan reads them too (read-only wrapper: a write would fail the test)
        m, _ = make(tmp_path, f'[tuning.nic.{nic.name}]\nrx = "max"\n', ReadOnlyNetlink(nl))
        (s,) = m.plan(())
        assert s.error is None and s.desired == rings.maximum["rx"]
        assert s.actual == rings.current["rx"]
        assert nl.driver(nic.name) == nic.driver
    finally:
        nl.close()


@pytest.mark.root
def test_without_cap_net_admin_the_error_names_the_capability(veth_netns):
    """The real kernel's EPERM, from a child that dropped CAP_NET_ADMIN (setpriv), on the
    namespace's veth (never a host NIC)."""
    import sys
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to drop CAP_NET_ADMIN")
    code = ("import sys\nfrom gpucostd.hw.netlink import Netlink, NetlinkError\n"
            "n = Netlink(netns=sys.argv[1])\n"
            "try:\n    n.set_rings('gct0', {'rx': 256})\n"
            "except NetlinkError as e:\n    print(e.kind); print(e)\n")
    r = subprocess.run(["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin",
                        sys.executable, "-c", code, veth_netns],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    kind, message = r.stdout.splitlines()[:2]
    assert kind == "no_permission"
    assert message == ("gct0: changing ring buffers needs CAP_NET_ADMIN (run gpucostd as root "
                       "or give the service AmbientCapabilities=CAP_NET_ADMIN)")


def test_errno_mapping_without_root():
    import errno
    from gpucostd.hw.netlink import Netlink
    nl = Netlink()
    nl.driver = lambda ifname: None          # no ioctl here
    assert nl._map("eth9", errno.ENODEV, "x").kind == "no_device"
    assert nl._map("eth9", errno.EPERM, "x").kind == "no_permission"
    e = nl._map("eth9", errno.EOPNOTSUPP, "x")
    assert (e.kind, str(e)) == ("not_supported",
                                "eth9: its driver does not support ring buffer changes")
    assert nl._map("eth9", errno.EINVAL, "Invalid argument").kind == "invalid"
    assert nl._map("eth9", errno.EBUSY, "busy").kind == "other"


def test_ring_without_a_current_value_is_not_written(tmp_path):
    """No current value = no original to save: writing would leave a setting that can never
    be restored (the saved original would be null)."""
    nl = FakeNetlink({"eth0": ({"tx": 1024}, {"rx": 8192, "tx": 4096})})
    m, _ = make(tmp_path, "[tuning.nic.eth0]\nrx = 4096\ntx = 2048\n", nl)
    changes = {c.name: c for c in m.apply(())}
    assert not changes["ring_rx"].ok and "cannot be read" in changes["ring_rx"].error
    assert changes["ring_tx"].ok
    assert nl.writes == [("eth0", {"tx": 2048})]
    store = OriginalsStore(str(tmp_path / "state"))
    assert store.get("ring_rx", "nic:eth0") == (False, None)
    assert all(c.ok for c in m.restore()) and nl.nics["eth0"][0] == {"tx": 1024}


def test_kernel_without_ethtool_netlink_says_what_is_needed():
    import errno

    from gpucostd.hw.netlink import Netlink
    err = Netlink()._map("eth0", errno.ENOENT, "No such file or directory")
    assert err.kind == "unavailable"
    assert str(err) == ("eth0: cannot use ethtool netlink: the kernel has no ethtool netlink "
                        "interface (Linux 5.6 or newer is needed to read and change ring "
                        "buffers)")

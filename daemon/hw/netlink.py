"""NIC ring buffers through ethtool netlink: the only module that imports pyroute2.

pyroute2 is imported lazily (inside the methods), so `gpucostd status` and any host without NIC
tuning never load it. We use the generic-netlink ethtool socket (``NlEthtool``) directly, not
pyroute2's high-level ``Ethtool`` class: that one silently falls back to the ioctl interface on
any netlink error, which hides the kernel's answer (EOPNOTSUPP, EPERM). Every write is read back,
because a write that the kernel (or pyroute2) accepted is not proof that the NIC took it.

Works inside a named network namespace (``Netlink(netns="name")``, as made by ``ip netns add``),
which is how the tests exercise the real kernel without touching the host's own NICs.

Errors are ``NetlinkError`` with ``kind``:
  not_supported (EOPNOTSUPP) · no_permission (EPERM/EACCES: needs CAP_NET_ADMIN) ·
  no_device (ENODEV) · invalid (EINVAL/ERANGE) · not_applied (read-back differs) ·
  unavailable (pyroute2 missing, netlink socket cannot be opened) · other.
str() is the message for the user, naming the interface.
"""
from __future__ import annotations

import array
import errno as _errno
import fcntl
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

# ethtool ring queues as named in the config ([tuning.nic.X] rx/tx/rx_mini/rx_jumbo)
RING_QUEUES = ("rx", "tx", "rx_mini", "rx_jumbo")
_ATTRS = {
    "rx": ("ETHTOOL_A_RINGS_RX", "ETHTOOL_A_RINGS_RX_MAX"),
    "rx_mini": ("ETHTOOL_A_RINGS_RX_MINI", "ETHTOOL_A_RINGS_RX_MINI_MAX"),
    "rx_jumbo": ("ETHTOOL_A_RINGS_RX_JUMBO", "ETHTOOL_A_RINGS_RX_JUMBO_MAX"),
    "tx": ("ETHTOOL_A_RINGS_TX", "ETHTOOL_A_RINGS_TX_MAX"),
}
_SIOCETHTOOL = 0x8946
_ETHTOOL_GDRVINFO = 0x00000003
_DRVINFO_SIZE = 196     # struct ethtool_drvinfo


class NetlinkError(Exception):
    def __init__(self, kind: str, ifname: str, message: str, errno: Optional[int] = None,
                 driver: Optional[str] = None):
        super().__init__(message)
        self.kind = kind
        self.ifname = ifname
        self.errno = errno
        self.driver = driver


@dataclass(frozen=True)
class Rings:
    """Ring sizes of one interface. A queue the NIC does not have is absent from both maps
    (the kernel leaves out a queue whose maximum is 0)."""

    ifname: str
    current: Mapping[str, int] = field(default_factory=dict)
    maximum: Mapping[str, int] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Dict[str, int]]:
        return {"current": dict(self.current), "max": dict(self.maximum)}


def error_message(kind: str, ifname: str, driver: Optional[str] = None,
                  detail: str = "") -> str:
    """The user-facing text for an error kind (also used by the tuner with a sysfs driver)."""
    if kind == "not_supported":
        who = f"driver {driver}" if driver else "its driver"
        return f"{ifname}: {who} does not support ring buffer changes"
    if kind == "no_permission":
        return (f"{ifname}: changing ring buffers needs CAP_NET_ADMIN (run gpucostd as root or "
                f"give the service AmbientCapabilities=CAP_NET_ADMIN)")
    if kind == "no_device":
        return f"{ifname}: no such network interface"
    if kind == "unavailable":
        return f"{ifname}: cannot use ethtool netlink: {detail}"
    return f"{ifname}: {detail}" if detail else f"{ifname}: ring buffer request failed"


class Netlink:
    """Ring buffer get/set for interfaces in the current (or a named) network namespace."""

    def __init__(self, netns: Optional[str] = None):
        self.netns = netns
        self._sock = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ plumbing
    def _socket(self, ifname: str):
        if self._sock is not None:
            return self._sock
        try:
            from pyroute2.netlink.generic.ethtool import NlEthtool
        except ImportError as e:
            raise NetlinkError("unavailable", ifname, error_message(
                "unavailable", ifname, detail=f"pyroute2 is not installed ({e}); install "
                "pyroute2 >= 0.7.11")) from None
        try:
            if self.netns is None:
                self._sock = NlEthtool()
            else:
                # flags=0: never create the namespace by accident
                self._sock = NlEthtool(netns=self.netns, flags=0)
        except OSError as e:
            raise NetlinkError("unavailable", ifname, error_message(
                "unavailable", ifname, detail=f"{e.strerror or e}"
                + (f" (network namespace {self.netns!r})" if self.netns else ""))) from None
        return self._sock

    def _call(self, ifname: str, fn_name: str, *args) -> list:
        from pyroute2.netlink.exceptions import NetlinkError as PyNetlinkError
        with self._lock:
            sock = self._socket(ifname)
            try:
                return list(getattr(sock, fn_name)(*args, ifname=ifname) or ())
            except PyNetlinkError as e:
                raise self._map(ifname, getattr(e, "code", None), str(e)) from None
            except OSError as e:
                self._reset()
                raise self._map(ifname, e.errno, e.strerror or str(e)) from None

    def _map(self, ifname: str, code: Optional[int], text: str) -> NetlinkError:
        if code == _errno.EOPNOTSUPP or code == getattr(_errno, "ENOTSUP", -1):
            driver = self.driver(ifname)
            return NetlinkError("not_supported", ifname,
                                error_message("not_supported", ifname, driver), code, driver)
        if code in (_errno.EPERM, _errno.EACCES):
            return NetlinkError("no_permission", ifname, error_message("no_permission", ifname),
                                code)
        if code == _errno.ENODEV:
            return NetlinkError("no_device", ifname, error_message("no_device", ifname), code)
        if code == _errno.ENOENT:    # the generic netlink family "ethtool" is not there
            return NetlinkError("unavailable", ifname, error_message(
                "unavailable", ifname, detail="the kernel has no ethtool netlink interface "
                "(Linux 5.6 or newer is needed to read and change ring buffers)"), code)
        if code in (_errno.EINVAL, _errno.ERANGE):
            return NetlinkError("invalid", ifname,
                                f"{ifname}: the kernel refused the ring sizes as invalid "
                                f"({text})", code)
        return NetlinkError("other", ifname, f"{ifname}: ethtool netlink error: {text}", code)

    def _reset(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except Exception:
                pass

    def close(self) -> None:
        with self._lock:
            self._reset()

    # ------------------------------------------------------------------ API
    def get_rings(self, ifname: str) -> Rings:
        msgs = self._call(ifname, "get_rings")
        if not msgs:
            raise NetlinkError("other", ifname, f"{ifname}: ethtool netlink sent no ring data")
        msg = msgs[0]
        current: Dict[str, int] = {}
        maximum: Dict[str, int] = {}
        for q, (cur_attr, max_attr) in _ATTRS.items():
            mx = msg.get_attr(max_attr)
            cur = msg.get_attr(cur_attr)
            if mx:      # absent or 0: the NIC has no such ring
                maximum[q] = int(mx)
                if cur is not None:
                    current[q] = int(cur)
        return Rings(ifname, current, maximum)

    def set_rings(self, ifname: str, values: Mapping[str, int]) -> Rings:
        """Write the given queue sizes, read them back and confirm. Raises NetlinkError
        (kind "not_applied" when the read-back differs from what was asked)."""
        from pyroute2.netlink.generic.ethtool import ethtool_rings_msg
        unknown = [q for q in values if q not in _ATTRS]
        if unknown:
            raise NetlinkError("invalid", ifname, f"{ifname}: unknown ring queue(s) "
                               f"{', '.join(unknown)}; queues are {', '.join(RING_QUEUES)}")
        msg = ethtool_rings_msg()
        for q, v in values.items():
            msg["attrs"].append((_ATTRS[q][0], int(v)))
        self._call(ifname, "set_rings", msg)
        after = self.get_rings(ifname)
        wrong = {q: after.current.get(q) for q, v in values.items()
                 if after.current.get(q) != int(v)}
        if wrong:
            parts = ", ".join(f"{q} = {values[q]} (NIC reports {got})" for q, got in
                              wrong.items())
            raise NetlinkError("not_applied", ifname,
                               f"{ifname}: ring sizes not applied: asked {parts}")
        return after

    def driver(self, ifname: str) -> Optional[str]:
        """Driver name via the ETHTOOL_GDRVINFO ioctl in the same namespace (virtual devices
        such as veth have no /sys/class/net/IF/device/driver); None when unknown."""
        try:
            sock = self._ioctl_socket()
        except Exception:
            return None
        try:
            buf = array.array("B", struct.pack("I", _ETHTOOL_GDRVINFO)
                              + b"\0" * (_DRVINFO_SIZE - 4))
            addr, _ = buf.buffer_info()
            ifr = struct.pack("16sP", ifname.encode()[:15], addr)
            ifr += b"\0" * (40 - len(ifr))
            fcntl.ioctl(sock.fileno(), _SIOCETHTOOL, ifr)
            name = bytes(buf[4:36]).split(b"\0", 1)[0].decode("ascii", "replace")
            return name or None
        except OSError:
            return None
        finally:
            sock.close()

    def _ioctl_socket(self) -> socket.socket:
        if self.netns is None:
            return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        from pyroute2 import netns as pnetns
        create = getattr(pnetns, "create_socket", None)
        if create is not None:
            return create(netns=self.netns, family=socket.AF_INET,
                          socket_type=socket.SOCK_DGRAM, flags=0)
        pnetns.pushns(self.netns)   # older pyroute2: switch this thread, make it, switch back
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        finally:
            pnetns.popns()

    def __enter__(self) -> "Netlink":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

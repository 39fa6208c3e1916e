"""NIC ring buffer sizes: `[tuning.nic.IFNAME]` rx / tx / rx_mini / rx_jumbo = N or "max".

Read and written through daemon/hw/netlink.py (ethtool netlink). Validation before any write: a
size above the NIC's maximum is refused, "max" takes the maximum, a queue the NIC does not have
is refused. A missing interface, or a driver that cannot change rings, is an error for that
interface's settings alone, in words: `eth3: driver veth does not support ring buffer changes`.
Each queue is written on its own and read back, so one refused queue never blocks another.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional

from gpucostd.tuners.base import Planned, TunerError

QUEUES = ("rx", "tx", "rx_mini", "rx_jumbo")
PREFIX = "ring_"


def setting_name(queue: str) -> str:
    return PREFIX + queue


class NicRingsTuner:
    names = tuple(setting_name(q) for q in QUEUES)
    kind = "nic"

    def __init__(self, netlink: Callable[[], Any],
                 nic_driver: Optional[Callable[[str], Optional[str]]] = None):
        self._netlink = netlink           # returns a daemon.netlink.Netlink (lazily made)
        self.nic_driver = nic_driver      # ifname -> its driver (the host's facts), or None
        self.rings: Dict[str, Dict[str, Dict[str, int]]] = {}   # ifname -> current/max

    # ------------------------------------------------------------------ errors
    def _error(self, exc: BaseException, ifname: str) -> TunerError:
        kind = getattr(exc, "kind", "other")
        if kind == "not_supported" and not getattr(exc, "driver", None) and self.nic_driver:
            driver = None
            try:
                driver = self.nic_driver(ifname)
            except Exception:
                pass
            if driver:
                from gpucostd.hw.netlink import error_message
                return TunerError(error_message("not_supported", ifname, driver), kind)
        text = str(exc) or type(exc).__name__
        if not text.startswith(ifname + ":"):
            text = f"{ifname}: {text}"
        return TunerError(text, kind)

    def _get(self, ifname: str):
        try:
            rings = self._netlink().get_rings(ifname)
        except TunerError:
            raise
        except Exception as e:
            self.rings.pop(ifname, None)
            raise self._error(e, ifname) from None
        self.rings[ifname] = rings.as_dict()
        return rings

    # ------------------------------------------------------------------ plan
    def plan(self, ifname: str, wanted: Mapping[str, Any]) -> List[Planned]:
        items: List[Planned] = []
        base = f"tuning.nic.{ifname}"
        for q in QUEUES:
            if q not in wanted:
                continue
            v = wanted[q]
            items.append(Planned(self, f"nic:{ifname}", setting_name(q),
                                 None if v == "max" else int(v), None,
                                 f'{base} ("max")' if v == "max" else base, ifname,
                                 target=(ifname, q)))
        if not items:
            return items
        try:
            rings = self._get(ifname)
        except TunerError as e:
            for p in items:
                p.error = str(e)
                if p.desired is None:
                    p.desired = "max"
            return items
        for p in items:
            q = p.target[1]
            mx = rings.maximum.get(q)
            p.actual = rings.current.get(q)
            if not mx:
                p.error = (f"{ifname}: the NIC has no {q} ring (its driver reports no "
                           f"maximum for it); remove {q} from [{base}]")
                if p.desired is None:
                    p.desired = "max"
                continue
            if p.desired is None:            # "max"
                p.desired = mx
            elif p.desired > mx:
                p.error = (f"{ifname}: {q} = {p.desired} is above the maximum {mx} of the NIC; "
                           f"allowed 1..{mx} or \"max\"")
        return items

    # ------------------------------------------------------------------ read / write
    def verify(self, p: Planned) -> Any:
        ifname, q = p.target
        return self._get(ifname).current.get(q)

    def _write(self, p: Planned, value: Any) -> Any:
        ifname, q = p.target
        try:
            rings = self._netlink().set_rings(ifname, {q: int(value)})
        except Exception as e:
            raise self._error(e, ifname) from None
        self.rings[ifname] = rings.as_dict()
        got = rings.current.get(q)
        if got != int(value):      # set_rings reads back already; belt and braces
            raise TunerError(f"{ifname}: {q} ring set to {value} but the NIC reports {got}",
                             "not_applied")
        return got

    def apply(self, p: Planned) -> Any:
        return self._write(p, p.desired)

    def restore(self, p: Planned, original: Any) -> Any:
        return self._write(p, original)

    def restore_item(self, subject: str, name: str) -> Optional[Planned]:
        if not subject.startswith("nic:") or not name.startswith(PREFIX):
            return None
        ifname, q = subject[4:], name[len(PREFIX):]
        if q not in QUEUES:
            return None
        return Planned(self, subject, name, None, None, "original", ifname, target=(ifname, q))

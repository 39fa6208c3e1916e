"""NVIDIA's GPU recovery action: what the driver says a GPU needs (none, reset, reboot, drain).

The same numbers appear in two places: NVML's field ``NVML_FI_DEV_GET_GPU_RECOVERY_ACTION``
(field id 230, read with nvmlDeviceGetFieldValues; enum ``nvmlDeviceGpuRecoveryAction_t`` in
nvml.h) and the kernel's Xid 154 line ("GPU recovery action changed from 0x0 (None) to 0x2
(Node Reboot Required)"). Values 0-4 are in every header that has the field; 5-7 were added
later (nvml.h of NVML 13). Pure data and lookups, no I/O.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

from gpucostd.snapshot import Event, Severity

NVML_FI_DEV_GET_GPU_RECOVERY_ACTION = 230


class RecoveryAction(NamedTuple):
    value: int
    name: str          # stable key, used in status --json and the metric label
    severity: Severity
    action: str        # what to do, in gpucostd's words


RECOVERY_ACTIONS = {
    0: RecoveryAction(0, "none", Severity.OK, "none"),
    1: RecoveryAction(1, "gpu_reset", Severity.CRIT, "reset GPU"),
    2: RecoveryAction(2, "node_reboot", Severity.CRIT, "reboot"),
    3: RecoveryAction(3, "drain_p2p", Severity.CRIT, "drain peer-to-peer (NVLink) work"),
    4: RecoveryAction(4, "drain_and_reset", Severity.CRIT, "drain and reset GPU"),
    5: RecoveryAction(5, "recover_imex_domain", Severity.CRIT, "recover the IMEX domain"),
    6: RecoveryAction(6, "bus_reset", Severity.CRIT, "reset the GPU's PCIe bus"),
    7: RecoveryAction(7, "system_reboot", Severity.CRIT, "reboot"),
}
NAMES = tuple(a.name for a in RECOVERY_ACTIONS.values())


def recovery_action(value: Optional[int]) -> Optional[RecoveryAction]:
    """The action for an NVML / Xid 154 value; an unknown non-zero value (a newer driver) is
    CRIT "look up" rather than ignored; None for None."""
    if value is None:
        return None
    try:
        value = int(value)
    except (TypeError, ValueError):
        return None
    known = RECOVERY_ACTIONS.get(value)
    if known is not None:
        return known
    return RecoveryAction(value, f"unknown_{value}", Severity.CRIT,
                          f"look up recovery action {value} in NVIDIA's nvml.h")


RESET_VALUES = frozenset({1, 4, 6})     # actions a GPU (or bus) reset completes


def judge_recovery(gpu: int, uuid: Optional[str], value: Optional[int], previous: Optional[int],
                   now: float) -> Tuple[Optional[Tuple[str, Severity, str, str]], Optional[Event]]:
    """(finding as (code, severity, action, message) or None, event or None) for one GPU's
    recovery action read this cycle (`value`), given the one read before (`previous`)."""
    ra = recovery_action(value)
    finding = None
    if ra is not None and ra.value != 0:
        finding = ("recovery_action", ra.severity, ra.action,
                   f"NVML recovery action {ra.value} ({ra.name}): the driver asks to "
                   f"{ra.action}")
    event = None
    if ra is not None and previous is not None and value != previous:
        before = recovery_action(previous)
        was = before.name if before is not None else str(previous)
        event = Event(now, f"gpu:{gpu}", "recovery_action", ra.severity, ra.action,
                      f"GPU {gpu}: NVML recovery action {was} -> {ra.name}", gpu=gpu,
                      uuid=uuid, fields={"from": previous, "to": ra.value, "name": ra.name})
    elif ra is not None and previous is None and ra.value != 0:
        event = Event(now, f"gpu:{gpu}", "recovery_action", ra.severity, ra.action,
                      f"GPU {gpu}: NVML recovery action {ra.name}", gpu=gpu, uuid=uuid,
                      fields={"from": None, "to": ra.value, "name": ra.name})
    return finding, event

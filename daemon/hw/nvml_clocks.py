"""The NVML gateway's clock and workload-power-profile calls (a mixin of NvmlGateway, which
gives it ``call``, ``_require`` and the pynvml module as ``_nvml()``; this module imports no
NVML binding itself).

- supported SM clocks: ``nvmlDeviceGetSupportedMemoryClocks`` (the highest memory clock) and
  ``nvmlDeviceGetSupportedGraphicsClocks`` for it; read once per GPU and NVML session;
- locked SM clocks: ``nvmlDeviceSetGpuLockedClocks`` (``nvidia-smi -lgc``) and
  ``nvmlDeviceResetGpuLockedClocks`` (``nvidia-smi -rgc``: unlocked, the driver's default).
  NVML has no call that reads the locked range back, so the gateway remembers what it set
  (``locked_clocks``) and the tuner checks it against the SM clock it reads;
- workload power profiles (Blackwell and later): ``nvmlDeviceWorkloadPowerProfile*``; the
  requested profiles are the setting.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from gpucostd.config_schema import POWER_PROFILES

_PROFILE_NAMES = {v: k for k, v in POWER_PROFILES.items()}
MASK_WORDS = 8


def clocks_text(clocks: List[int]) -> str:
    """'345..1980 MHz in 15 MHz steps' for an evenly spaced list, else every clock."""
    xs = sorted(set(int(c) for c in clocks))
    if not xs:
        return "none"
    steps = {b - a for a, b in zip(xs, xs[1:])}
    if len(xs) > 4 and len(steps) == 1:
        return f"{xs[0]}..{xs[-1]} MHz in {steps.pop()} MHz steps"
    return ", ".join(map(str, xs)) + " MHz"


def _mask(names) -> int:
    return sum(1 << POWER_PROFILES[n] for n in names)


def _names(mask: int) -> Tuple[str, ...]:
    return tuple(sorted(_PROFILE_NAMES.get(b, f"profile_{b}") for b in range(255)
                        if mask >> b & 1))


class ClockSettings:
    """Mixin of NvmlGateway."""

    def _clock_memo(self) -> Dict[str, Dict[int, Any]]:
        memo = self.__dict__.get("_clock_memo_data")
        if memo is None:
            memo = self.__dict__["_clock_memo_data"] = {"supported": {}, "locked": {}}
        return memo

    def forget_clocks(self, index: Optional[int] = None) -> None:
        """A re-init (a driver reload unlocks the clocks) or a reset GPU: forget what we know."""
        memo = self._clock_memo()
        for table in memo.values():
            if index is None:
                table.clear()
            else:
                table.pop(index, None)

    def get_supported_sm_clocks(self, index: int) -> List[int]:
        """The graphics clocks nvmlDeviceSetGpuLockedClocks takes, highest first. Raises
        NvmlError (kind not_supported on a GPU without the list)."""
        memo = self._clock_memo()["supported"]
        if index in memo:
            return list(memo[index])
        nv = self._nvml()

        def fn(h):
            mems = nv.nvmlDeviceGetSupportedMemoryClocks(h)
            if not mems:
                return []
            return list(nv.nvmlDeviceGetSupportedGraphicsClocks(h, max(mems)))

        clocks = sorted({int(c) for c in self.call(index, "nvmlDeviceGetSupportedGraphicsClocks",
                                                     fn)}, reverse=True)
        memo[index] = tuple(clocks)
        return clocks

    def get_sm_clock(self, index: int) -> int:
        nv = self._nvml()
        return int(self.call(index, "nvmlDeviceGetClockInfo",
                             lambda h: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)))

    def locked_clocks(self, index: int) -> Optional[Tuple[int, int]]:
        """The range this process locked GPU `index` to (None: not locked by us)."""
        return self._clock_memo()["locked"].get(index)

    def set_locked_clocks(self, index: int, lo: int, hi: int) -> None:
        """Lock the SM clock to [lo, hi] MHz. Raises NvmlError."""
        nv = self._nvml()
        self._require(index)
        try:
            self.call(index, "nvmlDeviceSetGpuLockedClocks",
                      lambda h: nv.nvmlDeviceSetGpuLockedClocks(h, int(lo), int(hi)))
        except Exception as err:
            raise self._clock_error(err, index, f"locking the SM clock to {lo}..{hi} MHz",
                                    "locked SM clocks (Volta or newer)") from None
        self._clock_memo()["locked"][index] = (int(lo), int(hi))

    def reset_locked_clocks(self, index: int) -> None:
        """Unlock the SM clock (the driver's default). Raises NvmlError."""
        nv = self._nvml()
        self._require(index)
        try:
            self.call(index, "nvmlDeviceResetGpuLockedClocks",
                      nv.nvmlDeviceResetGpuLockedClocks)
        except Exception as err:
            raise self._clock_error(err, index, "unlocking the SM clock",
                                    "locked SM clocks (Volta or newer)") from None
        self._clock_memo()["locked"].pop(index, None)

    def get_power_profiles(self, index: int) -> Tuple[str, ...]:
        """The requested workload power profiles (names; () when none). Raises NvmlError
        (not_supported before Blackwell)."""
        nv = self._nvml()

        def fn(h):
            cur = nv.c_nvmlWorkloadPowerProfileCurrentProfiles_v1_t()
            nv.nvmlDeviceWorkloadPowerProfileGetCurrentProfiles(h, nv.byref(cur))
            m = cur.requestedProfilesMask.mask
            return sum(int(m[k]) << (32 * k) for k in range(MASK_WORDS))

        try:
            return _names(self.call(index, "nvmlDeviceWorkloadPowerProfileGetCurrentProfiles",
                                    fn))
        except Exception as err:
            raise self._clock_error(err, index, "reading the workload power profiles",
                                    "workload power profiles (Blackwell or newer)") from None

    def set_power_profiles(self, index: int, names) -> None:
        """Make `names` the requested profiles (clear the others first). Raises NvmlError."""
        nv = self._nvml()
        want = _mask(names)
        self._require(index)

        def request(mask):
            req = nv.c_nvmlWorkloadPowerProfileRequestedProfiles_v1_t()
            for k in range(MASK_WORDS):
                req.requestedProfilesMask.mask[k] = (mask >> (32 * k)) & 0xffffffff
            return req

        def fn(h):
            cur = nv.c_nvmlWorkloadPowerProfileCurrentProfiles_v1_t()
            nv.nvmlDeviceWorkloadPowerProfileGetCurrentProfiles(h, nv.byref(cur))
            m = cur.requestedProfilesMask.mask
            have = sum(int(m[k]) << (32 * k) for k in range(MASK_WORDS))
            if have & ~want:
                nv.nvmlDeviceWorkloadPowerProfileClearRequestedProfiles(
                    h, nv.byref(request(have & ~want)))
            if want & ~have:
                nv.nvmlDeviceWorkloadPowerProfileSetRequestedProfiles(
                    h, nv.byref(request(want & ~have)))

        try:
            self.call(index, "nvmlDeviceWorkloadPowerProfileSetRequestedProfiles", fn)
        except Exception as err:
            raise self._clock_error(err, index, "requesting the workload power profile "
                                    + ("+".join(names) or "none"),
                                    "workload power profiles (Blackwell or newer)") from None

    def _clock_error(self, err: Exception, index: int, doing: str, feature: str):
        kind = getattr(err, "kind", None)
        if kind is None:
            return err
        make = type(err)
        if kind == "no_permission":
            return make("no_permission", f"GPU {index}: {doing} was refused "
                        "(NVML_ERROR_NO_PERMISSION): it needs root (or CAP_SYS_ADMIN); run "
                        "gpucostd as root (the packaged systemd unit does)", err.code, index,
                        err.function)
        if kind == "not_supported":
            return make("not_supported", f"GPU {index} does not support {feature}",
                        err.code, index, err.function)
        if kind == "invalid_argument":
            allowed = ""
            if "clock" in doing:
                try:
                    allowed = "; supported: " + clocks_text(self.get_supported_sm_clocks(index))
                except Exception:  # noqa: BLE001 - the list is a courtesy
                    pass
            return make("invalid_argument", f"GPU {index}: {doing}: refused as invalid"
                        f"{allowed}", err.code, index, err.function)
        return err

"""The NVML gateway: the only module that imports pynvml.

Every NVML call runs on a worker thread under a deadline (default 2 s). There is one worker per
GPU (plus one for node-wide calls such as nvmlInit), so a GPU whose calls hang -- a GPU that fell
off the bus can block NVML for tens of seconds -- delays nobody else:

- a call that overruns its deadline marks that GPU *unresponsive*; the caller gets
  ``NvmlError(kind="timeout")`` at once;
- while the stuck call has not returned, every further call for that GPU fails with
  kind "timeout" immediately (the GPU is never called twice at the same time);
- when the stuck call returns, the GPU recovers by itself.

A device read (``read_devices``) is one job per GPU: all of that GPU's NVML calls for one cycle
run back to back, under one deadline. While no GPU is slow the jobs run one after another on one
thread (a hand-off per cycle, not per GPU: gpucostd.hw.nvml_lanes.Batch), each claimed on its
GPU's lane so the stuck and recovery rules are the same; jobs not started after SCATTER_SECONDS
go to their GPUs' own threads, so a hung GPU still delays nobody for its deadline. What a
read asks is two data tables in ``nvml_fields.py``: one ``nvmlDeviceGetFieldValues`` per GPU for
every value NVML has a field id for (each value's own return code honoured: NOT_SUPPORTED ->
absent, never 0), then the old one-value calls for the rest and for every field the driver does
not support. Static values (identity, thresholds, limits range, max clocks) are read once per
NVML session and again after a re-init, a lost or hung GPU, or a counter that went backwards
(a GPU reset).

NVML errors are mapped to meaning (``NvmlError.kind``): NOT_SUPPORTED -> "not_supported" (the
reading is absent: None, never 0); GPU_IS_LOST -> "lost"; NO_PERMISSION -> "no_permission" (the
message names the privilege); library missing / driver not loaded / uninitialised ->
"unavailable" (the gateway reports ``available = False`` with the reason and retries
``nvmlInit`` every ``retry_seconds``).

Works with both the old (``nvmlDeviceGetCurrentClocksThrottleReasons``) and the new
(``nvmlDeviceGetCurrentClocksEventReasons``) names of nvidia-ml-py, whichever exists.

pynvml is process-global: ``NvmlGateway(library=X)`` installs X as ``pynvml.nvmlLib`` when it
initialises, so one process talks to one NVML library (real or simulated) at a time.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

from gpucostd.clock import RealClock
from gpucostd.hw.gpm import read_activity
from gpucostd.hw.nvml_clocks import ClockSettings
from gpucostd.hw.nvml_mig import read_mig
from gpucostd.hw.nvml_fields import (CONVERT, IDENTITY, LEGACY, LEGACY_CONVERT, READINGS,
                                     SKIP_IF_PRESENT, STATIC_READINGS, VIOLATION_PREFIX,
                                     DeviceRead, Field, Legacy, as_text, get_field_values)
from gpucostd.hw.nvml_fields import GpuSession as _GpuSession
from gpucostd.hw.nvml_fields import field_value as _field_value  # noqa: F401 (tests)
from gpucostd.hw.nvml_lanes import Batch, Job as _Job, Lane as _Lane, now as _now
from gpucostd.hw.nvml_errors import KINDS, NvmlError  # noqa: F401
from gpucostd.hw.nvml_errors import (  # noqa: F401 - the old local names
    ERROR_TEXT as _ERROR_TEXT, FATAL as _FATAL, FIELD_ABSENT as _FIELD_ABSENT,
    GPU_IS_LOST as _GPU_IS_LOST, KIND_BY_CODE as _KIND_BY_CODE, NOT_SUPPORTED as _NOT_SUPPORTED,
    describe as _describe, from_nvml as _from_nvml, refused as _refused, where as _where)
from gpucostd.snapshot import VIOLATION_POLICIES

try:  # pragma: no cover - the import itself is exercised everywhere
    import pynvml as _pynvml
    _PYNVML_ERROR: Optional[str] = None
except Exception as _exc:  # noqa: BLE001 - any import failure means "not available"
    _pynvml = None  # type: ignore[assignment]
    _PYNVML_ERROR = (f"the Python package nvidia-ml-py (module pynvml) cannot be imported "
                     f"({_exc}); install it: pip install nvidia-ml-py")

log = logging.getLogger("gpucostd.nvml")

VIRTUAL_CLOCK_DEADLINE = 60.0
# A batch of device reads (one thread for every GPU) not done after this long (or a quarter
# of the deadline) hands the reads it has not started to their GPUs' own threads.
SCATTER_SECONDS = 0.1
_SETTERS = ("nvmlDeviceSet", "nvmlDeviceReset", "nvmlDeviceWorkloadPowerProfileSet")


# --------------------------------------------------------------------------- the gateway
class NvmlGateway(ClockSettings):
    def __init__(self, timeout_seconds: float = 2.0, retry_seconds: float = 30.0,
                 library: Any = None, clock: Any = None):
        self.timeout_seconds = float(timeout_seconds)
        self.retry_seconds = float(retry_seconds)
        self.library = library
        self.clock = clock if clock is not None else RealClock()
        self.available = False
        self.error: Optional[str] = "NVML not initialised yet"
        self.driver_version: Optional[str] = None
        self.cuda_version: Optional[str] = None
        self.nvml_version: Optional[str] = None
        self.device_count: Optional[int] = None
        self._lock = threading.RLock()
        self._lanes: Dict[Any, _Lane] = {}
        self._handles: Dict[int, Any] = {}
        self._gpu_session: Dict[int, _GpuSession] = {}   # index -> what reads learned
        self._last_attempt: Optional[float] = None
        self._session = False        # our nvmlInit succeeded and no nvmlShutdown followed
        self._late_init: Optional[_Job] = None   # an initialisation that overran its deadline
        self._closed = False
        # On a virtual clock (replay, tests) only the simulator answers, and it never blocks
        # (a simulated hang returns NVML_ERROR_TIMEOUT at once). A real-time deadline would
        # then only make results depend on how busy the machine is, so it is stretched.
        self._virtual = bool(getattr(self.clock, "virtual", False))

    @staticmethod
    def _nvml() -> Any:
        """pynvml, for the mixins (hw/nvml_clocks.py) that must not import it."""
        return _pynvml

    def _deadline(self, timeout: Optional[float]) -> float:
        seconds = self.timeout_seconds if timeout is None else timeout
        if self._virtual:
            seconds = max(seconds, VIRTUAL_CLOCK_DEADLINE)
        return _now() + seconds

    # ---------------------------------------------------------------- plumbing
    def _lane(self, key: Any) -> _Lane:
        with self._lock:
            lane = self._lanes.get(key)
            if lane is None:
                name = "node" if key == "node" else f"gpu{key}"
                lane = self._lanes[key] = _Lane(name)
            return lane

    def _batch_lane(self) -> Optional[_Lane]:
        """The thread that reads a cycle's GPUs one after another; None while it is still in
        an earlier batch (a GPU call there hangs): then each GPU's own thread reads it."""
        with self._lock:
            lane = self._lanes.get("batch")
            if lane is None:
                lane = self._lanes["batch"] = _Lane("batch")
        with lane.lock:
            return None if lane.pending else lane

    def _stuck_error(self, key: Any, lane: _Lane) -> NvmlError:
        gpu = None if key == "node" else key
        since = lane.stuck_since
        age = 0.0 if since is None else max(0.0, _now() - since)
        call = lane.stuck_call or "an NVML call"
        return NvmlError("timeout", f"{_where(gpu)} is unresponsive: {call} has not returned "
                         f"for {age:.0f} s (deadline "
                         f"{self.timeout_seconds:g} s); not calling it again until it returns",
                         None, gpu, lane.stuck_call)

    def _submit(self, key: Any, fn: Callable[[], Any]) -> Tuple[_Lane, Optional[_Job]]:
        lane = self._lane(key)
        if self._virtual:
            # Replay: the simulator never blocks, so run inline; hand-offs to worker threads
            # cost more than the calls themselves.
            job = _Job(fn)
            try:
                job.result = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                job.exc = exc
            job.done.set()
            return lane, job
        return lane, lane.submit(fn)

    def _wait(self, key: Any, lane: _Lane, job: Optional[_Job], deadline: float) -> Any:
        if job is None:
            raise self._stuck_error(key, lane)
        remaining = deadline - _now()
        if not job.done.wait(max(0.0, remaining)):
            if lane.give_up(job):
                gpu = None if key == "node" else key
                log.warning("%s: %s did not return within %g s; marked unresponsive",
                            _where(gpu), lane.stuck_call, self.timeout_seconds)
                raise NvmlError("timeout", f"{_where(gpu)} is unresponsive: "
                                f"{lane.stuck_call} did not return within "
                                f"{self.timeout_seconds:g} s; not calling it again until it "
                                "returns", None, gpu, lane.stuck_call)
        if job.exc is not None:
            raise job.exc
        return job.result

    def _call(self, key: Any, fn: Callable[[], Any], timeout: Optional[float] = None) -> Any:
        lane, job = self._submit(key, fn)
        deadline = self._deadline(timeout)
        try:
            return self._wait(key, lane, job, deadline)
        except NvmlError as err:
            if err.kind == "unavailable":
                self._mark_unavailable(str(err))
            raise

    def _nv(self, lane_name: Any, what: str, fn: Callable[..., Any], *args: Any,
            gpu: Optional[int] = None) -> Any:
        """Run one pynvml function on the current worker, mapping its errors."""
        lane = self._lanes.get(lane_name)
        if lane is not None:
            lane.current = what
        try:
            return fn(*args)
        except _pynvml.NVMLError as exc:
            raise _from_nvml(exc, gpu, what) from None
        except _pynvml.NVMLLibraryMismatchError as exc:
            raise _from_nvml(exc, gpu, what) from None

    def _mark_unavailable(self, message: str) -> None:
        with self._lock:
            if self.available:
                log.warning("NVML became unavailable: %s", message)
            self.available = False
            self.error = message + self._retry_note()
            self._handles.clear()
            self._last_attempt = self.clock.monotonic()

    def _retry_note(self) -> str:
        return f"; retrying every {self.retry_seconds:g} s"

    # ---------------------------------------------------------------- init
    def _install_library(self) -> None:
        nv = _pynvml
        with nv.libLoadLock:
            if self.library is not None:
                if nv.nvmlLib is not self.library:
                    nv.nvmlLib = self.library
                    nv._nvmlGetFunctionPointer_cache.clear()
            elif getattr(nv.nvmlLib, "_gpucostd_simulated", False):
                nv.nvmlLib = None
                nv._nvmlGetFunctionPointer_cache.clear()

    def _do_init(self) -> Dict[str, Any]:
        nv = _pynvml
        self._install_library()
        if self._session:
            # NVML counts nvmlInit calls: while our earlier session is open, nvmlInit only
            # bumps the count and the library keeps its stale state. Close it first (the
            # driver went away and came back, so this may fail; that is fine).
            self._session = False
            try:
                self._nv("node", "nvmlShutdown", nv.nvmlShutdown)
            except NvmlError as err:
                log.debug("nvmlShutdown before re-initialising: %s", err)
        self._nv("node", "nvmlInit", nv.nvmlInit)
        self._session = True
        count = self._nv("node", "nvmlDeviceGetCount", nv.nvmlDeviceGetCount)
        driver = self._nv("node", "nvmlSystemGetDriverVersion", nv.nvmlSystemGetDriverVersion)
        info: Dict[str, Any] = {"count": int(count), "driver": as_text(driver)}
        try:
            cuda = self._nv("node", "nvmlSystemGetCudaDriverVersion",
                            nv.nvmlSystemGetCudaDriverVersion)
            info["cuda"] = f"{int(cuda) // 1000}.{(int(cuda) % 1000) // 10}"
        except NvmlError:
            info["cuda"] = None
        try:
            info["nvml"] = as_text(self._nv("node", "nvmlSystemGetNVMLVersion",
                                          nv.nvmlSystemGetNVMLVersion))
        except NvmlError:
            info["nvml"] = None
        return info

    def ensure_initialized(self) -> bool:
        """Initialise NVML if it is not; tries at most every retry_seconds. Never raises.

        An initialisation that overran the deadline (nvmlInit without persistence mode can
        take seconds on a large node) is not thrown away: once it returns, the next call
        takes its result instead of starting another one that would overrun again."""
        with self._lock:
            if self.available:
                return True
            if self._closed:
                return False
            late, self._late_init = self._late_init, None
            if late is None or not late.done.is_set():
                self._late_init = late
                late = None
                now = self.clock.monotonic()
                if self._last_attempt is not None and \
                        now - self._last_attempt < self.retry_seconds:
                    return False
                self._last_attempt = now
        if _pynvml is None:
            with self._lock:
                self.error = _PYNVML_ERROR
            return False
        lane, job = (None, late) if late is not None else self._submit("node", self._do_init)
        try:
            if late is not None:
                if late.exc is not None:
                    raise late.exc
                info = late.result
            else:
                info = self._wait("node", lane, job, self._deadline(None))
        except NvmlError as err:
            message = str(err)
            if err.kind == "timeout":
                if job is not None and not job.done.is_set():
                    with self._lock:
                        self._late_init = job       # its result counts once it returns
                message = (f"nvmlInit did not return within {self.timeout_seconds:g} s (a GPU "
                           "may have fallen off the bus; check `dmesg` for Xid 79)")
            return self._init_failed(message)
        except Exception as exc:  # noqa: BLE001 - never raise from here
            return self._init_failed(f"nvmlInit failed: {exc}")
        with self._lock:
            self.available = True
            self.error = None
            self.device_count = info["count"]
            self.driver_version = info["driver"]
            self.cuda_version = info["cuda"]
            self.nvml_version = info["nvml"]
            self._handles.clear()
            self._gpu_session.clear()
        log.info("NVML initialised: %d GPU(s), driver %s, CUDA %s", info["count"],
                 info["driver"], info["cuda"])
        return True

    def _init_failed(self, message: str) -> bool:
        with self._lock:
            self.available = False
            self.error = message + self._retry_note()
        log.warning("NVML not available: %s", self.error)
        return False

    def shutdown(self) -> None:
        """nvmlShutdown (under the deadline) and stop the workers."""
        with self._lock:
            session, self._session = self._session, False
            self.available = False
            self._closed = True
            self.error = "NVML shut down"
            self._handles.clear()
        if session and _pynvml is not None:
            try:
                self._call("node", lambda: self._nv("node", "nvmlShutdown",
                                                    _pynvml.nvmlShutdown))
            except NvmlError as err:
                log.info("nvmlShutdown: %s", err)
        release = getattr(self.library, "release", None)
        if callable(release):      # the simulator: let calls stuck in a simulated hang go
            release()
        with self._lock:
            lanes, self._lanes = list(self._lanes.values()), {}
        for lane in lanes:
            lane.stop()

    # ---------------------------------------------------------------- per GPU
    def _require(self, index: int) -> None:
        if not self.available:
            raise NvmlError("unavailable", self.error or "NVML not available", None, index)
        count = self.device_count or 0
        if not 0 <= index < count:
            raise NvmlError("invalid_argument",
                            f"GPU {index} does not exist; this node has {count} GPU(s) "
                            f"(indexes 0..{count - 1})", None, index)

    def _handle(self, index: int) -> Any:
        """Device handle (on the GPU's worker; cached until re-init)."""
        h = self._handles.get(index)
        if h is None:
            h = self._nv(index, "nvmlDeviceGetHandleByIndex",
                         _pynvml.nvmlDeviceGetHandleByIndex, index, gpu=index)
            self._handles[index] = h
        return h

    def call(self, index: int, what: str, fn: Callable[[Any], Any],
             timeout: Optional[float] = None) -> Any:
        """Run ``fn(handle)`` (pynvml calls) on GPU `index`'s worker under the deadline."""
        self._require(index)
        if what.startswith(_SETTERS):     # what it sets may be a slow reading: read it next
            self.forget_slow(index)

        def job():
            h = self._handle(index)
            lane = self._lanes.get(index)
            if lane is not None:
                lane.current = what
            try:
                return fn(h)
            except _pynvml.NVMLError as exc:
                raise _from_nvml(exc, index, what) from None
            except _pynvml.NVMLLibraryMismatchError as exc:
                raise _from_nvml(exc, index, what) from None

        return self._call(index, job, timeout)

    def get_power_limit(self, index: int) -> float:
        """Current enforced power limit, watts."""
        nv = _pynvml

        def fn(h):
            try:
                return nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0
            except nv.NVMLError_NotSupported:
                return nv.nvmlDeviceGetPowerManagementLimit(h) / 1000.0

        return self.call(index, "nvmlDeviceGetEnforcedPowerLimit", fn)

    def get_power_limit_constraints(self, index: int) -> Tuple[float, float]:
        """(min, max) settable power limit, watts."""
        lo, hi = self.call(index, "nvmlDeviceGetPowerManagementLimitConstraints",
                           _pynvml.nvmlDeviceGetPowerManagementLimitConstraints)
        return lo / 1000.0, hi / 1000.0

    def get_default_power_limit(self, index: int) -> float:
        return self.call(index, "nvmlDeviceGetPowerManagementDefaultLimit",
                         _pynvml.nvmlDeviceGetPowerManagementDefaultLimit) / 1000.0

    def get_uuid(self, index: int) -> Optional[str]:
        """The GPU's UUID ("GPU-..."): which GPU an index means now."""
        return as_text(self.call(index, "nvmlDeviceGetUUID", _pynvml.nvmlDeviceGetUUID))

    def get_persistence_mode(self, index: int) -> bool:
        return self.call(index, "nvmlDeviceGetPersistenceMode",
                         _pynvml.nvmlDeviceGetPersistenceMode) == 1

    def set_power_limit(self, index: int, watts: float) -> None:
        """Set the power management limit (watts). Raises NvmlError."""
        milliwatts = int(round(float(watts) * 1000))
        self._require(index)
        try:
            self.call(index, "nvmlDeviceSetPowerManagementLimit",
                      lambda h: _pynvml.nvmlDeviceSetPowerManagementLimit(h, milliwatts))
        except NvmlError as err:
            if err.kind == "no_permission":
                raise _refused(err, index, f"setting the power limit to {watts:g} W") from None
            if err.kind == "invalid_argument":
                allowed = ""
                try:
                    lo, hi = self.get_power_limit_constraints(index)
                    allowed = f"; allowed {lo:g}..{hi:g} W"
                except NvmlError:
                    pass
                raise NvmlError("invalid_argument", f"GPU {index}: power limit {watts:g} W is "
                                f"out of range{allowed}", err.code, index,
                                err.function) from None
            if err.kind == "not_supported":
                raise NvmlError("not_supported", f"GPU {index} does not support setting the "
                                "power limit", err.code, index, err.function) from None
            raise

    def set_persistence_mode(self, index: int, enabled: bool) -> None:
        """Enable or disable persistence mode. Raises NvmlError."""
        mode = 1 if enabled else 0
        self._require(index)
        try:
            self.call(index, "nvmlDeviceSetPersistenceMode",
                      lambda h: _pynvml.nvmlDeviceSetPersistenceMode(h, mode))
        except NvmlError as err:
            if err.kind == "no_permission":
                raise _refused(err, index, "setting persistence mode "
                               f"{'on' if enabled else 'off'}") from None
            if err.kind == "not_supported":
                raise NvmlError("not_supported", f"GPU {index} does not support persistence "
                                "mode (Windows/WDDM or an unsupported product)", err.code,
                                index, err.function) from None
            raise

    # ---------------------------------------------------------------- device reads
    def read_devices(self, indices: Optional[Iterable[int]] = None,
                     timeout: Optional[float] = None) -> Dict[int, Any]:
        """Read every field of the given GPUs (default all), one job per GPU (on one thread
        while none is slow, module docstring) under
        one deadline. Returns {index: DeviceRead or NvmlError} (lost/timeout/unavailable and
        other whole-device failures are NvmlError values, never raised)."""
        with self._lock:
            available, count = self.available, self.device_count or 0
            error = self.error
        if indices is None:
            indices = range(count)
        indices = list(indices)
        if not available:
            return {i: NvmlError("unavailable", error or "NVML not available", None, i)
                    for i in indices}
        deadline = self._deadline(timeout)
        jobs: Dict[int, Tuple[Optional[_Lane], Optional[_Job]]] = {}
        batch = self._batch_lane() if len(indices) > 1 and not self._virtual else None
        claimed = []
        for i in indices:
            if not 0 <= i < count:
                jobs[i] = (None, None)
                continue
            fn = (lambda i=i: self._read_device(i))
            job = self._lane(i).claim(fn) if batch is not None else None
            if job is None:
                jobs[i] = self._submit(i, fn)
            else:
                jobs[i] = (self._lanes[i], job)
                claimed.append(jobs[i])
        if claimed:              # one thread reads them while none is slow (nvml_lanes.Batch)
            run = Batch(claimed)
            done = batch.submit(run.run)
            if done is None or not done.done.wait(min(SCATTER_SECONDS, self.timeout_seconds / 4)):
                run.scatter()
        out: Dict[int, Any] = {}
        unavailable = None
        for i, (lane, job) in jobs.items():
            if lane is None:
                out[i] = NvmlError("invalid_argument", f"GPU {i} does not exist", None, i)
                continue
            try:
                out[i] = self._wait(i, lane, job, deadline)
            except NvmlError as err:
                out[i] = err
                if err.kind == "unavailable":
                    unavailable = err
                elif err.kind in _FATAL:      # lost or hung: it may come back reset
                    self.forget_static(i)
            except Exception as exc:  # noqa: BLE001 - a bug must not kill the loop
                log.exception("GPU %d: reading failed", i)
                out[i] = NvmlError("other", f"GPU {i}: reading failed: {exc}", None, i)
        if unavailable is not None:
            self._mark_unavailable(str(unavailable))
        return out

    def _read_device(self, index: int) -> DeviceRead:
        """Runs on GPU `index`'s worker: every reading of one GPU for one cycle. One
        nvmlDeviceGetFieldValues call serves the readings of FIELDS; the old calls (LEGACY)
        serve the rest and every reading a field did not give. Static readings are read on
        the first read of an NVML session (and after a reset) and kept."""
        nv = _pynvml
        lane = self._lanes.get(index)
        res = DeviceRead(index)
        errors = res.errors
        st = self._gpu_session.get(index)
        if st is None:
            st = self._gpu_session[index] = _GpuSession()
        h = self._handle(index)
        static = st.static
        first = static is None
        got: Dict[str, Any] = {} if first else dict(static)
        field_errors: Dict[str, NvmlError] = {}
        plan: Tuple[Field, ...] = ()
        if st.fields_ok:
            plan = st.field_plan(first)
            if plan:
                self._read_fields(nv, h, index, lane, st, plan, got, field_errors)
        now = self.clock.monotonic()
        slow_due = first or now >= st.slow_at       # SLOW_READINGS (nvml_fields)
        rows = st.legacy_rows(first, plan if st.fields_ok else (), slow_due)
        missing = [f.reading for f in plan if f.reading not in got]
        if missing:          # fields that did not answer this cycle: their old calls too
            rows = rows + tuple(r for r in LEGACY if r.reading in missing
                                and (first or not r.static))
        self._read_legacy(nv, h, index, lane, st, rows, got, errors)
        st.keep_slow(slow_due, now, got, errors)
        for reading, err in field_errors.items():
            if reading not in got and reading not in errors:
                errors[reading] = err
        values = res.values
        for reading in READINGS:
            values[reading] = got.get(reading)
        viol = {key: got[VIOLATION_PREFIX + key] for key, _p in VIOLATION_POLICIES
                if got.get(VIOLATION_PREFIX + key) is not None}
        values["violation_seconds"] = viol or None
        values["gpm_supported"], values["activity"] = self._read_gpm(nv, h, index, lane, st, now)
        values["mig_mode"], values["mig_mode_pending"], values["mig"] = self._read_mig(
            nv, h, index, lane, st, values["gpm_supported"], errors, now)
        # a counter that went backwards: the GPU was reset; read its static values again
        if st.counters and any(viol.get(k, v) < v for k, v in st.counters.items()):
            st.static, st.slow_at = None, float("-inf")
        st.counters = viol
        if first and not (STATIC_READINGS & set(errors)) and \
                all(got.get(k) is not None for k in IDENTITY):
            st.static = {k: got.get(k) for k in STATIC_READINGS}
        return res

    def _optional(self, nv: Any, index: int, lane: Optional[_Lane], call: str, what: str,
                  session: Any, read: Callable[[], Any], absent: Callable[[], Any]) -> Any:
        """An optional reading (GPM, MIG): lost or hung end the device read; another error
        leaves it absent this cycle (`absent()`) and drops what `session` holds."""
        if lane is not None:
            lane.current = call
        try:
            return read()
        except (nv.NVMLError, nv.NVMLLibraryMismatchError) as exc:
            err = _from_nvml(exc, index, call)
            if err.kind in _FATAL:
                raise err from None
            log.debug("GPU %d: no %s this cycle: %s", index, what, err)
            session.drop(nv)
            return absent()

    def _read_gpm(self, nv: Any, h: Any, index: int, lane: Optional[_Lane],
                  st: "_GpuSession", now: float) -> Tuple[Optional[bool], Any]:
        """GPM activity (gpucostd.hw.gpm); on an error the sample pair starts again."""
        return self._optional(nv, index, lane, "nvmlGpmSampleGet", "GPM activity", st.gpm,
                              lambda: read_activity(nv, h, st.gpm, _FIELD_ABSENT, now),
                              lambda: (st.gpm.supported, None))

    def _read_mig(self, nv: Any, h: Any, index: int, lane: Optional[_Lane],
                  st: "_GpuSession", gpm: Optional[bool], errors: Dict[str, NvmlError],
                  now: float) -> Tuple[Optional[bool], Optional[bool], Tuple[Any, ...]]:
        """MIG mode and instances (gpucostd.hw.nvml_mig); an error of one instance leaves out
        that instance's reading (in `errors`)."""
        got = self._optional(nv, index, lane, "nvmlDeviceGetMigMode", "MIG reading", st.mig,
                             lambda: read_mig(nv, h, index, st.mig, _FIELD_ABSENT, now, gpm),
                             lambda: None)
        if got is None:
            return None, None, ()
        mode, pending, instances, failed = got
        for key, exc in failed.items():
            if isinstance(exc, nv.NVMLError):
                errors["mig " + key] = _from_nvml(exc, index, f"MIG device {key}")
        return mode, pending, instances

    def _read_fields(self, nv: Any, h: Any, index: int, lane: Optional[_Lane],
                     st: "_GpuSession", plan: Tuple[Field, ...], got: Dict[str, Any],
                     field_errors: Dict[str, NvmlError]) -> None:
        """One nvmlDeviceGetFieldValues for the planned fields; each value's own return code
        decides: SUCCESS -> the reading; NOT_SUPPORTED (or an id this driver does not know)
        -> not asked again this session, the old call serves it; GPU_IS_LOST -> the GPU is
        lost; any other code -> the old call serves it this cycle."""
        what = "nvmlDeviceGetFieldValues"
        if lane is not None:
            lane.current = what
        try:
            fvs = get_field_values(nv, h, st.plan_ids(plan))
        except (nv.NVMLError, nv.NVMLLibraryMismatchError) as exc:
            err = _from_nvml(exc, index, what)
            if err.kind in _FATAL:
                raise err from None
            if err.kind in ("not_supported", "invalid_argument"):
                st.fields_ok = False          # the old calls serve everything this session
            return
        for f, (code, value) in zip(plan, fvs):
            if code == 0:
                if value is not None:
                    got[f.reading] = CONVERT[f.convert](value)
                    continue
                code = _NOT_SUPPORTED          # a value type we cannot read
            if code in _FIELD_ABSENT:
                st.bad_fields.add(f.field_id)
                st.plans.clear()
            elif code == _GPU_IS_LOST:
                raise NvmlError("lost", _describe(code, "lost", index, f"{what} ({f.nvml_name})",
                                                  ""), code, index, what)
            else:
                kind = _KIND_BY_CODE.get(code, "other")
                field_errors[f.reading] = NvmlError(
                    kind, _describe(code, kind, index, f"{what} ({f.nvml_name})",
                                    _ERROR_TEXT.get(code, "error")), code, index, what)

    def _read_legacy(self, nv: Any, h: Any, index: int, lane: Optional[_Lane],
                     st: "_GpuSession", rows: Tuple[Legacy, ...], got: Dict[str, Any],
                     errors: Dict[str, NvmlError]) -> None:
        """The old calls, for every reading not yet served (alternatives best first; a
        function that said NOT_SUPPORTED is not called again this session)."""
        unsupported = st.unsupported
        done = set(got)
        memo: Dict[Tuple[str, Tuple[int, ...]], Any] = {}
        for row in rows:
            reading = row.reading
            if reading in done:
                continue
            skip = SKIP_IF_PRESENT.get(reading)
            if skip and any(got.get(k) is not None for k in skip):
                continue
            key = (row.function, row.args)
            if key in unsupported:
                continue
            if key in memo:
                result = memo[key]
            else:
                fn = getattr(nv, row.function, None)
                if fn is None:                # this nvidia-ml-py lacks the name
                    unsupported.add(key)
                    continue
                if lane is not None:
                    lane.current = row.function
                try:
                    result = fn(h, *row.args)
                except (nv.NVMLError, nv.NVMLLibraryMismatchError) as exc:
                    result = _from_nvml(exc, index, row.function)
                    if result.kind in _FATAL:
                        raise result from None
                    if result.kind == "not_supported":
                        unsupported.add(key)
                        continue              # the next alternative, if any
                memo[key] = result
            done.add(reading)
            if isinstance(result, NvmlError):
                errors[reading] = result
            else:
                got[reading] = LEGACY_CONVERT[row.convert](result)

    def forget_static(self, index: Optional[int] = None) -> None:
        """Read the static values (identity, thresholds, limits, max clocks) of GPU `index`
        (default: all) again on its next read, e.g. after a GPU reset."""
        with self._lock:
            for i, st in list(self._gpu_session.items()):
                if index is None or i == index:
                    st.static = None
                    st.slow_at = float("-inf")
        self.forget_clocks(index)

    def forget_slow(self, index: int) -> None:
        """Read GPU `index`'s SLOW_READINGS (persistence mode, application clock) next time."""
        st = self._gpu_session.get(index)
        if st is not None:
            st.slow_at = float("-inf")

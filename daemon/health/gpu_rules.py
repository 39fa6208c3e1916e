"""The per-GPU health rules of the judge (gpucostd.health.judge): hardware slowdown, the SW
power cap's neighbours (temperature), ECC, memory (row remapping, retired pages) and PCIe. A
mixin of HealthJudge: each rule reads the GPU's reading and its track and calls ``add`` for a
finding; thresholds come from ``[health]``."""
from __future__ import annotations

from typing import Any, List, Optional

from gpucostd.snapshot import Event, GpuReading, HW_SLOWDOWN_REASONS, Severity
from gpucostd.health.texts import fmt_seconds

SLOWDOWN_HOLD_SECONDS = 30.0   # a HW slowdown WARN outlives the slowdown this long
CORRECTED_ECC_WINDOW_SECONDS = 3600.0
ACTION_RESET = "reset GPU"
ACTION_RMA = "hardware inspection/RMA"


def subject_of(gpu: Optional[int]) -> str:
    return "node" if gpu is None else f"gpu:{gpu}"


class GpuRules:
    """The rules; HealthJudge holds the state they read and write (config, tracks, ECC
    baseline, latched faults)."""

    def _rule_slowdown(self, g: GpuReading, tr: Any, cfg, mono: float, add) -> None:
        reasons = g.clock_event_reasons
        if reasons is None:
            tr.slow_last_t = None
            return
        active = [r for r in reasons if r in HW_SLOWDOWN_REASONS]
        window = float(cfg.slowdown_window_seconds)
        interval = float(getattr(self.config.daemon, "interval_seconds", 1.0))
        max_gap = max(3.0 * interval, interval + 2.0 * float(
            getattr(self.config.daemon, "nvml_timeout_seconds", 2.0)), 5.0)
        ivs = tr.slow_intervals
        if tr.slow_last_t is not None:
            dt = mono - tr.slow_last_t
            # the interval since the last reading counts as what we saw then (sample and hold),
            # and only if we actually kept watching (no gap longer than max_gap)
            if 0 < dt <= max_gap and tr.slow_last_active:
                if ivs and abs(ivs[-1][1] - tr.slow_last_t) < 1e-9:
                    ivs[-1][1] = mono
                else:
                    ivs.append([tr.slow_last_t, mono])
                tr.slow_total += dt
        tr.slow_last_t = mono
        tr.slow_last_active = bool(active)
        start = mono - window
        while ivs and ivs[0][1] <= start:
            a, b = ivs.popleft()
            tr.slow_total -= b - a
        if not ivs:
            tr.slow_total = 0.0
            if not active and (tr.slow_seen_at is None
                               or mono - tr.slow_seen_at >= SLOWDOWN_HOLD_SECONDS):
                return
        # the intervals are disjoint and in order: only the first can begin before the window
        busy = tr.slow_total - max(0.0, start - ivs[0][0]) if ivs else 0.0
        fraction = busy / window
        crit = fraction > float(cfg.slowdown_crit_fraction)
        if active:
            tr.slow_seen_at, tr.slow_seen_names = mono, ", ".join(active)
        names = tr.slow_seen_names or "HW slowdown"
        span = fmt_seconds(window)
        # A slowdown that flaps (a power brake toggling every few seconds) holds the WARN for
        # SLOWDOWN_HOLD_SECONDS after it was last seen, instead of an OK<->WARN event pair per
        # toggle that would flood the event history.
        held = not active and tr.slow_seen_at is not None and (
            mono - tr.slow_seen_at < SLOWDOWN_HOLD_SECONDS)
        if crit:
            add("hw_slowdown", Severity.CRIT, "check cooling, power supply and power brake "
                "signals", f"{names} active {fraction:.0%} of the last {span}")
        elif active or held:
            share = f" ({fraction:.0%} of the last {span})" if fraction >= 0.01 else ""
            when = "active" if active else f"seen {mono - tr.slow_seen_at:.0f}s ago"
            add("hw_slowdown", Severity.WARN, "check cooling and power delivery",
                f"{names} {when}{share}")

    def _rule_temperature(self, g: GpuReading, cfg, add) -> None:
        t = g.temperature_celsius
        if t is None:
            return
        margin = float(cfg.temperature_margin_celsius)
        if g.temp_slowdown_celsius is not None and t >= g.temp_slowdown_celsius - margin:
            add("temperature_near_slowdown", Severity.WARN, "check cooling and airflow",
                f"temperature {t:g} °C within {margin:g} °C of slowdown "
                f"{g.temp_slowdown_celsius:g} °C")

    def _rule_ecc(self, g: GpuReading, tr: Any, cfg, now: float, mono: float, add,
                  events: List[Event]) -> None:
        subject = subject_of(g.index)
        vu, au = g.ecc_volatile_uncorrected, g.ecc_aggregate_uncorrected
        if vu is not None or au is not None:
            key = self._gpu_key(g)
            base = self._ecc_base.get(key)
            if base is None:
                base = self._ecc_base[key] = {"vu": vu, "au": au, "reported": 0, "since": None}
                self._dirty = True
            if base.get("vu") is None and vu is not None:
                base["vu"] = vu
                self._dirty = True
            if base.get("au") is None and au is not None:
                base["au"] = au
                self._dirty = True
            new = max(vu - base["vu"] if vu is not None and base.get("vu") is not None else 0,
                      au - base["au"] if au is not None and base.get("au") is not None else 0)
            if new > 0:
                if base.get("since") is None:
                    base["since"] = now
                    self._dirty = True
                add("ecc_uncorrected", Severity.CRIT, "drain and reset GPU; RMA if it recurs",
                    f"{new} new uncorrectable ECC error{'s' if new != 1 else ''}",
                    since=base["since"])
                if new > int(base.get("reported", 0)):
                    delta = new - int(base.get("reported", 0))
                    base["reported"] = new
                    self._dirty = True
                    events.append(Event(
                        now, subject, "ecc_uncorrected", Severity.CRIT,
                        "drain and reset GPU; RMA if it recurs",
                        f"GPU {g.index}: {delta} new uncorrectable ECC error"
                        f"{'s' if delta != 1 else ''} (volatile {vu}, aggregate {au})",
                        gpu=g.index, uuid=g.uuid,
                        fields={"new": delta, "volatile": vu, "aggregate": au}))
        # corrected errors in the last hour
        corr = g.ecc_volatile_corrected if g.ecc_volatile_corrected is not None \
            else g.ecc_aggregate_corrected
        if corr is None:
            return
        samples = tr.ecc_samples
        if samples and corr < samples[-1][1]:
            samples.clear()                       # counter reset
        if not samples or samples[-1][1] != corr:
            samples.append((mono, corr))
        start = mono - CORRECTED_ECC_WINDOW_SECONDS
        while len(samples) >= 2 and samples[1][0] <= start:
            samples.popleft()                     # keep one sample at or before the window start
        in_window = corr - samples[0][1]
        if in_window > float(cfg.corrected_ecc_per_hour):
            add("ecc_corrected_rate", Severity.WARN, "watch it; run DCGM diagnostics if it stays",
                f"{in_window} corrected ECC errors in the last hour "
                f"(limit {float(cfg.corrected_ecc_per_hour):g})")

    def _rule_memory(self, g: GpuReading, tr: Any, now: float, add,
                     events: List[Event]) -> None:
        subject = subject_of(g.index)
        self._pending_flag(g, tr, "remap_pending", g.remapped_rows_pending, "remap_pending",
                           "row remapping pending: reset the GPU to apply it",
                           "row remapping pending; reset the GPU", now, add, events)
        if g.remapped_rows_failure:
            codes = self._latched.setdefault(subject, {})
            if "remap_failure" not in codes and "remap_failure" not in self._acked.get(
                    subject, ()):
                codes["remap_failure"] = {"since": now, "severity": "CRIT", "action": ACTION_RMA,
                                          "message": "row remapping failed: no spare rows left",
                                          "uuid": g.uuid, "gpu": g.index, "sticky": True}
                self._dirty = True
                # the latched finding is reported with the other latched ones next cycle; add
                # it now too so it shows in the cycle it appears
                add("remap_failure", Severity.CRIT, ACTION_RMA,
                    "row remapping failed: no spare rows left", since=now)
            if not tr.remap_failure:
                events.append(Event(now, subject, "remap_failure", Severity.CRIT, ACTION_RMA,
                                    f"GPU {g.index}: row remapping failed; hardware "
                                    f"inspection/RMA", gpu=g.index, uuid=g.uuid))
        if g.remapped_rows_failure is not None:
            tr.remap_failure = g.remapped_rows_failure
        self._pending_flag(g, tr, "retired_pending", g.retired_pages_pending,
                           "retired_pages_pending",
                           "page retirement pending: reset the GPU to retire the pages",
                           "retired pages pending; reset the GPU", now, add, events)

    @staticmethod
    def _pending_flag(g: GpuReading, tr: Any, attr: str, value: Optional[bool], code: str,
                      finding: str, event_text: str, now: float, add,
                      events: List[Event]) -> None:
        """A WARN "reset GPU" finding while `value` is set, with an event when it appears
        (`tr.<attr>`: as last reported; an absent reading leaves it as it was)."""
        if value:
            add(code, Severity.WARN, ACTION_RESET, finding)
            if not getattr(tr, attr):
                events.append(Event(now, subject_of(g.index), code, Severity.WARN, ACTION_RESET,
                                    f"GPU {g.index}: {event_text}", gpu=g.index, uuid=g.uuid))
        if value is not None:
            setattr(tr, attr, value)

    def _rule_pcie(self, g: GpuReading, cfg, add) -> None:
        util = g.utilization_percent
        if util is None or util < float(cfg.pcie_busy_utilization_percent):
            return
        low_gen = (g.pcie_link_gen is not None and g.pcie_link_gen_max is not None
                   and g.pcie_link_gen < g.pcie_link_gen_max)
        low_width = (g.pcie_link_width is not None and g.pcie_link_width_max is not None
                     and g.pcie_link_width < g.pcie_link_width_max)
        if low_gen or low_width:
            add("pcie_degraded", Severity.WARN, "check the slot, riser and BIOS link settings",
                f"PCIe link Gen{g.pcie_link_gen} x{g.pcie_link_width} below max "
                f"Gen{g.pcie_link_gen_max} x{g.pcie_link_width_max} at {util:g}% busy")

    # ------------------------------------------------------------------ health changes

"""The cost accountant: integrates the model (gpucostd.cost.model) across poll cycles, per GPU
and per node, and keeps the totals.

It holds the running totals per GPU and reason, the 24-hour history by minute, the price in
force during each interval (a reload changes it from then on), the GPU-reset rebase, the token
window and the tokens-vs-clock fit. The only I/O is two small state files:
``state_dir/cost.json`` carries the totals and the history across restarts, and
``state_dir/floor.json`` whether the floor drained the node (so that a restarted daemon still
runs the undrain hook). Each cycle it returns a CostReport (gpucostd.cost.report).
"""
from __future__ import annotations

import json
import logging
import os
import time as _time
from collections import deque
from typing import Any, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

from gpucostd.clock import RealClock, StepWatch, stamp, step_since
from gpucostd.cost.efficiency import EfficiencyBook, floor_step, rebase_history
from gpucostd.cost.model import (MAX_LOSS_FOR_MULTIPLIER, COUNTER_GROUPS as _COUNTER_GROUPS,
                                 GpuSample as _Sample, counter_values as _counters,
                                 is_finite as _finite, sorted_reasons as _sorted_reasons,
                                 active_throttle_reasons, cost_multiplier, fit_tokens_vs_clock,
                                 SlidingSums, integrate, is_busy, loss_ratio, reference_clock)
from gpucostd.cost.report import (BUCKET_SECONDS, HISTORY_SECONDS, CostReport, GpuCost, ReasonCost,
                                  TokenCost, WindowCost, add_reasons as _add_reasons,
                                  expand_history as _expand_history,
                                  finish_window as _finish_window, triple as _triple,
                                  cost_breakdown, breakdown)  # noqa: F401 - breakdown's home was here
from gpucostd.snapshot import GpuReading, GpuState
from gpucostd.statefile import (move_aside, notice, plausible_epoch, read_json, set_aside,
                                write_atomic)

LOG = logging.getLogger("gpucostd.cost")

STATE_FILE = "cost.json"
STATE_VERSION = 1
RATE_WINDOW_SECONDS = 300.0    # window of the node's throttle $/h and loss fraction
SAVE_EVERY_SECONDS = 5.0       # real seconds between state-file writes
HISTORY_SAVE_EVERY_SECONDS = 60.0   # real seconds between re-serializations of the history
FIT_EVERY_SECONDS = 15.0       # the tokens-vs-clock fit is recomputed this often


class _GpuTrack:
    __slots__ = ("key", "index", "uuid", "name", "prev", "totals", "carry", "last_depth",
                 "last_group_reason", "source", "price_changes", "last_capacity",
                 "last_depth_interval", "loss_now", "app_exceeded")

    def __init__(self, key: str, index: int, uuid: Optional[str], name: Optional[str]):
        self.key = key
        self.index = index
        self.uuid = uuid
        self.name = name
        self.prev: Optional[_Sample] = None
        self.totals: Dict[str, List[float]] = {}   # reason -> [throttled, capacity, dollars]
        self.carry: Dict[str, float] = {}
        self.last_depth = 0.0
        self.last_group_reason: Dict[str, str] = {}
        self.source = "none"
        # reloads since the last sample: (monotonic time, price per hour in force before it)
        self.price_changes: List[Tuple[float, float]] = []
        self.last_capacity = 0.0             # capacity lost in the latest interval
        self.last_depth_interval = 0.0
        self.loss_now: Optional[float] = None
        self.app_exceeded: Optional[float] = None   # an app clock this GPU ran above


def _interval_price(t0: float, t1: float, changes: Sequence[Tuple[float, float]],
                    price: float) -> float:
    """The mean price per hour over [t0, t1] when the price changed at reloads inside it
    (`changes`: (time, price before it), in time order; `price`: the price now)."""
    acc, start = 0.0, t0
    for t_c, before in changes:
        t_c = min(max(t_c, start), t1)
        acc += before * (t_c - start)
        start = t_c
    return (acc + price * (t1 - start)) / (t1 - t0)


def _gpu_key(g: GpuReading) -> str:
    return g.uuid if g.uuid else f"index:{g.index}"


def _acc_bucket(into: Dict[str, Dict[str, List[float]]],
                per_gpu: Mapping[str, Mapping[str, List[float]]], sign: float) -> None:
    for key, per_reason in per_gpu.items():
        d = into.get(key)
        if d is None:
            d = into[key] = {}
        for r, v in per_reason.items():
            a = d.get(r)
            if a is None:
                a = d[r] = [0.0, 0.0, 0.0]
            for i in (0, 1, 2):
                x = a[i] + sign * v[i]
                a[i] = x if x > 1e-9 else 0.0     # no float dust below zero


def _compact_history(history: Mapping[int, Mapping[str, Mapping[str, List[float]]]]
                     ) -> Dict[str, Any]:
    """{bucket: {gpu: {reason: [thr, cap, usd]}}} -> compact rows for the state file."""
    keys: Dict[str, int] = {}
    reasons: Dict[str, int] = {}
    rows = []
    for b in sorted(history):
        for key, per_reason in history[b].items():
            ki = keys.setdefault(key, len(keys))
            for r, v in per_reason.items():
                ri = reasons.setdefault(r, len(reasons))
                rows.append([b, ki, ri, round(v[0], 6), round(v[1], 6), round(v[2], 9)])
    return {"bucket_seconds": BUCKET_SECONDS, "keys": list(keys), "reasons": list(reasons),
            "rows": rows}


# =========================================================================== accountant
class CostAccountant:
    """Accumulates throttle cost cycle by cycle. Not thread-safe: the loop owns it."""

    def __init__(self, config, state_dir: Optional[str], clock=None,
                 save_every_seconds: float = SAVE_EVERY_SECONDS):
        self.config = config
        self.state_dir = state_dir
        self.clock = clock
        self.save_every_seconds = save_every_seconds
        self._tracks: Dict[str, _GpuTrack] = {}
        self._by_index: Dict[int, str] = {}
        self._cycle_ok: List[_GpuTrack] = []   # tracks with an OK reading in the latest cycle
        self._history: Dict[int, Dict[str, Dict[str, List[float]]]] = {}
        self._rate = SlidingSums(2)       # (mono, dollars, capacity) over the rate window
        self._tokens = TokenCost()
        self._token_clock: Deque[Tuple[float, float, float]] = deque()  # (mono, tok/s, clock)
        self._last_token_mono: Optional[float] = None
        self.eff = EfficiencyBook()          # energy, idle capacity, endpoint tokens
        self.floor: Dict[str, Any] = {}      # the tokens-per-dollar floor's state
        self.floor_transition: Optional[str] = None   # "inefficient" | "efficient" this cycle
        self._fit_at = -1e18
        self._last_report: Optional[CostReport] = None
        self._notes: List[str] = []
        self._dirty = False
        self._last_save = -1e18
        self._history_json: Optional[str] = None
        self._history_saved_at = -1e18
        self._window_cache: Optional[Tuple[int, Dict[str, Any]]] = None
        self._totals_since: Optional[float] = None
        self._no_save = False         # set when a bad state file could not be moved aside
        self._saved: Dict[str, Any] = {}      # the file's stamp (clock.stamp) once loaded
        self._steps = StepWatch(clock or RealClock())
        self._load()
        self._rebase(step_since(self._saved, clock or RealClock()))   # stepped while stopped
        self._floor_saved = False     # the `inefficient` floor.json holds
        self._floor_save_error: Optional[str] = None
        self._load_floor()

    # ------------------------------------------------------------------ config
    def reconfigure(self, config) -> None:
        """A reloaded config. Cost already accumulated keeps its price; intervals after the
        reload use the new one (an interval spanning the reload is split at the reload)."""
        if self.clock is not None:
            now = self.clock.monotonic()
            for tr in self._tracks.values():
                if tr.prev is not None:      # an interval from prev will span the reload
                    tr.price_changes.append((now, self._price(tr.name)))
        self.config = config

    def _price(self, name: Optional[str]) -> float:
        try:
            price = float(self.config.price_for_model(name))
        except Exception:   # noqa: BLE001 - a bad price never breaks accounting
            return 0.0
        return price if _finite(price) else 0.0

    @property
    def currency(self) -> str:
        return str(getattr(self.config.cost, "currency", "USD"))

    # ------------------------------------------------------------------ the cycle
    @staticmethod
    def _reference(g: GpuReading, tr: "_GpuTrack") -> Optional[float]:
        """The application clock is the reference only while it caps the GPU: NVML reports
        the (default) application clock even when none was set, and a GPU seen running above
        it is not capped by it, so its max clock stays the reference."""
        app, mx, sm = g.app_sm_clock_mhz, g.sm_clock_max_mhz, g.sm_clock_mhz
        if app and mx and app < mx:
            if sm is not None and sm > app + 1.0:
                tr.app_exceeded = app
            if tr.app_exceeded == app:
                return float(mx)
        return reference_clock(g)

    def _rebase(self, step: float) -> None:   # a wall-clock step: the history moves with it
        if step and rebase_history(step, self._history, self.eff.history):
            self._totals_since = self._totals_since + step if self._totals_since else None
            self._window_cache, self._dirty = None, True
            LOG.warning("wall clock stepped by %+.0f s: the cost history moves with it", step)

    def update(self, gpus: Sequence[GpuReading], now_mono: float, inference=None) -> CostReport:
        self._rebase(self._steps.check())
        now_wall = self.clock.time() if self.clock is not None else _time.time()
        busy_pct = float(self.config.cost.busy_utilization_percent)
        node_dollars = 0.0
        node_capacity = 0.0
        bucket = int(now_wall // BUCKET_SECONDS)
        hist = self._history.get(bucket)
        present = []
        cycle_ok = self._cycle_ok = []
        used = {g.uuid for g in gpus if g.uuid}
        for g in gpus:
            # a GPU that lost its identity (LOST/UNKNOWN readings carry no uuid) stays the
            # GPU last seen at its index, unless that GPU is read elsewhere in this cycle
            # (re-enumerated): then it is only "the GPU at this index"
            key = g.uuid
            if not key:
                key = self._by_index.get(g.index)
                if key is None or key in used:
                    key = _gpu_key(g)
                used.add(key)
            self._by_index[g.index] = key
            tr = self._tracks.get(key)
            if tr is None:
                tr = self._tracks[key] = _GpuTrack(key, g.index, g.uuid, g.name)
            tr.index = g.index
            if g.name:
                tr.name = g.name
            price = self._price(g.name or tr.name)
            present.append((g, tr, price))
            tr.last_capacity = 0.0
            tr.loss_now = None
            if g.state != GpuState.OK:
                continue
            cycle_ok.append(tr)
            reasons = active_throttle_reasons(g)
            busy = is_busy(g, busy_pct)
            loss = loss_ratio(g, busy_pct, self._reference(g, tr))
            tr.loss_now = loss
            counters = _counters(g.violation_seconds)
            s1 = _Sample(now_mono, loss or 0.0, busy, frozenset(reasons), counters)
            s0 = tr.prev
            tr.prev = s1
            if s0 is not None and now_mono > s0.t:
                dt = now_mono - s0.t
                per, depth, tr.source = integrate(dt, s0, s1, tr.carry, tr.last_depth,
                                                  tr.last_group_reason)
                # the price in force: split the interval at reloads inside it
                p = price
                if tr.price_changes:
                    p = _interval_price(s0.t, now_mono, tr.price_changes, price)
                if per:
                    if hist is None:
                        hist = self._history[bucket] = {}
                    hg = hist.get(key)
                    if hg is None:
                        hg = hist[key] = {}
                    cap_sum = 0.0
                    for r, (thr, cap) in per.items():
                        usd = cap * p / 3600.0
                        tot = tr.totals.get(r)
                        if tot is None:
                            tot = tr.totals[r] = [0.0, 0.0, 0.0]
                        tot[0] += thr
                        tot[1] += cap
                        tot[2] += usd
                        h = hg.get(r)
                        if h is None:
                            h = hg[r] = [0.0, 0.0, 0.0]
                        h[0] += thr
                        h[1] += cap
                        h[2] += usd
                        node_dollars += usd
                        node_capacity += cap
                        cap_sum += cap
                    tr.last_capacity = cap_sum
                    tr.last_depth_interval = depth
                    self._dirty = True
            if s1.reasons and s1.loss > 0:
                tr.last_depth = s1.loss
            for key_g, group in _COUNTER_GROUPS:
                for r in group:
                    if r in s1.reasons:
                        tr.last_group_reason[key_g] = r
                        break
            tr.price_changes.clear()
        self.eff.update([(g, tr.key, price) for g, tr, price in present], now_mono,
                        self.config, now_wall)
        if self._totals_since is None and present:
            self._totals_since = now_wall
        self._rate.add(now_mono, node_dollars, node_capacity)
        self._rate.expire(now_mono - RATE_WINDOW_SECONDS)
        report = self._report(present, now_wall, now_mono, bucket)
        self._last_report = report
        if inference is not None:
            self.update_tokens(inference, now_mono)
        self._maybe_save()
        return report

    # ------------------------------------------------------------------ report
    def _windows(self, bucket: int) -> Dict[str, Any]:
        """Sums of the completed buckets inside the last hour / 24 h, per GPU and reason.
        Kept incrementally: when the minute changes, the buckets that completed are added and
        the ones that left a window subtracted (a full recount only after a long gap). The
        current bucket is added at report time."""
        cache = self._window_cache
        if cache is not None and cache[0] == bucket:
            return cache[1]
        hour_n = 3600 // BUCKET_SECONDS
        day_n = HISTORY_SECONDS // BUCKET_SECONDS
        if cache is None or bucket < cache[0] or bucket - cache[0] > hour_n:
            self._prune(bucket)
            sums = {"hour": {}, "day": {}}
            for b, per_gpu in self._history.items():
                if b < bucket:
                    if b > bucket - hour_n:
                        _acc_bucket(sums["hour"], per_gpu, 1.0)
                    if b > bucket - day_n:
                        _acc_bucket(sums["day"], per_gpu, 1.0)
        else:
            prev, sums = cache
            for b in range(prev, bucket):            # buckets that completed
                per_gpu = self._history.get(b)
                if per_gpu:
                    if b > bucket - hour_n:
                        _acc_bucket(sums["hour"], per_gpu, 1.0)
                    if b > bucket - day_n:
                        _acc_bucket(sums["day"], per_gpu, 1.0)
            for b in range(prev - hour_n + 1, min(prev, bucket - hour_n + 1)):   # left 1 h
                per_gpu = self._history.get(b)
                if per_gpu:
                    _acc_bucket(sums["hour"], per_gpu, -1.0)
            for b in range(prev - day_n + 1, min(prev, bucket - day_n + 1)):     # left 24 h
                per_gpu = self._history.get(b)
                if per_gpu:
                    _acc_bucket(sums["day"], per_gpu, -1.0)
            self._prune(bucket)
        self._window_cache = (bucket, sums)
        return sums

    def _prune(self, bucket: int) -> None:
        oldest = bucket - (HISTORY_SECONDS // BUCKET_SECONDS)
        for b in [b for b in self._history if b < oldest]:
            del self._history[b]

    def _window_for(self, key: str, done: Mapping[str, Dict[str, List[float]]],
                    current: Optional[Mapping[str, Dict[str, List[float]]]],
                    seconds: float) -> WindowCost:
        w = WindowCost(seconds)
        for src in (done.get(key), (current or {}).get(key)):
            if not src:
                continue
            for r, v in src.items():
                c = w.by_reason.get(r)
                if c is None:
                    c = w.by_reason[r] = ReasonCost()
                c.throttled_seconds += v[0]
                c.capacity_lost_seconds += v[1]
                c.dollars += v[2]
        return _finish_window(w)

    def _report(self, present, now_wall: float, now_mono: float, bucket: int) -> CostReport:
        busy_pct = float(self.config.cost.busy_utilization_percent)
        windows = self._windows(bucket)
        current = self._history.get(bucket)
        gpus_out: List[GpuCost] = []
        node_price = 0.0
        node_hour = WindowCost(3600.0)
        node_day = WindowCost(float(HISTORY_SECONDS))
        for g, tr, price in sorted(present, key=lambda x: x[0].index):
            node_price += price
            extra = self.eff.gpu_json(tr.key) or {}
            loss = tr.loss_now if g.state == GpuState.OK else None
            busy = is_busy(g, busy_pct) if g.state == GpuState.OK else None
            hour = self._window_for(tr.key, windows["hour"], current, 3600.0)
            day = self._window_for(tr.key, windows["day"], current, float(HISTORY_SECONDS))
            _add_reasons(node_hour.by_reason, hour.by_reason)
            _add_reasons(node_day.by_reason, day.by_reason)
            gpus_out.append(GpuCost(
                index=g.index, uuid=g.uuid or tr.uuid, name=g.name or tr.name,
                price_per_hour=price,
                busy=busy, loss_ratio=loss, effective_cost_multiplier=cost_multiplier(loss),
                active_reasons=active_throttle_reasons(g) if g.state == GpuState.OK else (),
                source=tr.source,
                reasons={r: ReasonCost(*v) for r, v in _sorted_reasons(tr.totals)},
                last_hour=hour, last_24h=day, extra=extra))
        _finish_window(node_hour)
        _finish_window(node_day)
        # node rates over the last 5 minutes (or since start when younger)
        span = RATE_WINDOW_SECONDS
        if self._rate:
            span = min(RATE_WINDOW_SECONDS, max(0.0, now_mono - self._rate.first_time()))
        usd, cap = (max(0.0, x) for x in self._rate.sums)
        per_hour = usd * 3600.0 / span if span > 0 else 0.0
        node_loss = (cap / (span * len(present))) if span > 0 and present else None
        tokens = self._tokens if self.eff.endpoints or self._tokens.tokens_lost_total else None
        figures = self.eff.node_figures(node_price, self.config)
        figures["gpu_dollars_per_hour"] = node_price
        figures["floor"] = self._floor_view(now_mono)
        notes = tuple(self._notes)
        price_note = self.config.price_note   # illustrative (--simulate)
        if price_note:
            notes += (price_note[0].upper() + price_note[1:],)
        report = CostReport(now_wall, now_mono, self.currency, tuple(gpus_out),
                            figures["cost_dollars_per_hour"], per_hour, node_loss, node_hour,
                            node_day, tokens, notes, self._history, self._totals_since)
        report.efficiency = figures
        report.efficiency_history = self.eff.history
        report.mig = self.eff.mig_json()
        return report

    # ------------------------------------------------------------------ tokens
    def update_tokens(self, readings, now_mono: Optional[float] = None) -> Optional[CostReport]:
        """Fold this cycle's inference-endpoint readings (probes.inference.InferenceReading, one
        or a list) into the latest report: tokens/s over the window, tokens per dollar, cost
        per million tokens, tokens per joule, tokens lost (modelled: tokens/s x loss/(1-loss)
        over the interval; a tensor-parallel group loses what its slowest GPU loses), and the
        floor."""
        if readings is None:
            readings = []
        elif not isinstance(readings, (list, tuple)):
            readings = [readings]
        if now_mono is None:
            now_mono = self.clock.monotonic() if self.clock is not None else _time.monotonic()
        self.eff.update_tokens(readings, now_mono)
        tk = self._tokens
        report = self._last_report
        gpu_price = sum(g.price_per_hour for g in report.gpus) if report is not None else 0.0
        fig = self.eff.node_figures(gpu_price, self.config)
        rate = fig["tokens_per_second"]
        tk.tokens_per_second = rate
        tk.tokens_per_dollar = fig["tokens_per_dollar"]
        tk.cost_per_million_tokens = fig["cost_per_million_tokens"]
        tk.tokens_per_joule = fig["tokens_per_joule"]
        tk.tokens_total = self.eff.tokens_total
        tk.endpoints = self.eff.endpoints_json()
        # modelled tokens lost over the latest interval (only GPUs read in the latest cycle)
        indexes = [t.index for t in self._cycle_ok]
        if rate and self._last_token_mono is not None and self._last_token_mono != now_mono:
            lost_map = {t.index: (t.last_capacity, t.last_depth_interval)
                        for t in self._cycle_ok}
            lost = self.eff.tokens_lost(indexes, lost_map, now_mono - self._last_token_mono)
            if lost:
                tk.tokens_lost_total += lost
                self._dirty = True
        self._last_token_mono = now_mono
        # beyond the model: how tokens/s responds to the SM clock (mean over busy GPUs)
        busy = [t for t in self._cycle_ok if t.prev is not None and t.prev.busy]
        instant = self.eff.node_instant_rate()
        if instant is not None and busy:
            mean_loss = sum(t.prev.loss for t in busy) / len(busy)
            self._token_clock.append((now_mono, instant, 1.0 - mean_loss))
            while self._token_clock and self._token_clock[0][0] < now_mono - 3600.0:
                self._token_clock.popleft()
            if now_mono - self._fit_at >= FIT_EVERY_SECONDS or tk.measured is None:
                self._fit_at = now_mono
                tk.measured = fit_tokens_vs_clock(list(self._token_clock), mean_loss)
            m = tk.measured
            if m and m.get("usable") and m.get("slope_tokens_per_second") and \
                    len(self._token_clock) >= 2:
                dt = self._token_clock[-1][0] - self._token_clock[-2][0]
                tk.measured_tokens_lost_total += max(
                    0.0, m["slope_tokens_per_second"] * mean_loss * dt)
        # the floor
        was_inefficient = bool(self.floor.get("inefficient"))
        self.floor_transition = floor_step(
            self.floor, fig["tokens_per_dollar"],
            float(self.config.efficiency.min_tokens_per_dollar),
            float(self.config.efficiency.window_seconds), now_mono)
        if was_inefficient and not self.floor.get("inefficient") and \
                self.floor_transition is None:
            LOG.warning("the tokens-per-dollar floor is off ([efficiency] min_tokens_per_dollar "
                        "= 0): gpucostd no longer undoes its drain of this node; undrain it "
                        "by hand if it is still drained")
        if bool(self.floor.get("inefficient")) != self._floor_saved:
            self._save_floor()
        if report is not None:
            report.tokens = tk
            report.mig = self.eff.mig_json(report.mig)   # its endpoints' tokens per instance
            # each endpoint's tokens go to its GPUs
            shares = self.eff.gpu_rates([g.index for g in report.gpus])
            for g in report.gpus:
                g.extra["tokens_per_second"] = shares.get(g.index) if self.eff.endpoints \
                    else None
            if getattr(report, "efficiency", None) is not None:
                report.efficiency.update({k: fig[k] for k in (
                    "tokens_per_second", "tokens_per_dollar", "cost_per_million_tokens",
                    "tokens_per_joule")})
                report.efficiency["floor"] = self._floor_view(now_mono)
        return report

    def _floor_view(self, now_mono: float) -> Dict[str, Any]:
        """The floor's state for reports: how long below it so far (seconds), not the
        monotonic time it started."""
        since = self.floor.get("below_since")
        return {"inefficient": bool(self.floor.get("inefficient")),
                "below_seconds": None if since is None else max(0.0, now_mono - since)}

    # ------------------------------------------------------------------ the floor's file
    def _load_floor(self) -> None:
        """Whether the floor drained the node before a restart: then it is still inefficient
        (no second on_inefficient) until back at or above the floor for the window, when the
        node_efficient event runs the undrain hook."""
        if not self.state_dir:
            return
        path = os.path.join(self.state_dir, FLOOR_FILE)
        state, problem = load_floor(path)
        if problem:                      # logged and noticed by set_aside
            self._notes.append(problem)
        self.floor["inefficient"] = self._floor_saved = state["inefficient"]
        self.floor["since"] = state["since"]
        if state["inefficient"]:
            since = state["since"]
            LOG.info("the tokens-per-dollar floor drained this node (node_inefficient%s) "
                     "before a restart: on_efficient runs once it is back at or above the "
                     "floor for [efficiency] window_seconds", "" if since is None else
                     _time.strftime(" at %Y-%m-%d %H:%M:%S", _time.localtime(since)))

    def _save_floor(self) -> None:
        """floor.json after a change of the floor's state (retried every cycle until saved)."""
        inefficient = bool(self.floor.get("inefficient"))
        now = self.clock.time() if self.clock is not None else _time.time()
        if not inefficient:
            self.floor["since"] = None
        elif self.floor.get("since") is None:
            self.floor["since"] = now
        if not self.state_dir:
            self._floor_saved = inefficient
            return
        path = os.path.join(self.state_dir, FLOOR_FILE)
        try:
            save_floor(path, self.floor, now)
        except OSError as e:
            why = str(e.strerror or e)
            if why != self._floor_save_error:        # once per distinct error
                LOG.warning("cannot save the floor's state to %s: %s (after a restart "
                            "gpucostd would not know it drained this node); retrying every "
                            "cycle", path, why)
            self._floor_save_error = why
            return
        self._floor_saved = inefficient
        self._floor_save_error = None

    # ------------------------------------------------------------------ persistence
    def _state_path(self) -> Optional[str]:
        return os.path.join(self.state_dir, STATE_FILE) if self.state_dir else None

    def _load(self) -> None:
        path = self._state_path()
        if not path or not os.path.lexists(path):
            return
        try:
            data = read_json(path)
            if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
                raise ValueError(f"unknown version {data.get('version')!r}")
            self._saved = data
            for key, g in (data.get("gpus") or {}).items():
                tr = _GpuTrack(key, int(g.get("index", 0)), g.get("uuid"), g.get("name"))
                for r, v in (g.get("reasons") or {}).items():
                    tr.totals[str(r)] = _triple(v, f"GPU {key} {r}")
                self._tracks[key] = tr
            self._history.update(_expand_history(data.get("history")))
            tokens_lost = data.get("tokens_lost_total") or 0.0
            since = data.get("totals_since")
            if not _finite(tokens_lost) or not (since is None or plausible_epoch(since)):
                raise ValueError("tokens_lost_total or totals_since is not a number")
            self._tokens.tokens_lost_total = float(tokens_lost)
            self.eff.load(data.get("efficiency"))
            self._totals_since = since
            # a GPU that comes back without its identity (LOST readings carry no uuid) is the
            # one last seen at its index
            for key, tr in sorted(self._tracks.items()):
                if tr.uuid:
                    self._by_index.setdefault(tr.index, key)
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, AttributeError, KeyError, IndexError,
                OverflowError, RecursionError) as e:      # UnreadableFile is a ValueError
            # keep every bad file: an earlier one may hold totals someone still wants
            bad, kept = move_aside(path)
            if bad is None:
                # never overwrite what could not be moved aside: totals stay in memory only
                self._no_save = True
                kept += (", so the totals are not saved until it is moved away and the daemon "
                         "restarted")
            self._tracks.clear()
            self._history.clear()
            self._by_index.clear()
            self.eff = EfficiencyBook()       # (its totals, MIG instances' too, may be half read)
            msg = f"{path}: unreadable cost state ({str(e)[:160]}); totals start from zero; {kept}"
            LOG.warning(msg)
            notice(path, msg)
            self._notes.append(msg)

    def state(self, history: bool = True) -> Dict[str, Any]:
        out = {
            "version": STATE_VERSION,
            **stamp(self.clock or RealClock()),
            "totals_since": self._totals_since,
            "currency": self.currency,
            "gpus": {k: {"index": t.index, "uuid": t.uuid, "name": t.name,
                         "reasons": {r: v for r, v in _sorted_reasons(t.totals)}}
                     for k, t in sorted(self._tracks.items())},
            "tokens_lost_total": self._tokens.tokens_lost_total,
            "efficiency": self.eff.state(),
        }
        if history:
            out["history"] = _compact_history(self._history)
        return out

    def _maybe_save(self) -> None:
        if not self._dirty:
            return
        now = _time.monotonic()     # real time: the file is I/O, not part of the model
        if now - self._last_save < self.save_every_seconds:
            return
        self._last_save = now
        self.flush(history=now - self._history_saved_at >= HISTORY_SAVE_EVERY_SECONDS)

    def _serialize(self, history: bool) -> str:
        """The state as JSON. The history (the big part) is re-serialized only when asked;
        otherwise the last serialized history is written again with fresh totals."""
        if history or self._history_json is None:
            self._history_json = json.dumps(_compact_history(self._history),
                                            separators=(",", ":"))
            self._history_saved_at = _time.monotonic()
        rest = self.state(history=False)
        body = json.dumps(rest, separators=(",", ":"), sort_keys=True)
        return '{"history":' + self._history_json + "," + body[1:]

    def flush(self, history: bool = True) -> None:
        """Write the state file now (atomically, fsynced). Errors are logged, not raised."""
        path = self._state_path()
        if not path or self._no_save:
            return
        self._prune(int((self.clock.time() if self.clock else _time.time()) // BUCKET_SECONDS))
        try:
            write_atomic(path, self._serialize(history))
            self._dirty = False
        except OSError as e:
            LOG.warning("cannot save cost totals to %s: %s (check that the directory is "
                        "writable by the daemon); retrying later", path, e.strerror or e)


def breakdown_from_state(config, since_seconds: Optional[float] = None,
                         now: Optional[float] = None) -> Optional[Dict[str, Any]]:
    """cost_breakdown from the saved state file (`gpucostd cost` without a running daemon).
    None when there is no readable state file."""
    path = os.path.join(config.daemon.state_dir, STATE_FILE)
    try:
        data = read_json(path)
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            return None
        return cost_breakdown(data, since_seconds, now=_time.time() if now is None else now)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, OverflowError):
        return None


# --------------------------------------------------------------------------- the floor's file
FLOOR_FILE = "floor.json"       # in the state directory: whether gpucostd drained the node
FLOOR_VERSION = 1


def load_floor(path: str) -> Tuple[Dict[str, Any], Optional[str]]:
    """The floor's saved state, {"inefficient": bool, "since": epoch seconds or None}, and
    None; or, for a file that cannot be used, a fresh state and the message that says so (the
    file is then moved aside to floor.json.bad). A missing file is a fresh state."""
    fresh: Dict[str, Any] = {"inefficient": False, "since": None}
    try:
        data = read_json(path)
        if not isinstance(data, dict) or data.get("version") != FLOOR_VERSION:
            raise ValueError("not a version 1 floor state")
        inefficient, since = data.get("inefficient"), data.get("since")
        if not isinstance(inefficient, bool) or not (since is None or plausible_epoch(since)):
            raise ValueError(f"inefficient = {inefficient!r}, since = {str(since)[:40]}")
        return {"inefficient": inefficient, "since": since if inefficient else None}, None
    except FileNotFoundError:
        return fresh, None
    except ValueError as e:                  # UnreadableFile too
        return fresh, set_aside(path, "floor state", e, "starting fresh: gpucostd does not "
                                "know whether it drained this node (if it did, undrain it by "
                                "hand)")


def save_floor(path: str, state: Mapping[str, Any], now_wall: float) -> None:
    """Write the floor's state (atomically, fsynced). Raises OSError."""
    write_atomic(path, json.dumps({"version": FLOOR_VERSION,
                                   "inefficient": bool(state.get("inefficient")),
                                   "since": state.get("since"), "saved_at": now_wall},
                                  sort_keys=True) + "\n")

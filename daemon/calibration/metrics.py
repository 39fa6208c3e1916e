"""Prometheus families of `gpucostd calibrate` (from snapshot.calibration): whether one
runs and the limit of its current step, and the last calibration's recommended limits and those
its --apply put in force."""
from __future__ import annotations


def metric_families(snapshot) -> list:
    from prometheus_client.core import GaugeMetricFamily

    info = snapshot.calibration
    if not isinstance(info, dict):
        return []
    uuids = {str(g.index): g.uuid or "" for g in snapshot.gpus or ()}
    running = GaugeMetricFamily("gpucostd_calibration_running",
                                "1 while a calibration (power limit or SM clock) runs, else 0.")
    running.add_metric([], 1.0 if info.get("running") else 0.0)
    fams = [running]
    step = GaugeMetricFamily("gpucostd_calibration_step_power_limit_watts",
                             "Power limit the running calibration holds the GPU at now.",
                             labels=["gpu", "uuid"])
    for gpu, watts in sorted(((info.get("progress") or {}).get("limits") or {}).items()):
        step.add_metric([gpu, uuids.get(gpu, "")], float(watts))
    fams.append(step)
    last = info.get("last") or {}
    rec = GaugeMetricFamily("gpucostd_gpu_power_limit_recommended_watts",
                            "Power limit with the most tokens per dollar in the last "
                            "calibration.", labels=["gpu", "uuid"])
    applied = GaugeMetricFamily("gpucostd_gpu_power_limit_applied_watts",
                                "Power limit written by `gpucostd calibrate --apply` (while "
                                "its drop-in is in place).", labels=["gpu", "uuid"])
    for fam, key in ((rec, "recommended"), (applied, "applied")):
        for gpu, v in sorted((last.get(key) or {}).items()):
            fam.add_metric([gpu, v.get("uuid") or uuids.get(gpu, "")], float(v["watts"]))
    fams += [rec, applied]
    clock = GaugeMetricFamily("gpucostd_calibration_step_sm_clock_hertz",
                              "Highest SM clock the running calibration locks the GPU to now.",
                              labels=["gpu", "uuid"])
    for gpu, mhz in sorted(((info.get("progress") or {}).get("clocks") or {}).items()):
        clock.add_metric([gpu, uuids.get(gpu, "")], float(mhz) * 1e6)
    crec = GaugeMetricFamily("gpucostd_gpu_sm_clock_recommended_hertz",
                             "Highest locked SM clock with the most tokens per dollar in the "
                             "last calibration.", labels=["gpu", "uuid"])
    capplied = GaugeMetricFamily("gpucostd_gpu_sm_clock_applied_hertz",
                                 "Highest locked SM clock written by `gpucostd calibrate "
                                 "--apply` (while its drop-in is in place).",
                                 labels=["gpu", "uuid"])
    for fam, key in ((crec, "recommended_clocks"), (capplied, "applied_clocks")):
        for gpu, v in sorted((last.get(key) or {}).items()):
            fam.add_metric([gpu, v.get("uuid") or uuids.get(gpu, "")], float(v["mhz"]) * 1e6)
    fams += [clock, crec, capplied]
    if last.get("finished_at") is not None:
        when = GaugeMetricFamily("gpucostd_calibration_last_timestamp_seconds",
                                 "Wall time the last calibration ended.")
        when.add_metric([], float(last["finished_at"]))
        ok = GaugeMetricFamily("gpucostd_calibration_last_success",
                               "1 when the last calibration completed, 0 when it was "
                               "aborted or refused.")
        ok.add_metric([], 1.0 if last.get("state") == "done" else 0.0)
        fams += [when, ok]
    return fams

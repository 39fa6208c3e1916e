"""Health rules, sticky faults and their persistence, ack, health metrics."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest

from conftest import exposition

from gpucostd import config as config_mod
from gpucostd.clock import VirtualClock
from gpucostd.health.judge import HealthJudge, normalize_bus_id
from gpucostd.views.metrics_health import metric_families
from gpucostd.snapshot import GpuReading, GpuState, NodeSnapshot, Severity

BUS = ["00000000:1B:00.0", "00000000:43:00.0", "00000000:52:00.0", "00000000:61:00.0",
       "00000000:9D:00.0", "00000000:C3:00.0", "00000000:D1:00.0", "00000000:DF:00.0"]


@dataclass(frozen=True)
class Fault:
    """Stand-in with the fields of probes.kernel_log.KernelFault."""
    time: Optional[float]
    pci_bus_id: Optional[str]
    xid: int
    message: str = ""
    raw: str = ""
    process_name: Optional[str] = None
    dedupe_key: Optional[str] = None


def gpu(index=0, **kw) -> GpuReading:
    base = dict(index=index, uuid=f"GPU-0000000{index}-aaaa-bbbb-cccc-dddddddddddd",
                name="NVIDIA H100 80GB HBM3", pci_bus_id=BUS[index], temperature_celsius=50.0,
                temp_slowdown_celsius=87.0, temp_shutdown_celsius=92.0,
                clock_event_reasons=(), utilization_percent=0.0, ecc_mode=True,
                ecc_volatile_corrected=0, ecc_volatile_uncorrected=0,
                ecc_aggregate_corrected=10, ecc_aggregate_uncorrected=0,
                remapped_rows_correctable=0, remapped_rows_uncorrectable=0,
                remapped_rows_pending=False, remapped_rows_failure=False,
                pcie_link_gen=5, pcie_link_gen_max=5, pcie_link_width=16,
                pcie_link_width_max=16, pcie_replay_count=0)
    base.update(kw)
    return GpuReading(**base)


def cfg(text=""):
    return config_mod.parse(text)


@pytest.fixture
def clock():
    return VirtualClock()


@pytest.fixture
def boot(tmp_path):
    p = tmp_path / "boot_id"
    p.write_text("11111111-2222-3333-4444-555555555555\n")
    return p


def make(tmp_path, clock, boot, text=""):
    return HealthJudge(cfg(text), clock, str(tmp_path / "state"), boot_id_path=str(boot))


def step(judge, clock, gpus, faults=(), dt=1.0):
    clock.advance(dt)
    return judge.judge(gpus, list(faults), clock.time())


def codes(report, index=None):
    return {f.code: f for f in report.findings
            if index is None or f.subject == f"gpu:{index}"}


def test_normalize_bus_id():
    assert normalize_bus_id("00000000:9B:00.0") == "0000:9b:00.0"
    assert normalize_bus_id("0000:9b:00") == "0000:9b:00.0"
    assert normalize_bus_id("PCI:0009:01:00") == "0009:01:00.0"
    assert normalize_bus_id("not a bus") is None
    assert normalize_bus_id(None) is None
    assert normalize_bus_id("pci:0000:9b:00") == "0000:9b:00.0"
    assert normalize_bus_id(["not", "hashable"]) is None
    # VMD puts GPUs in PCI domains above ffff: they must not fold onto domain 0
    assert normalize_bus_id("00010000:01:00.0") == "10000:01:00.0"
    assert normalize_bus_id("PCI:10000:01:00") == "10000:01:00.0"


def test_healthy_gpus_are_ok_and_emit_no_events(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot)
    r = step(j, clock, [gpu(0), gpu(1)])
    assert r.gpu_health == {0: Severity.OK, 1: Severity.OK}
    assert r.node_health == Severity.OK
    assert [f for f in r.findings if f.severity != Severity.OK] == []
    assert r.events == []


def test_new_uncorrectable_ecc_is_crit_with_event(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot)
    step(j, clock, [gpu(0, ecc_volatile_uncorrected=2, ecc_aggregate_uncorrected=5)])
    r = step(j, clock, [gpu(0, ecc_volatile_uncorrected=2, ecc_aggregate_uncorrected=5)])
    assert r.gpu_health[0] == Severity.OK            # old errors are the baseline, not new
    r = step(j, clock, [gpu(0, ecc_volatile_uncorrected=3, ecc_aggregate_uncorrected=6)])
    assert r.gpu_health[0] == Severity.CRIT and r.node_health == Severity.CRIT
    f = codes(r)["ecc_uncorrected"]
    assert "1 new uncorrectable" in f.message and f.since == clock.time()
    ev = {e.code: e for e in r.events}
    assert ev["ecc_uncorrected"].severity == Severity.CRIT
    hc = [e for e in r.events if e.code == "health_change"]
    assert [(e.subject, e.gpu, e.fields["to"]) for e in hc] == [("gpu:0", 0, "CRIT"),
                                                                  ("node", None, "CRIT")]
    assert {e.subject for e in r.events if e.code == "health_change"} == {"gpu:0", "node"}
    # no repeated event while the count stays
    r = step(j, clock, [gpu(0, ecc_volatile_uncorrected=3, ecc_aggregate_uncorrected=6)])
    assert r.gpu_health[0] == Severity.CRIT and r.events == []
    # the baseline survives a restart of the daemon (same boot)
    j2 = make(tmp_path, clock, boot)
    r = step(j2, clock, [gpu(0, ecc_volatile_uncorrected=3, ecc_aggregate_uncorrected=6)])
    assert r.gpu_health[0] == Severity.CRIT
    assert not [e for e in r.events if e.code == "health_change"]   # health was persisted too
    # a GPU reset (volatile counters drop) clears it
    r = step(j2, clock, [gpu(0, ecc_volatile_uncorrected=0, ecc_aggregate_uncorrected=6)])
    assert r.gpu_health[0] == Severity.OK
    assert "gpu_reset" in {e.code for e in r.events}


def test_remap_pending_is_warn_reset_gpu(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot)
    step(j, clock, [gpu(0)])
    r = step(j, clock, [gpu(0, remapped_rows_pending=True)])
    assert r.gpu_health[0] == Severity.WARN
    f = codes(r)["remap_pending"]
    assert f.action == "reset GPU" and f.severity == Severity.WARN
    assert "remap_pending" in {e.code for e in r.events}
    r = step(j, clock, [gpu(0, remapped_rows_pending=True)])
    assert "remap_pending" not in {e.code for e in r.events}


def test_remap_failure_is_crit_rma_and_sticky(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot)
    step(j, clock, [gpu(0)])
    r = step(j, clock, [gpu(0, remapped_rows_failure=True)])
    f = codes(r)["remap_failure"]
    assert f.severity == Severity.CRIT and "RMA" in f.action
    assert r.gpu_health[0] == Severity.CRIT
    assert "remap_failure" in {e.code for e in r.events}
    # the reading goes away (e.g. NVML stops reporting it): still CRIT, also after a restart
    r = step(j, clock, [gpu(0, remapped_rows_failure=None)])
    assert r.gpu_health[0] == Severity.CRIT
    j2 = make(tmp_path, clock, boot)
    r = step(j2, clock, [gpu(0, remapped_rows_failure=None)])
    assert codes(r)["remap_failure"].severity == Severity.CRIT
    acks = j2.ack(0, "remap_failure")
    assert [e.code for e in acks] == ["ack"] and acks[0].fields["cleared"] == "remap_failure"
    r = step(j2, clock, [gpu(0, remapped_rows_failure=True)])   # acked: not raised again
    assert r.gpu_health[0] == Severity.OK


def test_lost_gpu_is_crit_with_event_and_recovers_when_back(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot)
    step(j, clock, [gpu(0), gpu(1)])
    lost = GpuReading(index=1, state=GpuState.LOST, error="GPU is lost", uuid=gpu(1).uuid,
                      pci_bus_id=BUS[1])
    r = step(j, clock, [gpu(0), lost])
    assert r.gpu_health == {0: Severity.OK, 1: Severity.CRIT}
    assert r.node_health == Severity.CRIT
    assert codes(r, 1)["gpu_lost"].severity == Severity.CRIT
    assert "gpu_lost" in {e.code for e in r.events}
    r = step(j, clock, [gpu(0), lost])
    assert "gpu_lost" not in {e.code for e in r.events}
    r = step(j, clock, [gpu(0), gpu(1)])
    assert r.gpu_health[1] == Severity.OK
    assert {"gpu_reset", "health_change"} <= {e.code for e in r.events}


def _lost(index, uuid=None, error=None):
    return GpuReading(index=index, state=GpuState.LOST, uuid=uuid, pci_bus_id=BUS[index],
                      error=error or f"GPU {index}: GPU is lost (NVML_ERROR_GPU_IS_LOST)")


def _standing_codes(report):
    return sorted(e.code for e in report.events
                  if e.code in ("gpu_lost", "remap_pending", "remap_failure",
                                "retired_pages_pending"))


def test_restart_does_not_report_standing_faults_again(tmp_path, clock, boot):
    faulty = dict(remapped_rows_pending=True, remapped_rows_failure=True,
                  retired_pages_pending=True)
    j = make(tmp_path, clock, boot)
    # GPU 1 is lost from the first reading: the probe never learnt its uuid
    r = step(j, clock, [gpu(0, **faulty), _lost(1), gpu(2), _lost(3, uuid=gpu(3).uuid)])
    assert _standing_codes(r) == ["gpu_lost", "gpu_lost", "remap_failure", "remap_pending",
                                  "retired_pages_pending"]
    lost = [e for e in r.events if e.code == "gpu_lost"]
    assert lost[0].message == "GPU 1 is lost: GPU is lost (NVML_ERROR_GPU_IS_LOST)"
    assert codes(r, 1)["gpu_lost"].message.count("GPU 1") == 0
    state = (tmp_path / "state" / "health.json").stat().st_mtime_ns
    for _ in range(3):                                   # nothing changes: no writes
        r = step(j, clock, [gpu(0, **faulty), _lost(1), gpu(2), _lost(3, uuid=gpu(3).uuid)])
        assert _standing_codes(r) == []
    assert (tmp_path / "state" / "health.json").stat().st_mtime_ns == state

    j2 = make(tmp_path, clock, boot)                     # daemon restart, same boot
    # GPU 3's reading lost its uuid across the restart (the probe starts without identity)
    r = step(j2, clock, [gpu(0, **faulty), _lost(1), gpu(2), _lost(3)])
    assert _standing_codes(r) == [], r.events
    assert r.gpu_health == {0: Severity.CRIT, 1: Severity.CRIT, 2: Severity.OK,
                            3: Severity.CRIT}
    assert [e for e in r.events if e.code == "health_change"] == []
    # GPU 3 answers again: reset detected (lost before the restart, OK after)
    r = step(j2, clock, [gpu(0, **faulty), _lost(1), gpu(2), gpu(3)])
    resets = [e for e in r.events if e.code == "gpu_reset"]
    assert [e.gpu for e in resets] == [3] and _standing_codes(r) == []

    j3 = make(tmp_path, clock, boot)                     # a second restart: GPU 3 is OK
    r = step(j3, clock, [gpu(0, **faulty), _lost(1), gpu(2), gpu(3)])
    assert _standing_codes(r) == [] and not [e for e in r.events if e.code == "gpu_reset"]
    r = step(j3, clock, [gpu(0, **faulty), _lost(1), gpu(2), _lost(3, uuid=gpu(3).uuid)])
    assert _standing_codes(r) == ["gpu_lost"]            # lost anew: reported

    boot.write_text("99999999-2222-3333-4444-555555555555\n")   # host rebooted
    j4 = make(tmp_path, clock, boot)
    r = step(j4, clock, [gpu(0, **faulty), _lost(1), gpu(2), _lost(3)])
    assert _standing_codes(r) == ["gpu_lost", "gpu_lost", "remap_failure", "remap_pending",
                                  "retired_pages_pending"]


def test_reset_clears_the_reported_flags(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot)
    r = step(j, clock, [gpu(0, remapped_rows_pending=True, ecc_volatile_corrected=5)])
    assert _standing_codes(r) == ["remap_pending"]
    # volatile ECC counters drop: the GPU was reset; a remap still pending is reported again
    r = step(j, clock, [gpu(0, remapped_rows_pending=True, ecc_volatile_corrected=0)])
    assert "gpu_reset" in {e.code for e in r.events}
    assert _standing_codes(r) == ["remap_pending"]
    r = step(j, clock, [gpu(0, remapped_rows_pending=False)])
    j2 = make(tmp_path, clock, boot)                     # cleared flag is saved too
    r = step(j2, clock, [gpu(0, remapped_rows_pending=True)])
    assert _standing_codes(r) == ["remap_pending"]


def test_unresponsive_is_crit_and_unknown_is_unknown(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot)
    r = step(j, clock, [GpuReading(index=0, state=GpuState.UNRESPONSIVE,
                                   error="nvmlDeviceGetPowerUsage overran its 2 s deadline"),
                        GpuReading(index=1, state=GpuState.UNKNOWN,
                                   error="NVML unavailable: driver not loaded")])
    assert r.gpu_health == {0: Severity.CRIT, 1: Severity.UNKNOWN}
    assert r.node_health == Severity.CRIT
    assert "deadline" in codes(r, 0)["gpu_unresponsive"].message
    assert "driver not loaded" in codes(r, 1)["gpu_unknown"].message
    r = step(j, clock, [GpuReading(index=1, state=GpuState.UNKNOWN, error="no driver")])
    assert r.node_health == Severity.UNKNOWN


def test_slowdown_warn_then_crit_after_fraction_of_window(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot, "[health]\nslowdown_window_seconds = 100.0\n")
    for _ in range(10):
        r = step(j, clock, [gpu(0)])
    slow = gpu(0, clock_event_reasons=("HwThermalSlowdown",))
    r = step(j, clock, [slow])
    assert r.gpu_health[0] == Severity.WARN
    assert "HwThermalSlowdown" in codes(r)["hw_slowdown"].message
    seen = []
    for _ in range(70):
        r = step(j, clock, [slow])
        seen.append(r.gpu_health[0])
    # active from t=11 on, sampled every second: more than 60 of the last 100 s after 61 s
    assert seen[:59] == [Severity.WARN] * 59
    assert seen[-1] == Severity.CRIT
    first_crit = seen.index(Severity.CRIT)
    assert 59 <= first_crit <= 61
    # slowdown ends: still CRIT while the window holds > 60 % active time, then OK
    results = [step(j, clock, [gpu(0)]).gpu_health[0] for _ in range(60)]
    assert results[0] == Severity.CRIT and results[-1] == Severity.OK


def test_slowdown_counts_only_observed_time(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot, "[health]\nslowdown_window_seconds = 100.0\n")
    slow = gpu(0, clock_event_reasons=("HwSlowdown",))
    step(j, clock, [slow])
    r = step(j, clock, [slow], dt=90.0)    # a 90 s gap we did not watch does not count
    assert r.gpu_health[0] == Severity.WARN
    assert codes(r)["hw_slowdown"].message == "HwSlowdown active"     # 0 % observed


def test_sw_power_cap_ok_by_default_warn_when_configured(tmp_path, clock, boot):
    capped = gpu(0, clock_event_reasons=("SwPowerCap",))
    j = make(tmp_path, clock, boot)
    r = step(j, clock, [capped])
    assert codes(r)["sw_power_cap"].severity == Severity.OK
    assert r.gpu_health[0] == Severity.OK
    j2 = make(tmp_path / "b", clock, boot, '[health]\nsw_power_cap = "warn"\n')
    r = step(j2, clock, [capped])
    assert codes(r)["sw_power_cap"].severity == Severity.WARN
    assert r.gpu_health[0] == Severity.WARN


def test_temperature_margin(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot, "[health]\ntemperature_margin_celsius = 5.0\n")
    assert step(j, clock, [gpu(0, temperature_celsius=81.0)]).gpu_health[0] == Severity.OK
    r = step(j, clock, [gpu(0, temperature_celsius=82.0)])
    assert r.gpu_health[0] == Severity.WARN
    assert "within 5 °C of slowdown 87 °C" in codes(r)["temperature_near_slowdown"].message
    assert step(j, clock, [gpu(0, temperature_celsius=None)]).gpu_health[0] == Severity.OK


def test_corrected_ecc_rate(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot, "[health]\ncorrected_ecc_per_hour = 100.0\n")
    step(j, clock, [gpu(0, ecc_volatile_corrected=1000)])
    r = step(j, clock, [gpu(0, ecc_volatile_corrected=1100)], dt=60)
    assert r.gpu_health[0] == Severity.OK                         # 100 is not above 100
    r = step(j, clock, [gpu(0, ecc_volatile_corrected=1101)], dt=60)
    assert codes(r)["ecc_corrected_rate"].severity == Severity.WARN
    r = step(j, clock, [gpu(0, ecc_volatile_corrected=1101)], dt=3600)
    assert r.gpu_health[0] == Severity.OK                         # an hour later


def test_retired_pages_pending_is_warn(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot)
    r = step(j, clock, [gpu(0, retired_pages_pending=True)])
    assert codes(r)["retired_pages_pending"].severity == Severity.WARN


def test_pcie_degraded_only_while_busy(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot)
    narrow = dict(pcie_link_gen=4, pcie_link_width=8)
    assert step(j, clock, [gpu(0, utilization_percent=5.0, **narrow)]).gpu_health[0] \
        == Severity.OK
    r = step(j, clock, [gpu(0, utilization_percent=90.0, **narrow)])
    assert r.gpu_health[0] == Severity.WARN
    assert "Gen4 x8" in codes(r)["pcie_degraded"].message
    assert step(j, clock, [gpu(0, utilization_percent=90.0)]).gpu_health[0] == Severity.OK


def test_xid_maps_bus_id_to_gpu_with_catalog_severity(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot)
    step(j, clock, [gpu(0), gpu(4)])
    f = Fault(clock.time(), "0000:9d:00.0", 13, "pid=1, name=python, Graphics SM exception",
              dedupe_key="k1", process_name="python")
    r = step(j, clock, [gpu(0), gpu(4)], [f])
    xe = [e for e in r.events if e.code == "xid"]
    assert len(xe) == 1 and xe[0].gpu == 4 and xe[0].xid == 13
    assert xe[0].uuid == gpu(4).uuid and xe[0].subject == "gpu:4"
    assert xe[0].severity == Severity.WARN and xe[0].fields["dedupe_key"] == "k1"
    assert r.gpu_health[4] == Severity.WARN and codes(r, 4)["xid_13"].since == f.time
    # a non-sticky Xid ages out
    r = step(j, clock, [gpu(0), gpu(4)], dt=601)
    assert r.gpu_health[4] == Severity.OK


def test_xid_on_unknown_bus_is_a_node_finding(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot)
    r = step(j, clock, [gpu(0)], [Fault(clock.time(), "0000:ee:00.0", 79, "fallen off")])
    e = [e for e in r.events if e.code == "xid"][0]
    assert e.subject == "node" and e.gpu is None and e.severity == Severity.CRIT
    assert r.gpu_health[0] == Severity.OK
    assert r.node_health == Severity.CRIT
    assert codes(r)["xid_79"].subject == "node"


def test_sticky_xid_persists_across_restart_and_clears_on_new_boot(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot)
    step(j, clock, [gpu(0), gpu(1)])
    r = step(j, clock, [gpu(0), gpu(1)], [Fault(clock.time(), "0000:43:00.0", 48, "DBE")])
    assert r.gpu_health[1] == Severity.CRIT
    r = step(j, clock, [gpu(0), gpu(1)], dt=3600)        # sticky: does not age out
    assert r.gpu_health[1] == Severity.CRIT
    j2 = make(tmp_path, clock, boot)                     # daemon restart, same boot
    r = step(j2, clock, [gpu(0), gpu(1)])
    assert r.gpu_health[1] == Severity.CRIT and "xid_48" in codes(r, 1)
    boot.write_text("99999999-2222-3333-4444-555555555555\n")   # host rebooted
    j3 = make(tmp_path, clock, boot)
    r = step(j3, clock, [gpu(0), gpu(1)])
    assert r.gpu_health[1] == Severity.OK
    hc = [e for e in r.events if e.code == "health_change" and e.subject == "gpu:1"]
    assert hc and hc[0].fields["from"] == "CRIT" and hc[0].fields["to"] == "OK"


def test_sticky_xid_clears_on_ack(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot)
    step(j, clock, [gpu(0)])
    step(j, clock, [gpu(0)], [Fault(clock.time(), "0000:1b:00.0", 79, "fallen off the bus"),
                              Fault(clock.time(), "0000:1b:00.0", 119, "GSP timeout")])
    assert j.ack(0, "7") == []                            # nothing of that code
    acks = j.ack(0, "79")
    assert [(e.code, e.fields["cleared"], e.subject) for e in acks] == [
        ("ack", "xid_79", "gpu:0")]
    r = step(j, clock, [gpu(0)])
    assert r.gpu_health[0] == Severity.CRIT               # 119 still there
    assert {e.fields["cleared"] for e in j.ack(0)} == {"xid_119"}
    r = step(j, clock, [gpu(0)])
    assert r.gpu_health[0] == Severity.OK
    j2 = make(tmp_path, clock, boot)                      # the ack is persisted
    assert step(j2, clock, [gpu(0)]).gpu_health[0] == Severity.OK


def test_corrupt_state_file_is_survived(tmp_path, clock, boot):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "health.json").write_text("{not json")
    j = make(tmp_path, clock, boot)
    assert step(j, clock, [gpu(0)]).gpu_health[0] == Severity.OK


def test_metric_families(tmp_path, clock, boot):

    gpus = (gpu(0, violation_seconds={"power": 1.5, "thermal": 0.0}, retired_pages_sbe=None,
                memory_temperature_celsius=None),
            GpuReading(index=1, state=GpuState.LOST, uuid="GPU-x"))
    snap = NodeSnapshot(time=0.0, monotonic=0.0, cycle=1, hostname="h", started_at=0.0,
                        nvml_available=True, nvml_error=None, driver_version=None,
                        cuda_version=None, gpus=gpus,
                        gpu_health={0: Severity.OK, 1: Severity.CRIT},
                        node_health=Severity.CRIT,
                        counters={"xid_totals": {(1, 79): 2, (None, 13): 1}})

    text = exposition(metric_families(snap))
    assert 'gpucostd_gpu_health{gpu="1",uuid="GPU-x"} 2.0' in text
    assert "gpucostd_node_health 2.0" in text
    assert 'gpucostd_gpu_xid_errors_total{gpu="1",uuid="GPU-x",xid="79"} 2.0' in text
    assert 'gpucostd_gpu_xid_errors_total{gpu="",uuid="",xid="13"} 1.0' in text
    assert ('gpucostd_gpu_ecc_errors_total{counter="aggregate",gpu="0",type="corrected",'
            in text or 'type="corrected"' in text)
    assert 'gpucostd_gpu_lost{gpu="1",uuid="GPU-x"} 1.0' in text
    assert 'gpucostd_gpu_violation_seconds_total{gpu="0",' in text and 'policy="power"' in text
    assert 'kind="max"' in text and "gpucostd_gpu_pcie_replay_errors_total" in text
    # absent readings are left out, never 0
    assert 'cause="sbe"' not in text
    assert 'gpucostd_gpu_memory_temperature_celsius{' not in text
    assert 'gpucostd_gpu_ecc_errors_total{counter="volatile",gpu="1"' not in text


FAULT_SCENARIO = """
[node]
model = "NVIDIA H100 80GB HBM3"
gpu_count = 4

[gpu_defaults]
temperature = 60
utilization = 90
ecc_mode = true
unsupported = ["retired_pages"]

[[gpu]]
index = 1
pci_bus_id = "00000000:2A:00.0"

[[gpu]]
index = 2
pci_bus_id = "00000000:3A:00.0"

[[at]]
t = 5
gpu = 1
ecc_volatile_uncorrected = 1
ecc_aggregate_uncorrected = 1
remapped_rows_pending = true
kernel_log = "NVRM: Xid (PCI:0000:2a:00): 48, pid=77, name=train.py, An uncorrectable double bit error (DBE) has been detected on GPU in the framebuffer at partition 6, subpartition 0."

[[at]]
t = 10
gpu = 2
lost = true
kernel_log = "NVRM: GPU 0000:3a:00.0: GPU has fallen off the bus."

[[at]]
t = 20
gpu = 1
reset = true
remapped_rows_pending = false
"""


def test_scenario_ecc_remap_and_lost_gpu_through_the_daemon(tmp_path):
    """The real simulator, NVML gateway, GPU probe, kernel line parser and loop, on virtual
    time: uncorrectable ECC + Xid 48 + remap pending on GPU 1, GPU 2 falls off the bus."""
    from gpucostd.loop import Daemon

    scenario = tmp_path / "faults.toml"
    scenario.write_text(FAULT_SCENARIO)
    state = tmp_path / "state"
    conf = cfg(f'[daemon]\nstate_dir = "{state}"\nlisten_address = ""\nkernel_log = "none"\n'
               f'interval_seconds = 1.0\n')
    clock = VirtualClock()
    daemon = Daemon(conf, clock=clock, simulate=str(scenario))
    snaps = {}
    for t in range(26):
        snaps[t] = daemon.step()
        clock.advance(1.0)
    before, ecc, lost, reset = snaps[3], snaps[7], snaps[12], snaps[23]
    assert before.node_health == Severity.OK
    f = {(x.subject, x.code): x for x in ecc.findings}
    assert ecc.gpu_health[1] == Severity.CRIT and ecc.node_health == Severity.CRIT
    assert f[("gpu:1", "ecc_uncorrected")].severity == Severity.CRIT
    assert f[("gpu:1", "remap_pending")].action == "reset GPU"
    assert f[("gpu:1", "xid_48")].severity == Severity.CRIT
    f = {(x.subject, x.code): x for x in lost.findings}
    assert lost.gpu_health[2] == Severity.CRIT
    assert ("gpu:2", "gpu_lost") in f and ("gpu:2", "xid_79") in f
    assert lost.gpu_health[0] == Severity.OK and lost.gpu_health[3] == Severity.OK
    # the reset of GPU 1 clears its sticky Xid 48 and the ECC finding; GPU 2 stays lost
    assert reset.gpu_health[1] == Severity.OK, reset.findings
    assert reset.gpu_health[2] == Severity.CRIT and reset.node_health == Severity.CRIT
    codes_seen = [e.code for e in daemon.store.query()]
    for code in ("xid", "ecc_uncorrected", "remap_pending", "gpu_lost", "health_change",
                 "gpu_reset"):
        assert code in codes_seen, codes_seen
    xids = {(e.gpu, e.xid) for e in daemon.store.query() if e.code == "xid"}
    assert xids == {(1, 48), (2, 79)}

    text = exposition(metric_families(lost))
    assert 'gpucostd_gpu_health{gpu="2",uuid=' in text
    assert 'gpucostd_gpu_lost{gpu="2"' in text and "gpucostd_node_health 2.0" in text
    assert 'xid="48"} 1.0' in text and 'xid="79"} 1.0' in text
    assert 'gpucostd_gpu_remapped_rows_pending{gpu="1"' in text
    daemon.shutdown(system_shutdown=True)


def test_state_file_with_wrong_types_is_survived(tmp_path, clock, boot):
    import json
    (tmp_path / "state").mkdir()
    good = {"xid": 48, "since": 1.0, "last": 1.0, "count": 1, "severity": "CRIT",
            "action": "reset GPU", "name": "DBE", "sticky": True, "uuid": gpu(1).uuid}
    (tmp_path / "state" / "health.json").write_text(json.dumps({
        "version": 1, "boot_id": boot.read_text().strip(),
        "latched": {"gpu:0": {"xid_13": {"xid": 13, "last": "yesterday", "count": "many"},
                              "xid_31": "not a record"},
                    "gpu:1": {"xid_48": good}},
        "ecc_baseline": {gpu(0).uuid: {"vu": "0", "au": None, "reported": 0}},
        "acked": {}, "health": {}, "flags": {}}))
    j = make(tmp_path, clock, boot)
    r = step(j, clock, [gpu(0), gpu(1)])
    assert r.gpu_health == {0: Severity.OK, 1: Severity.CRIT}     # the valid record is kept
    r = step(j, clock, [gpu(0, ecc_volatile_uncorrected=2), gpu(1)])
    assert codes(r, 0)["ecc_uncorrected"].message == "2 new uncorrectable ECC errors"


def test_lost_gpu_seen_unknown_in_between_is_still_lost_then_reset(tmp_path, clock, boot):
    # NVML can be unavailable for a while (driver reloaded, re-init) around a lost GPU
    j = make(tmp_path, clock, boot)
    step(j, clock, [gpu(0)])
    unknown = GpuReading(index=0, state=GpuState.UNKNOWN, error="NVML unavailable")
    r = step(j, clock, [_lost(0, gpu(0).uuid)],
             [Fault(clock.time(), "0000:1b:00.0", 79, "fallen off the bus")])
    assert _standing_codes(r) == ["gpu_lost"]
    step(j, clock, [unknown])
    r = step(j, clock, [_lost(0, gpu(0).uuid)])
    assert _standing_codes(r) == []                 # the same loss, not reported again
    step(j, clock, [unknown])
    j2 = make(tmp_path, clock, boot)                # and across a restart while unknown
    step(j2, clock, [unknown])
    r = step(j2, clock, [gpu(0)])                   # it answers again: it was reset
    assert [e.fields["cleared"] for e in r.events if e.code == "gpu_reset"] == ["xid_79"]
    assert r.gpu_health[0] == Severity.OK


def test_xid_missing_from_the_catalog_is_named_once(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot)
    step(j, clock, [gpu(0)])
    r = step(j, clock, [gpu(0)], [Fault(clock.time(), "0000:1b:00.0", 9999, "something new")])
    (e,) = [e for e in r.events if e.code == "xid"]
    assert e.message == "Xid 9999 (not in gpucostd's catalog) on GPU 0: something new"
    f = codes(r, 0)["xid_9999"]
    assert (f.severity, f.action) == (Severity.WARN, "look up")
    assert f.message == "Xid 9999 (not in gpucostd's catalog)"
    r = step(j, clock, [gpu(0)], [Fault(clock.time(), "0000:1b:00.0", 13, "SM exception")])
    (e,) = [e for e in r.events if e.code == "xid"]
    assert e.message.startswith("Xid 13 (") and ") on GPU 0: SM exception" in e.message


def test_xid_in_a_vmd_domain_maps_to_that_gpu_not_to_domain_0(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot)
    gpus = [gpu(0, pci_bus_id="00010000:01:00.0"), gpu(1, pci_bus_id="00000000:01:00.0")]
    step(j, clock, gpus)
    r = step(j, clock, gpus, [Fault(clock.time(), "10000:01:00.0", 13, "SM exception")])
    assert [e.gpu for e in r.events if e.code == "xid"] == [0]
    assert r.gpu_health == {0: Severity.WARN, 1: Severity.OK}
    r = step(j, clock, gpus, [Fault(clock.time(), "0000:01:00.0", 31, "MMU fault")])
    assert [e.gpu for e in r.events if e.code == "xid"] == [1]


def test_slowdown_share_matches_a_recount_of_every_sample(tmp_path, clock, boot):
    import random
    import re
    rnd = random.Random(7)
    window = 100.0
    j = make(tmp_path, clock, boot, f"[health]\nslowdown_window_seconds = {window}\n")
    samples = []                      # (monotonic, active) as judged
    max_gap = 5.0                     # max(3 x 1 s, 1 s + 2 x 2 s, 5 s) with the defaults
    for _ in range(600):
        dt = rnd.choice([1.0, 1.0, 1.0, 0.5, 2.0, 7.0])
        active = rnd.random() < 0.7
        r = step(j, clock, [gpu(0, clock_event_reasons=("HwSlowdown",) if active else ())], dt=dt)
        now = clock.monotonic()
        samples.append((now, active))
        busy = 0.0
        for (t0, a0), (t1, _) in zip(samples, samples[1:]):
            if a0 and 0 < t1 - t0 <= max_gap:
                busy += max(0.0, t1 - max(t0, now - window))
        want = busy / window
        f = codes(r, 0).get("hw_slowdown")
        m = re.search(r"(\d+)% of the last", f.message) if f else None
        if m:
            assert abs(int(m.group(1)) / 100 - want) <= 0.006, (now, f.message, want)
        else:
            assert want < 0.01 or (f is None and not active and want <= 0.6)
        if abs(want - 0.6) > 0.01:
            assert (f is not None and f.severity == Severity.CRIT) == (want > 0.6)


def test_long_reading_errors_keep_their_fix_and_name_the_gpu_once(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot)
    pynvml = ("the Python package nvidia-ml-py (module pynvml) cannot be imported (No module "
              "named 'pynvml'); install it: pip install nvidia-ml-py; retrying every 30 s")
    stuck = ("GPU 0 is unresponsive: nvmlDeviceGetPowerUsage has not returned for 12 s "
             "(deadline 2 s); not calling it again until it returns")
    r = step(j, clock, [GpuReading(index=0, state=GpuState.UNRESPONSIVE, error=stuck),
                        GpuReading(index=1, state=GpuState.UNKNOWN, error=pynvml)],
             )
    assert codes(r, 0)["gpu_unresponsive"].message == (
        "GPU not responding: nvmlDeviceGetPowerUsage has not returned for 12 s (deadline 2 s); "
        "not calling it again until it returns")
    assert codes(r, 1)["gpu_unknown"].message.endswith("pip install nvidia-ml-py; retrying "
                                                        "every 30 s")
    r = j.judge([], [], clock.time(), nvml_error=pynvml)
    assert "pip install nvidia-ml-py" in codes(r)["nvml_unavailable"].message


def test_fault_from_an_earlier_boot_is_recorded_but_not_latched(tmp_path, clock, boot):
    from gpucostd.probes.kernel_log import KernelFault
    j = make(tmp_path, clock, boot)
    step(j, clock, [gpu(0)])
    old = KernelFault(time=clock.time() - 60, pci_bus_id="0000:1b:00.0", xid=79,
                      message="GPU has fallen off the bus.", raw="", dedupe_key="c1",
                      previous_boot=True)
    r = step(j, clock, [gpu(0)], [old])
    (e,) = [e for e in r.events if e.code == "xid"]
    assert e.xid == 79 and e.gpu == 0 and e.fields["previous_boot"] is True
    assert e.message.endswith("(before the last reboot)")
    assert r.gpu_health[0] == Severity.OK and "xid_79" not in codes(r, 0)


def test_sticky_fault_of_a_gpu_that_vanished_from_nvml_keeps_the_node_crit(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot)
    step(j, clock, [gpu(0), gpu(1)])
    r = step(j, clock, [gpu(0), gpu(1)], [Fault(clock.time(), "0000:43:00.0", 79, "fell off")])
    assert r.node_health == Severity.CRIT
    r = step(j, clock, [gpu(0)])                   # NVML re-initialized without GPU 1
    assert r.node_health == Severity.CRIT
    assert not [e for e in r.events if e.code == "health_change" and e.subject == "node"]
    (f,) = [f for f in r.findings if f.subject == "node" and f.code != "gpu_missing"]
    assert f.code == "xid_79" and f.gpu is None and f.severity == Severity.CRIT
    assert f.message.startswith("GPU 1, not read this cycle: Xid 79")
    # the GPU left NVML's count: it is also missing from the node's inventory
    (m,) = [f for f in r.findings if f.code == "gpu_missing"]
    assert gpu(1).uuid in m.message and m.severity == Severity.CRIT
    r = step(j, clock, [])                         # nothing readable at all
    assert r.node_health == Severity.CRIT
    assert [e.fields["cleared"] for e in j.ack(1)] == ["xid_79"]
    assert step(j, clock, [gpu(0)]).node_health == Severity.CRIT     # still missing
    assert [e.fields["cleared"] for e in j.ack("node", "gpu_missing")] == ["gpu_missing"]
    assert step(j, clock, [gpu(0)]).node_health == Severity.OK


def test_gpus_renumbered_after_one_vanished_is_not_a_reset(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot)
    step(j, clock, [gpu(0), gpu(1), gpu(2)])
    r = step(j, clock, [gpu(0), _lost(1, gpu(1).uuid), gpu(2)],
             [Fault(clock.time(), "0000:43:00.0", 79, "fell off")])
    assert r.gpu_health[1] == Severity.CRIT
    # NVML re-initialized without the lost GPU: the GPU that was 2 is now 1
    shifted = gpu(1, uuid=gpu(2).uuid, pci_bus_id=BUS[2])
    r = step(j, clock, [gpu(0), shifted])
    assert "gpu_reset" not in {e.code for e in r.events}
    assert r.gpu_health == {0: Severity.OK, 1: Severity.OK}
    assert r.node_health == Severity.CRIT
    (f,) = [f for f in r.findings if f.subject == "node" and f.code != "gpu_missing"]
    assert f.code == "xid_79" and "formerly at index 1" in f.message


def test_deferred_save_keeps_health_state_until_commit(tmp_path, clock, boot):
    """The daemon stores a cycle's events before the judge saves that it reported them: a crash
    in between re-reports the fault instead of losing its event."""
    j = make(tmp_path, clock, boot)
    j.save_on_judge = False
    lost = gpu(0, state=GpuState.LOST, error="GPU 0: GPU is lost")
    report = step(j, clock, [lost])
    assert any(e.code == "gpu_lost" for e in report.events)
    # "crash" before commit: a new judge on the same state dir reports the loss again
    j2 = make(tmp_path, clock, boot)
    assert any(e.code == "gpu_lost" for e in step(j2, clock, [lost]).events)
    j.commit()
    j3 = make(tmp_path, clock, boot)
    assert not any(e.code == "gpu_lost" for e in step(j3, clock, [lost]).events)


def test_flapping_slowdown_holds_one_warn_instead_of_an_event_per_toggle(tmp_path, clock, boot):
    from gpucostd.health.judge import SLOWDOWN_HOLD_SECONDS
    j = make(tmp_path, clock, boot)
    on = gpu(0, clock_event_reasons=("HwPowerBrakeSlowdown",), utilization_percent=90.0)
    off = gpu(0, utilization_percent=90.0)
    changes = []
    for i in range(40):                      # a power brake toggling every second
        report = step(j, clock, [on if i % 2 == 0 else off])
        changes += [e for e in report.events if e.code == "health_change" and e.gpu == 0]
        assert report.gpu_health[0] == Severity.WARN
    assert len(changes) == 1, [e.message for e in changes]
    f = codes(report, 0)["hw_slowdown"]
    assert "HwPowerBrakeSlowdown" in f.message and "seen" in f.message
    # it clears once the slowdown has stayed away for the hold time
    report = step(j, clock, [off], dt=SLOWDOWN_HOLD_SECONDS + 1)
    assert report.gpu_health[0] == Severity.OK

"""A GPU gone without an Xid: the judge keeps the node's GPUs (count and UUIDs, learned at first
start, kept across restarts and reboots, or [health] expected_gpu_count); fewer visible is CRIT
"GPU missing" with the UUID and last bus id, until the GPU is back or an operator accepts."""
from __future__ import annotations

import json

from gpucostd.health.inventory import FILE_NAME
from gpucostd.snapshot import GpuState, Severity

from test_health import boot, clock, gpu, make, step  # noqa: F401 (fixtures)

EIGHT = [gpu(i) for i in range(8)]


def without(index):
    """What NVML lists after GPU `index` left the count: the ones after it move up."""
    rest = [g for g in EIGHT if g.index != index]
    return [g.replace(index=i) for i, g in enumerate(rest)]


def missing(r):
    return [f for f in r.findings if f.code == "gpu_missing"]


def test_learns_the_gpus_and_a_gpu_leaving_the_count_is_crit_with_uuid_and_bus(
        tmp_path, clock, boot):
    j = make(tmp_path, clock, boot)
    r = step(j, clock, EIGHT)
    assert not missing(r) and r.node_health == Severity.OK
    saved = json.loads((tmp_path / "state" / FILE_NAME).read_text())
    assert [g["uuid"] for g in saved["gpus"]] == [g.uuid for g in EIGHT]

    r = step(j, clock, without(3))
    (f,) = missing(r)
    assert f.subject == "node" and f.severity == Severity.CRIT and r.node_health == Severity.CRIT
    assert EIGHT[3].uuid in f.message and "0000:61:00.0" in f.message and "7 of 8" in f.message
    assert "gpucostd ack node gpu_missing" in f.action
    (ev,) = [e for e in r.events if e.code == "gpu_missing"]
    assert ev.uuid == EIGHT[3].uuid and ev.fields["pci_bus_id"] == "0000:61:00.0"
    assert ev.fields["index"] == 3
    assert [e.fields["to"] for e in r.events if e.code == "health_change"] == ["CRIT"]
    # the GPUs that moved up an index are not "missing" and not reset
    assert r.gpu_health == {i: Severity.OK for i in range(7)}

    # next cycle: still missing, no second event
    r = step(j, clock, without(3))
    assert missing(r) and not [e for e in r.events if e.code == "gpu_missing"]


def test_missing_survives_a_restart_and_a_reboot_without_a_second_event(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot)
    step(j, clock, EIGHT)
    since = missing(step(j, clock, without(5)))[0].since
    j.commit()
    j2 = make(tmp_path, clock, boot)                 # daemon restart, same boot
    r = step(j2, clock, without(5))
    assert missing(r)[0].since == since
    assert not [e for e in r.events if e.code == "gpu_missing"]
    boot.write_text("99999999-2222-3333-4444-555555555555\n")     # reboot: still missing
    j3 = make(tmp_path, clock, boot)
    r = step(j3, clock, without(5))
    assert missing(r) and EIGHT[5].uuid in missing(r)[0].message


def test_the_gpu_coming_back_clears_it_with_an_event(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot)
    step(j, clock, EIGHT)
    step(j, clock, without(0))
    r = step(j, clock, EIGHT)
    assert not missing(r) and r.node_health == Severity.OK
    (ev,) = [e for e in r.events if e.code == "gpu_found"]
    assert ev.uuid == EIGHT[0].uuid


def test_operator_accepts_the_new_count(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot)
    step(j, clock, EIGHT)
    step(j, clock, without(2))
    (ack,) = j.ack("node", "gpu_missing")
    assert ack.fields["cleared"] == "gpu_missing" and EIGHT[2].uuid in ack.fields["dropped"]
    r = step(j, clock, without(2))
    assert not missing(r) and r.node_health == Severity.OK
    j.commit()
    # and it stays accepted after a restart
    assert not missing(step(make(tmp_path, clock, boot), clock, without(2)))
    # another GPU leaving the 7 is missing again
    r = step(j, clock, without(2)[:6])
    assert missing(r) and "6 of 7" in missing(r)[0].message


def test_expected_gpu_count_from_the_config(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot, "[health]\nexpected_gpu_count = 8\n")
    r = step(j, clock, EIGHT[:7])        # first start with 7: nothing to name, but short
    (f,) = missing(r)
    assert "7 of 8" in f.message and "expected_gpu_count = 8" in f.message
    assert step(j, clock, EIGHT).node_health == Severity.OK
    # the config can also accept fewer than the GPUs learned
    j2 = make(tmp_path / "b", clock, boot, "[health]\nexpected_gpu_count = 7\n")
    step(j2, clock, EIGHT)
    assert not missing(step(j2, clock, without(7)))


def test_a_replaced_gpu_is_learned_not_missing(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot)
    step(j, clock, EIGHT)
    swapped = list(EIGHT)
    swapped[4] = gpu(4, uuid="GPU-44444444-aaaa-bbbb-cccc-dddddddddddd")
    r = step(j, clock, swapped)
    assert not missing(r)
    (ev,) = [e for e in r.events if e.code == "gpu_inventory"]
    assert EIGHT[4].uuid in ev.fields["gone"] and "GPU-44444444" in ev.fields["new"]


def test_nvml_unavailable_is_not_a_missing_gpu(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot)
    step(j, clock, EIGHT)
    unknown = [g.replace(state=GpuState.UNKNOWN) for g in EIGHT]
    assert not missing(step(j, clock, unknown))
    assert not missing(step(j, clock, []))
    # a lost GPU is still counted (it has its own gpu_lost finding)
    lost = list(EIGHT)
    lost[1] = gpu(1).replace(state=GpuState.LOST)
    assert not missing(step(j, clock, lost))


def test_a_broken_inventory_file_is_learned_again(tmp_path, clock, boot, caplog):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / FILE_NAME).write_text("{not json")
    j = make(tmp_path, clock, boot)
    assert not missing(step(j, clock, EIGHT))
    assert "unreadable" in caplog.text
    assert missing(step(j, clock, without(1)))

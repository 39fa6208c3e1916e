"""NVIDIA's verdicts end to end, through the real daemon (`gpucostd run --simulate`) as a
process: a MIG Xid line lands on its GPU and names the GPU instance, an NVSwitch SXid line is a
node finding (fatal: CRIT) counted in /metrics, NVML's recovery action shows in status and
metrics and raises health, and a GPU that leaves NVML's count without an Xid is CRIT "GPU
missing" until it is back or an operator accepts the new count."""
from __future__ import annotations

import json

from conftest import metric_value, wait_for

BUS = ["00000000:18:00.0", "00000000:2A:00.0", "00000000:3A:00.0", "00000000:5D:00.0"]
UUID = [f"GPU-0f0b0000-0000-4000-8000-00000000000{i}" for i in range(4)]


def node(timeline="", gpu_extra=None, count=4, node_extra=""):
    out = ['[node]\nmodel = "NVIDIA H100 80GB HBM3"\n', f"gpu_count = {count}\n", node_extra,
           '\n[gpu_defaults]\ntemperature = 60\nutilization = 90\n'
           'unsupported = ["retired_pages"]\n\n']
    for i in range(count):
        out.append(f'[[gpu]]\nindex = {i}\npci_bus_id = "{BUS[i]}"\nuuid = "{UUID[i]}"\n'
                   f'{(gpu_extra or {}).get(i, "")}\n')
    return "".join(out) + timeline


def status(d):
    r = d.cli("status", "--json")
    try:
        return r.returncode, json.loads(r.stdout)
    except ValueError:
        raise AssertionError(f"status --json: rc {r.returncode}\n{r.stdout}\n{r.stderr}\n"
                             f"{d.output()[-3000:]}") from None


def gpu(doc, index):
    (g,) = [g for g in doc["gpus"] if g["index"] == index]
    return g


def findings(doc, index=None):
    src = doc["node"]["findings"] if index is None else gpu(doc, index)["findings"]
    return {f["code"]: f for f in src}


def test_mig_and_sxid_lines_through_the_daemon(daemon_factory, tmp_path):
    mig = ("NVRM: Xid (PCI:0000:2a:00 GPU-I:05 GPU-CI:01): 94, pid=7194, Contained: CE User "
           "Channel (0x9). RST: No, D-RST: No")
    fatal = "nvidia-nvswitch0: SXid (PCI:0000:05:00.0): 20034, Fatal, Link 30 LTSSM Fault Up"
    soft = ("nvidia-nvswitch3: SXid (PCI:0000:07:00.0): 12028, Non-fatal, Link 32 egress "
            "non-posted PRIV error (First)")
    follow = "nvidia-nvswitch0: SXid (PCI:0000:05:00.0): 20034, Severity 1 Engine instance 60"
    timeline = "".join(f'[[at]]\nt = {t}\nkernel_log = {json.dumps(line)}\n\n'
                       for t, line in ((0.5, mig), (0.6, fatal), (0.65, follow), (0.7, soft)))
    scen = tmp_path / "forms.toml"
    scen.write_text(node(timeline))
    d = daemon_factory(scenario=str(scen)).start()

    def seen():
        rc, doc = status(d)
        nf = findings(doc)
        return (rc, doc) if "sxid_20034" in nf and "sxid_12028" in nf else None
    rc, doc = wait_for(seen, 15, what="both SXid findings in status")
    assert rc == 2 and doc["node"]["health"] == "CRIT"
    nf = findings(doc)
    assert nf["sxid_20034"]["severity"] == "CRIT" and "0000:05:00.0" in nf["sxid_20034"]["message"]
    assert "reset the GPUs and NVSwitches" in nf["sxid_20034"]["action"]
    assert nf["sxid_12028"]["severity"] == "WARN" and "0000:07:00.0" in nf["sxid_12028"]["message"]
    # the MIG line is GPU 1's (bus 2a), names the instance, RESTART_APP -> WARN
    f94 = findings(doc, 1)["xid_94"]
    assert f94["severity"] == "WARN" and f94["action"] == "restart the application"
    assert "MIG GPU instance 5, compute instance 1" in f94["message"]
    assert gpu(doc, 1)["health"] == "WARN"
    assert all(gpu(doc, i)["health"] == "OK" for i in (0, 2, 3))

    text = d.metrics()
    assert metric_value(text, "gpucostd_node_sxid_errors_total", switch="0000:05:00.0",
                        sxid="20034") == 1.0        # the follow-up line is not a second one
    assert metric_value(text, "gpucostd_node_sxid_errors_total", switch="0000:07:00.0",
                        sxid="12028") == 1.0
    assert metric_value(text, "gpucostd_gpu_xid_errors_total", gpu="1", xid="94") == 1.0
    assert ',xid="20034"' not in text                # an SXid is not counted as an Xid

    r = d.cli("events", "--json")
    evs = json.loads(r.stdout)
    (ev,) = [e for e in evs if e["code"] == "sxid" and e["fields"].get("sxid") == 20034]
    assert ev["subject"] == "node" and ev["severity"] == "CRIT" and ev["xid"] is None
    assert ev["fields"]["pci_bus_id"] == "0000:05:00.0" and ev["fields"]["switch"] == 0
    (xe,) = [e for e in evs if e["code"] == "xid" and e["xid"] == 94]
    assert xe["gpu"] == 1 and xe["fields"]["gpu_instance"] == 5
    assert xe["fields"]["compute_instance"] == 1

    # the count survives a restart (it comes from the stored events)
    assert d.stop() == 0
    d.start()
    wait_for(lambda: metric_value(d.metrics(), "gpucostd_node_sxid_errors_total",
                                  switch="0000:05:00.0", sxid="20034") is not None, 10,
             what="the SXid counter after a restart")
    assert metric_value(d.metrics(), "gpucostd_node_sxid_errors_total", switch="0000:05:00.0",
                        sxid="20034") >= 1.0

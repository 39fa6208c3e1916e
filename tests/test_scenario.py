"""Scenario files: validation errors that name file, line, key, value and what is allowed; the
analytic ground truth (state at t, change times, violation integrals, resets, hangs, kernel lines);
and the shipped builtin:h100x8."""
from __future__ import annotations

import pytest

from gpucostd.sim.scenario import ScenarioError, load_scenario, parse_scenario

BASE = """\
[node]
model = "NVIDIA H100 80GB HBM3"
gpu_count = 2
driver_version = "550.90.07"
cuda_version = "12.4"
"""


def err(text: str) -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, "/tmp/s.toml")
    return info.value


# ------------------------------------------------------------------ validation
def test_unknown_key_names_file_line_key_and_allowed_keys():
    e = err(BASE + "\n[[gpu]]\nindex = 0\ntemprature = 50\n")
    msg = str(e)
    assert msg.startswith("/tmp/s.toml:9: ")
    assert "temprature" in msg and "unknown key" in msg
    assert "temperature" in msg          # the allowed keys are listed
    assert e.key == "temprature" and e.line == 9


def test_wrong_type_names_key_value_and_expected_type():
    e = err(BASE + "\n[gpu_defaults]\npersistence_mode = \"yes\"\n")
    msg = str(e)
    assert "/tmp/s.toml:8:" in msg
    assert 'gpu_defaults.persistence_mode = "yes"' in msg and "true or false" in msg


def test_out_of_range_value_says_allowed_range():
    msg = str(err(BASE + "\n[gpu_defaults]\nutilization = 140\n"))
    assert "utilization = 140" in msg and "allowed 0..100" in msg


def test_unknown_clock_event_reason_lists_nvml_names():
    msg = str(err(BASE + '\n[[at]]\nt = 5\ngpu = 0\nclock_event_reasons = ["HwThermal"]\n'))
    assert "/tmp/s.toml:10:" in msg
    assert "'HwThermal'" in msg and "HwThermalSlowdown" in msg and "SwPowerCap" in msg


def test_unknown_unsupported_field():
    msg = str(err(BASE + '\n[gpu_defaults]\nunsupported = ["fan_speed"]\n'))
    assert "'fan_speed'" in msg and "remapped_rows" in msg


def test_bad_pci_bus_id_and_duplicates():
    msg = str(err(BASE + '\n[[gpu]]\nindex = 0\npci_bus_id = "18:00.0"\n'))
    assert "pci_bus_id" in msg and "DDDDDDDD:BB:DD.F" in msg
    msg = str(err(BASE + '\n[[gpu]]\nindex = 0\nuuid = "GPU-1"\n[[gpu]]\nindex = 1\n'
                  'uuid = "GPU-1"\n'))
    assert "same uuid" in msg


def test_gpu_index_out_of_range_and_timeline_errors():
    msg = str(err(BASE + "\n[[gpu]]\nindex = 2\n"))
    assert "index = 2" in msg and "allowed 0..1" in msg
    msg = str(err(BASE + "\n[[at]]\nt = 1\ngpu = 5\nlost = true\n"))
    assert "at[0].gpu = 5" in msg and "allowed 0..1" in msg
    msg = str(err(BASE + "repeat_every = 60\n\n[[at]]\nt = 60\ngpu = 0\nlost = true\n"))
    assert "at[0].t = 60" in msg and "repeat_every" in msg
    msg = str(err(BASE + '\n[[at]]\nt = 1\ngpu = 0\nuuid = "GPU-x"\n'))
    assert "identity fields" in msg
    msg = str(err(BASE + "\n[[at]]\ngpu = 0\nlost = true\n"))
    assert "at[0].t is required" in msg


def test_inconsistent_power_limits():
    msg = str(err(BASE + "\n[gpu_defaults]\npower_limit = 800\n"))
    assert "power_limit = 800" in msg and "allowed 200..700" in msg


def test_missing_node_gpu_count_and_toml_syntax():
    msg = str(err("[node]\nmodel = \"x\"\n"))
    assert "gpu_count is required" in msg
    e = err(BASE + "\n[gpu_defaults\n")
    assert "not valid TOML" in str(e) and e.line == 7


def test_unknown_builtin_and_missing_file(tmp_path):
    with pytest.raises(ScenarioError) as info:
        load_scenario("builtin:nope")
    assert "builtin:h100x8" in str(info.value)
    with pytest.raises(ScenarioError) as info:
        load_scenario(str(tmp_path / "missing.toml"))
    assert "missing.toml" in str(info.value) and "cannot read" in str(info.value)


# ------------------------------------------------------------------ ground truth
def test_state_at_and_change_times():
    sc = parse_scenario(BASE + """
[gpu_defaults]
sm_clock = 1980
[[at]]
t = 10
gpu = 1
sm_clock = 1500
clock_event_reasons = ["SwPowerCap"]
[[at]]
t = 30
gpu = 1
sm_clock = 1980
clock_event_reasons = []
""")
    assert sc.gpu_state_at(1, 5)["sm_clock"] == 1980
    assert sc.gpu_state_at(1, 10)["sm_clock"] == 1500
    assert sc.gpu_state_at(1, 29.9)["clock_event_reasons"] == ("SwPowerCap",)
    assert sc.gpu_state_at(1, 31)["clock_event_reasons"] == ()
    assert sc.change_times(1) == [10.0, 30.0] and sc.change_times(0) == []
    v = sc.gpu_state_at(1, 100)["violation_seconds"]
    assert v["power"] == pytest.approx(20.0) and v["thermal"] == 0.0
    assert sc.gpu_state_at(1, 15)["violation_seconds"]["power"] == pytest.approx(5.0)


def test_reset_zeroes_violation_counters_and_volatile_ecc():
    sc = parse_scenario(BASE + """
[[at]]
t = 0
gpu = 0
clock_event_reasons = ["HwSlowdown"]
ecc_volatile_corrected = 7
ecc_aggregate_corrected = 7
[[at]]
t = 50
gpu = 0
reset = true
""")
    before = sc.gpu_state_at(0, 49)
    assert before["violation_seconds"]["thermal"] == pytest.approx(49.0)
    assert before["ecc_volatile_corrected"] == 7
    after = sc.gpu_state_at(0, 60)
    assert after["violation_seconds"]["thermal"] == pytest.approx(10.0)
    assert after["ecc_volatile_corrected"] == 0 and after["ecc_aggregate_corrected"] == 7


def test_hang_windows_lost_and_kernel_lines_repeat():
    sc = parse_scenario(BASE + """repeat_every = 100
[[at]]
t = 10
gpu = 0
hang_seconds = 5
kernel_log = "NVRM: Xid (PCI:0000:10:00): 79, pid=0, GPU has fallen off the bus."
[[at]]
t = 20
gpu = 1
lost = true
""")
    assert not sc.gpu_state_at(0, 9.9)["hung"]
    assert sc.gpu_state_at(0, 12)["hung"] and sc.hang_until(0, 12) == 15
    assert sc.hang_until(0, 113) == 115 and sc.hang_until(0, 116) is None
    assert sc.gpu_state_at(1, 25)["lost"] and not sc.gpu_state_at(1, 105)["lost"]
    lines = sc.kernel_lines_between(-1, 250)
    assert [t for t, _g, _l in lines] == [10.0, 110.0, 210.0]
    assert sc.change_times(1, until=250) == [20.0, 120.0, 220.0]


def test_builtin_h100x8():
    sc = load_scenario("builtin:h100x8")
    node = sc.node
    assert (node.model, node.gpu_count) == ("NVIDIA H100 80GB HBM3", 8)
    assert node.driver_version and node.cuda_version == "12.4"
    assert sc.repeat_every == 120
    states = [sc.gpu_state_at(i, 0) for i in range(8)]
    assert len({s["pci_bus_id"] for s in states}) == 8
    assert len({s["uuid"] for s in states}) == 8
    for s in states:
        assert (s["power_limit_default"], s["power_limit_max"], s["power_limit_min"]) == \
            (700, 700, 200)
        assert s["max_sm_clock"] == 1980 and s["utilization"] == 95
    for t in (0, 19.9, 80, 119.9, 120, 139.9, 200, 250):
        st = sc.gpu_state_at(0, t)
        assert st["clock_event_reasons"] == () and st["sm_clock"] == 1980, t
    for t in (20, 50, 79.9, 140, 199.9, 260):
        st = sc.gpu_state_at(0, t)
        assert st["clock_event_reasons"] == ("HwThermalSlowdown",) and st["sm_clock"] == 1410, t
    for i in range(1, 8):
        for t in (0, 30, 150):
            assert sc.gpu_state_at(i, t)["clock_event_reasons"] == ()
    # thermal violation time: 60 s per cycle, inside [20, 80)
    assert sc.gpu_state_at(0, 170)["violation_seconds"]["thermal"] == pytest.approx(90.0)
    assert sc.gpu_state_at(0, 250)["violation_seconds"]["thermal"] == pytest.approx(120.0)
    assert sc.gpu_state_at(1, 250)["violation_seconds"]["thermal"] == 0.0


def test_inconsistent_states_name_the_line_that_made_them():
    e = err(BASE + "\n[gpu_defaults]\npower_limit = 500\npower_limit_max = 600\n"
                   '\n[[gpu]]\nindex = 1\nuuid = "GPU-a"\npower_limit = 650\n')
    # GPU 0 first: its default power_limit_default 700 clashes with power_limit_max on line 9
    assert str(e).startswith("/tmp/s.toml:9: GPU 0 initial state: power_limit_default = 700 W")
    assert e.key == "power_limit_default"
    e = err(BASE + "\n[gpu_defaults]\npower_limit = 500\npower_limit_max = 600\n"
                   "power_limit_default = 600\n"
                   '\n[[gpu]]\nindex = 1\nuuid = "GPU-a"\npower_limit = 650\n')
    assert str(e).startswith("/tmp/s.toml:15: GPU 1 initial state: power_limit = 650 W")
    assert e.key == "power_limit"
    e = err(BASE + "\n[[at]]\nt = 5\ngpu = 0\nlost = false\npower_limit_min = 800\n")
    assert str(e).startswith("/tmp/s.toml:11: GPU 0 at t=5: power_limit_min 800 W")
    assert e.key == "power_limit_min"
    e = err(BASE + '\n[[gpu]]\nindex = 0\nuuid = "GPU-1"\n[[gpu]]\nindex = 1\n'
                   'uuid = "GPU-1"\n')
    assert e.line == 12 and e.key == "uuid" and "same uuid" in str(e)


def test_gpu_index_on_a_node_without_gpus():
    text = BASE.replace("gpu_count = 2", "gpu_count = 0")
    msg = str(err(text + "\n[[gpu]]\nindex = 0\n"))
    assert "no GPUs" in msg and "0..-1" not in msg
    msg = str(err(text + "\n[[at]]\nt = 1\ngpu = 0\nlost = true\n"))
    assert "at[0].gpu = 0" in msg and "no GPUs" in msg and "0..-1" not in msg

"""The deployment-guide host checks over fixture trees (tests/fixtures/host/inference_open,
inference_locked, intel_iommu_on): nvidia-persistenced, driver/kernel-module mismatch, NVIDIA
Container Toolkit, serving ports open without a firewall rule, model weights writable by others.
Firewall rulesets come from each tree's firewall/ folder through the probe's runner (the real
probe runs `nft list ruleset` and `iptables-save`, read-only)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from gpucostd.config import parse
from gpucostd.health.checks import run_checks
from gpucostd.health.deploy_checks import firewall_restricts
from gpucostd.probes.deploy import DeployProbe, parse_proc_net_tcp
from gpucostd.snapshot import GpuReading

HOSTS = Path(__file__).resolve().parent / "fixtures" / "host"


def runner(tree):
    files = {"nft": "nft.txt", "iptables-save": "iptables.txt"}

    def run(argv):
        name = files.get(argv[0])
        p = HOSTS / tree / "firewall" / name if name else None
        if p is None or not p.exists():
            return 127, ""
        return 0, p.read_text()
    return run


def check(tree, extra="", driver="550.90.07", nvml_error=None, model_dirs=(), gpus=()):
    cfg = parse(extra)
    deploy = DeployProbe(str(HOSTS / tree), run=runner(tree)).read(model_dirs or
                                                                   cfg.checks.model_dirs)
    from gpucostd.probes.host import HostProbe
    results = run_checks(cfg, HostProbe(str(HOSTS / tree)).facts(), gpus, driver, "12.4", (),
                         deploy, nvml_error)
    return {r.name: r for r in results}


def test_open_host_fails_with_fixes():
    r = check("inference_open")
    assert r["persistenced"].status == "warn"
    assert "nvidia-persistenced is not running" in r["persistenced"].message
    assert "systemctl enable --now nvidia-persistenced" in r["persistenced"].fix
    assert r["driver_match"].status == "fail"
    assert "535.183.01 differs from the user-space driver 550.90.07" in r["driver_match"].message
    assert r["toolkit"].status == "warn" and "docker" in r["toolkit"].message
    assert "nvidia-ctk runtime configure --runtime=docker" in r["toolkit"].fix
    sp = r["open_ports"]
    assert sp.status == "fail"
    assert "0.0.0.0:8000, [::]:8080 open to the network" in sp.message
    assert "9477" not in sp.message                       # loopback and other ports: fine
    assert "127.0.0.1" in sp.fix and "tcp dport 8000" in sp.fix


def test_locked_host_passes():
    r = check("inference_locked")
    assert r["persistenced"].status == "pass" and "pid 2210" in r["persistenced"].message
    assert r["driver_match"].status == "pass"              # /proc/driver/nvidia/version
    assert r["toolkit"].status == "pass" and "nvidia-ctk" in r["toolkit"].message
    assert r["open_ports"].status == "pass", r["open_ports"]
    assert "restricted by the firewall" in r["open_ports"].message


def test_loopback_only_and_config_switches():
    r = check("intel_iommu_on")
    assert r["open_ports"].status == "pass" and "beyond loopback" in r["open_ports"].message
    assert r["persistenced"].status == "pass"
    assert r["toolkit"].status == "pass"            # no container runtime at all
    r = check("inference_open", '[checks]\nserving_ports = []\ncontainer_toolkit = "off"\n')
    assert "open_ports" not in r and "toolkit" not in r
    r = check("inference_locked", '[checks]\ncontainer_toolkit = "required"\n')
    assert r["toolkit"].status == "pass"
    r = check("intel_iommu_on", '[checks]\ncontainer_toolkit = "required"\n')
    assert r["toolkit"].status == "fail"


def test_unreadable_firewall_is_a_warning_not_a_pass():
    cfg = parse("")
    deploy = DeployProbe(str(HOSTS / "inference_open"), run=lambda argv: (1, "")).read()
    (sp,) = [c for c in run_checks(cfg, None, (), "550.90.07", "12.4", (), deploy)
             if c.name == "open_ports"]
    assert sp.status == "warn" and "not readable" in sp.message
    # under a fixture root without a runner the host's own firewall is never consulted
    assert DeployProbe(str(HOSTS / "inference_open")).read().firewall is None


def test_nvml_mismatch_error_is_a_failure():
    r = check("inference_locked", nvml_error="nvmlInit: Driver/library version mismatch "
                                             "(NVML_ERROR_LIB_RM_VERSION_MISMATCH)")
    assert r["driver_match"].status == "fail" and "reboot" in r["driver_match"].fix


def test_model_files_writable_by_others_fail(tmp_path):
    models = tmp_path / "models" / "llama"
    models.mkdir(parents=True)
    good = models / "model-00001.safetensors"
    good.write_bytes(b"x")
    good.chmod(0o400)
    bad = models / "model-00002.safetensors"
    bad.write_bytes(b"x")
    bad.chmod(0o664)
    root = str(tmp_path)
    cfg = parse('[checks]\nmodel_dirs = ["/models", "/nope"]\n')
    deploy = DeployProbe(root, run=lambda a: (1, "")).read(cfg.checks.model_dirs)
    (md,) = [c for c in run_checks(cfg, None, (), None, None, (), deploy)
             if c.name == "model_files"]
    assert md.status == "fail" and "model-00002.safetensors (0664)" in md.message
    assert "00001" not in md.message and "chmod 0400" in md.fix
    bad.chmod(0o440)
    cfg = parse('[checks]\nmodel_dirs = ["/models"]\n')
    deploy = DeployProbe(root, run=lambda a: (1, "")).read(cfg.checks.model_dirs)
    (md,) = [c for c in run_checks(cfg, None, (), None, None, (), deploy)
             if c.name == "model_files"]
    assert md.status == "pass" and "2 model file(s)" in md.message


def test_persistenced_warning_names_legacy_mode():
    gpus = [GpuReading(index=0, persistence_mode=True), GpuReading(index=1, persistence_mode=True)]
    r = check("inference_open", gpus=gpus)
    assert "legacy persistence mode is on for GPU 0, 1" in r["persistenced"].message


@pytest.mark.parametrize("ruleset,port,restricted", [
    ("table inet f {\n chain input {\n  type filter hook input priority 0; policy drop;\n"
     "  tcp dport 22 accept\n }\n}\n", 8000, True),
    ("table inet f {\n chain input {\n  type filter hook input priority 0; policy drop;\n"
     "  tcp dport { 80, 8000-8100 } accept\n }\n}\n", 8080, False),
    ("table inet f {\n chain input {\n  type filter hook input priority 0; policy accept;\n"
     "  tcp dport 8000 drop\n }\n}\n", 8000, True),
    # accepted from some sources, and the policy lets everyone else in too
    ("table inet f {\n chain input {\n  type filter hook input priority 0; policy accept;\n"
     "  ip saddr 10.0.0.0/8 tcp dport 8000 accept\n }\n}\n", 8000, False),
    ("table inet f {\n chain input {\n  type filter hook input priority 0; policy drop;\n"
     "  ip saddr 10.0.0.0/8 tcp dport 8000 accept\n }\n}\n", 8000, True),
    ("table inet f {\n chain output {\n  type filter hook output priority 0; policy drop;\n"
     " }\n}\n", 8000, False),
    ("*filter\n:INPUT DROP [0:0]\n-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\nCOMMIT\n",
     8000, True),
    ("*filter\n:INPUT DROP [0:0]\n-A INPUT -p tcp -m multiport --dports 8000,8080 -j ACCEPT\n"
     "COMMIT\n", 8080, False),
    ("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -s 10.0.0.0/8 -p tcp --dport 8000 -j ACCEPT\n"
     "-A INPUT -p tcp --dport 8000 -j DROP\nCOMMIT\n", 8000, True),
    # a port Docker publishes is DNATed past INPUT: DOCKER-USER decides, INPUT's policy does not
    ("*filter\n:INPUT ACCEPT [0:0]\n-A DOCKER-USER -p tcp --dport 8000 -j REJECT\nCOMMIT\n"
     "*nat\n-A DOCKER ! -i docker0 -p tcp -m tcp --dport 8000 -j DNAT --to-destination "
     "172.17.0.2:8000\nCOMMIT\n", 8000, True),
    ("*filter\n:INPUT DROP [0:0]\nCOMMIT\n*nat\n-A DOCKER ! -i docker0 -p tcp -m tcp --dport "
     "8000 -j DNAT --to-destination 172.17.0.2:8000\nCOMMIT\n", 8000, False),
    # first match wins: an accept before a drop opens the port
    ("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p tcp --dport 8000 -j ACCEPT\n"
     "-A INPUT -p tcp --dport 8000 -j DROP\nCOMMIT\n", 8000, False),
    # accepting everything on a network interface opens the port, whatever the policy
    ("*filter\n:INPUT DROP [0:0]\n-A INPUT -i eth0 -j ACCEPT\nCOMMIT\n", 8000, False),
    ("table inet f {\n chain input {\n  type filter hook input priority 0; policy drop;\n"
     "  iifname \"eth0\" accept\n }\n}\n", 8000, False),
    # ...but loopback, established and other protocols do not
    ("*filter\n:INPUT DROP [0:0]\n-A INPUT -i lo -j ACCEPT\n-A INPUT -m conntrack --ctstate "
     "RELATED,ESTABLISHED -j ACCEPT\n-A INPUT -p udp -j ACCEPT\nCOMMIT\n", 8000, True),
    # a drop for one source address does not restrict everyone else
    ("table inet f {\n chain input {\n  type filter hook input priority 0; policy accept;\n"
     "  ip saddr 1.2.3.4 tcp dport 8000 drop\n }\n}\n", 8000, False),
    # a final catch-all drop, and a drop behind a conditional RETURN that does not
    ("table inet f {\n chain input {\n  type filter hook input priority 0; policy accept;\n"
     "  tcp dport 22 accept\n  drop\n }\n}\n", 8000, True),
    ("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j chk\n-A chk -m addrtype --dst-type LOCAL -j "
     "RETURN\n-A chk -j DROP\nCOMMIT\n", 8000, False),
    # every nftables input base chain must pass the packet: one that refuses it is enough
    ("table inet a {\n chain input {\n  type filter hook input priority 0; policy accept;\n"
     " }\n}\ntable inet b {\n chain input {\n  type filter hook input priority 10; policy "
     "drop;\n }\n}\n", 8000, True),
    ("*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n", 8000, False),
    ("", 8000, False),
])
def test_firewall_rules(ruleset, port, restricted):
    assert (firewall_restricts(ruleset, port) is not None) == restricted


FIREWALLS = Path(__file__).parent / "fixtures" / "firewall"


def test_ufw_user_rules_are_followed_from_input():
    # ufw keeps INPUT's policy at DROP and accepts in its ufw-user-input chain, reached through
    # ufw-before-input; ufw-not-local's DROP only catches what its RETURNs let through
    opened = (FIREWALLS / "ufw-allow-8000.iptables").read_text()
    assert firewall_restricts(opened, 8000) is None
    why = firewall_restricts(opened, 8080)
    assert why and "policy drop" in why
    assert firewall_restricts(opened, 22) is None
    narrowed = (FIREWALLS / "ufw-allow-8000-from-10.iptables").read_text()
    assert firewall_restricts(narrowed, 8000)


def test_firewalld_zones_are_followed_to_the_final_reject():
    rules = (FIREWALLS / "firewalld-public.nft").read_text()
    why = firewall_restricts(rules, 8000)
    assert why and "reject" in why and "filter_INPUT" in why
    assert firewall_restricts(rules, 22) is None
    allowed = rules.replace("\t\ttcp dport 22 accept\n", "\t\ttcp dport { 22, 8000 } accept\n")
    assert allowed != rules and firewall_restricts(allowed, 8000) is None


def test_proc_net_tcp_parsing():
    text = (HOSTS / "inference_open" / "proc" / "net" / "tcp").read_text()
    assert parse_proc_net_tcp(text, False) == [("0.0.0.0", 8000), ("127.0.0.1", 9477)]
    text6 = (HOSTS / "inference_open" / "proc" / "net" / "tcp6").read_text()
    assert parse_proc_net_tcp(text6, True) == [("::", 8080)]
    assert parse_proc_net_tcp("header\n garbage line\n 0: zz:zz 0:0 0A\n", False) == []


def fake_process(root, pid, argv, cmdline_shown=True):
    """A process in a fixture proc tree as the kernel shows it: stat and comm with the name cut
    to 15 characters, the full command line in cmdline (empty when not shown, as for a
    process whose memory is gone); proc/stat for the boot time."""
    proc = root / "proc"
    (proc / str(pid)).mkdir(parents=True)
    if not (proc / "stat").exists():
        (proc / "stat").write_text("cpu  100 0 100 10000 0 0 0 0 0 0\nbtime 1733500000\n")
    comm = os.path.basename(argv[0])[:15]
    fields = [str(pid), f"({comm})", "S", "1"] + ["0"] * 48
    fields[21] = "1500"
    (proc / str(pid) / "stat").write_text(" ".join(fields) + "\n")
    (proc / str(pid) / "comm").write_text(comm + "\n")
    (proc / str(pid) / "cmdline").write_text("\0".join(argv) + "\0" if cmdline_shown else "")


def test_persistenced_found_by_its_full_name_or_the_kernels_15_characters(tmp_path):
    """The kernel keeps 15 characters of a process name ("nvidia-persiste"): psutil reads the
    full one from the command line, and the cut one counts when that is not shown."""
    fake_process(tmp_path, 1, ["/sbin/init"])
    fake_process(tmp_path, 300, ["/usr/bin/nvidia-persistenced-helper"])   # not the daemon
    probe = DeployProbe(str(tmp_path), run=lambda a: (1, ""))
    assert probe.read().persistenced is False
    fake_process(tmp_path, 812, ["/usr/bin/nvidia-persistenced", "--user", "nvidia-persistenced"])
    assert (probe.read().persistenced, probe.read().persistenced_pid) == (True, 812)
    other = tmp_path / "hidden"
    fake_process(other, 1, ["/sbin/init"])
    fake_process(other, 90, ["/usr/bin/nvidia-persistenced"], cmdline_shown=False)
    f = DeployProbe(str(other), run=lambda a: (1, "")).read()
    assert (f.persistenced, f.persistenced_pid) == (True, 90)
    # no proc at all: cannot tell, and says why
    f = DeployProbe(str(tmp_path / "empty"), run=lambda a: (1, "")).read()
    assert f.persistenced is None and any("cannot list" in e for e in f.errors)


def test_persistenced_seen_by_its_socket_when_proc_hides_it(tmp_path):
    # the unit's ProtectProc=invisible hides the nvidia-persistenced user's processes
    fake_process(tmp_path, 1, ["/sbin/init"])
    run_dir = tmp_path / "run" / "nvidia-persistenced"
    run_dir.mkdir(parents=True)
    assert DeployProbe(str(tmp_path), run=lambda a: (1, "")).read().persistenced is False
    (run_dir / "socket").write_text("")          # a socket on a real host
    (run_dir / "nvidia-persistenced.pid").write_text("1234\n")
    f = DeployProbe(str(tmp_path), run=lambda a: (1, "")).read()
    assert (f.persistenced, f.persistenced_pid) == (True, 1234)

"""The configuration's keys: SCHEMA declares every key of gpucostd.toml with its type, default,
allowed values and a one-line doc (data; gpucostd.config validates against it). docs/configuration.md's
configuration reference lists the same keys, and tests/test_docs.py keeps the two in step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from gpucostd import DEFAULT_SOCKET

DEFAULT_STATE_DIR = "/var/lib/gpucostd"
DEFAULT_LISTEN = "0.0.0.0:9477"


# --------------------------------------------------------------------------- key types
@dataclass(frozen=True)
class Key:
    type: str                 # "int" "float" "bool" "str" "choice" "argv" "ring" "version" "ports" "paths"
    default: Any
    doc: str
    min: Optional[float] = None
    max: Optional[float] = None
    choices: Tuple[str, ...] = ()
    optional: bool = False    # default None means "unset: leave alone"


def _k(type_, default, doc, **kw) -> Key:
    return Key(type_, default, doc, **kw)


# nvmlPowerProfileType_t (nvml.h), by the name `power_profile` takes
POWER_PROFILES: Dict[str, int] = {
    "max_p": 0, "max_q": 1, "compute": 2, "memory_bound": 3, "network": 4, "balanced": 5,
    "llm_inference": 6, "llm_training": 7, "rbm": 8, "dcpcie": 9, "hmma_sparse": 10,
    "hmma_dense": 11, "sync_balanced": 12, "hpc": 13, "mig": 14, "max_q_1": 15,
    "network_bound": 16, "high_throughput_inference": 17, "medium_throughput_inference": 18,
    "low_latency_inference": 19, "training": 20, "inference": 21, "max_q_2": 22, "max_q_3": 23,
    "low_priority_background": 24,
}

GPU_TUNING_KEYS: Dict[str, Key] = {
    "persistence_mode": _k("bool", None, "Set persistence mode on (true) or off (false).",
                           optional=True),
    "power_limit_watts": _k("int", None, "Power limit in watts; must lie in the GPU's range.",
                            optional=True, min=1, max=10000),
    "power_limit_percent": _k("float", None, "Power limit as a percentage of the GPU's default.",
                              optional=True, min=1, max=200),
    "locked_sm_clocks_mhz": Key("clock_range", None,
                                "Lock the SM clock to [min, max] MHz (nvidia-smi -lgc); both "
                                "must be supported clocks of the GPU.", min=1, max=100000,
                                optional=True),
    "power_profile": Key("choice", None, "Workload power profile to request (Blackwell and "
                         "later), e.g. \"llm_inference\".", choices=tuple(POWER_PROFILES),
                         optional=True),
}
RING_KEYS = ("rx", "tx", "rx_mini", "rx_jumbo")

SCHEMA: Dict[str, Dict[str, Key]] = {
    "daemon": {
        "interval_seconds": _k("float", 1.0, "Seconds between poll cycles.", min=0.05, max=3600),
        "listen_address": _k("str", DEFAULT_LISTEN,
                             "host:port of the /metrics and /healthz HTTP server; empty disables."),
        "socket_path": _k("str", DEFAULT_SOCKET,
                          "Unix socket of the status API (non-root default: $XDG_RUNTIME_DIR "
                          "or /tmp)."),
        "socket_group": _k("str", "gpucostd", "Group that may read the status socket (mode 0660)."),
        "state_dir": _k("str", DEFAULT_STATE_DIR,
                        "Events database, saved originals, cost totals (non-root default: "
                        "$XDG_STATE_HOME or /tmp)."),
        "nvml_timeout_seconds": _k("float", 2.0, "Deadline of every NVML call.", min=0.01,
                                   max=600),
        "nvml_retry_seconds": _k("float", 30.0,
                                 "Retry NVML initialisation this often while it fails.",
                                 min=0.1, max=3600),
        "kernel_log": _k("choice", "auto", "Kernel log source.",
                         choices=("auto", "kmsg", "journal", "none")),
        "host_root": _k("str", "/", "Root under which /sys and /proc are read (tests: fixtures)."),
        "log_level": _k("choice", "info", "Log verbosity.",
                        choices=("debug", "info", "warning", "error")),
        "web_config_file": _k("str", "",
                              "Prometheus exporter-toolkit web config (TLS, basic auth) for "
                              "the HTTP server; empty: plain HTTP."),
    },
    "simulate": {
        "scenario": _k("str", "builtin:h100x8",
                       "Scenario for --simulate: builtin:NAME or a path to a TOML file."),
    },
    "health": {
        "slowdown_crit_fraction": _k("float", 0.6,
                                     "HW slowdown active more than this fraction of the window "
                                     "is CRIT.", min=0.0, max=1.0),
        "slowdown_window_seconds": _k("float", 600.0, "Window of slowdown_crit_fraction.",
                                      min=1, max=86400),
        "sw_power_cap": _k("choice", "ok", "Health while SW power capping is active.",
                           choices=("ok", "warn")),
        "temperature_margin_celsius": _k("float", 5.0,
                                         "WARN when the GPU is this close to its slowdown "
                                         "temperature.", min=0, max=100),
        "corrected_ecc_per_hour": _k("float", 1000.0,
                                     "WARN when corrected ECC errors exceed this rate per hour.",
                                     min=0, max=1e9),
        "pcie_busy_utilization_percent": _k("float", 20.0,
                                            "PCIe link checks apply above this utilization.",
                                            min=0, max=100),
        "expected_gpu_count": _k("int", 0, "GPUs this node must show; fewer is CRIT "
                                 "\"GPU missing\" (0: the GPUs seen at first start).",
                                 min=0, max=64),
    },
    "events": {
        "max_age_days": _k("float", 30.0, "Drop stored events older than this.", min=0.01,
                            max=36500),
        "max_count": _k("int", 100000, "Keep at most this many stored events.", min=100,
                         max=100_000_000),
    },
    "hooks": {
        "on_critical": _k("argv", [], "argv run when a GPU or the node enters CRIT."),
        "on_recovered": _k("argv", [], "argv run when a GPU or the node leaves CRIT."),
        "on_inefficient": _k("argv", [], "argv run when tokens per dollar stays below "
                             "[efficiency] min_tokens_per_dollar for window_seconds (drain)."),
        "on_efficient": _k("argv", [], "argv run when the node is back at or above the floor "
                           "for window_seconds after on_inefficient ran (undrain)."),
        "timeout_seconds": _k("float", 30.0, "Kill a hook after this long.", min=0.1, max=3600),
    },
    "tuning": {
        "enforce": _k("bool", True, "Re-apply settings that drift (false: report drift only)."),
        "verify_interval_seconds": _k("float", 30.0, "Seconds between verifications.",
                                      min=0.1, max=86400),
        "restore_on_stop": _k("bool", True, "Restore original values when the daemon stops."),
    },
    "checks": {
        "iommu": _k("choice", "any", "Required IOMMU mode.",
                    choices=("on", "passthrough", "off", "any")),
        "min_kernel": _k("version", "5.15", "Minimum kernel version."),
        "min_driver": _k("version", "535.104", "Minimum NVIDIA driver version."),
        "min_cuda": _k("version", "12.2", "Minimum CUDA version the driver supports."),
        "serving_ports": _k("ports", [8000, 8080], "Inference serving ports that must not be "
                            "open to the network without a firewall rule; [] skips."),
        "model_dirs": _k("paths", [], "Directories of model weights that must not be "
                         "writable by others (mode 0400 asked)."),
        "container_toolkit": _k("choice", "auto", "NVIDIA Container Toolkit check: auto (when "
                                "a container runtime is installed), required, off.",
                                choices=("auto", "required", "off")),
    },
    "cost": {
        "gpu_hour_usd": _k("float", 0.0, "Price of one GPU-hour; 0 shows capacity only.",
                           min=0, max=1e6),
        "currency": _k("str", "USD", "Currency label text."),
        "busy_utilization_percent": _k("float", 5.0, "A GPU at or above this is busy.",
                                       min=0, max=100),
        "energy_usd_per_kwh": _k("float", 0.0, "Price of one kWh of energy; 0 leaves energy "
                                 "out of the cost.", min=0, max=1000),
        "pue": _k("float", 1.0, "Power usage effectiveness: facility energy per GPU energy.",
                  min=1.0, max=5.0),
    },
    "efficiency": {
        "target_utilization_percent": _k("float", 80.0, "Busy GPUs whose work (SM activity "
                                         "where the GPU has GPM, else utilization) is below "
                                         "this count their unused share as idle capacity.",
                                         min=0, max=100),
        "min_tokens_per_dollar": _k("float", 0.0, "Floor of node tokens per dollar; 0 is off.",
                                    min=0, max=1e12),
        "window_seconds": _k("float", 600.0, "Below the floor this long: WARN and "
                             "on_inefficient.", min=1, max=86400),
    },
    "export": {
        "textfile_path": _k("str", "",
                            "Also write the exposition to this file (a *.prom path in "
                            "node_exporter's textfile directory); empty: off."),
    },
    "inference": {
        "metrics_url": _k("str", "", "Prometheus endpoint of a local inference server "
                          "(all GPUs; [[inference.endpoint]] for several)."),
        "tokens_metric": _k("str", "auto", "Generated-tokens series: \"auto\" detects the "
                            "server, or name{label=\"value\"}."),
        "timeout_seconds": _k("float", 0.5, "Deadline of one whole scrape (connect, headers, "
                              "body); at most half the interval.", min=0.01, max=5),
        "expect_owner": _k("str", "", "For loopback URLs: the user (name or uid) that must own "
                           "the listening socket; another owner's server is not read. Empty: "
                           "not checked."),
        "discover": _k("choice", "auto", "Find running inference servers (known process, "
                       "listening port, /metrics): auto on a real node, on also with --simulate, "
                       "off.", choices=("auto", "on", "off")),
        "discover_interval_seconds": _k("float", 60.0, "How often discovery looks for new "
                                        "and vanished servers.", min=5, max=3600),
    },
    "drain": {
        "backend": _k("choice", "none", "The fleet engine that drains this node: none, slurm "
                      "(scontrol/sinfo) or kubernetes (taint, cordon, node conditions).",
                      choices=("none", "slurm", "kubernetes")),
        "dry_run": _k("bool", False, "Log and record what a drain or undrain would do; change "
                      "nothing in the engine."),
        "node_name": _k("str", "", "This node's name in the engine; empty: the short "
                        "hostname."),
        "on_critical": _k("bool", True, "Drain while the node's health is CRIT; undrain "
                          "(gpucostd's own drain only) when it recovers."),
        "on_inefficient": _k("bool", False, "Drain while the tokens-per-dollar floor holds "
                             "(node_inefficient); undrain on node_efficient."),
        "timeout_seconds": _k("float", 10.0, "Deadline of one engine call (a hung scontrol or "
                              "API request is killed).", min=0.5, max=600),
        "brake_share": _k("float", 0.5, "Refuse a health drain when gpucostd's drains in the "
                          "fleet within brake_window_seconds would pass this share of its "
                          "nodes.", min=0.0, max=1.0),
        "brake_window_seconds": _k("float", 300.0, "Window of the fleet brake.", min=1,
                                   max=604800),
        "inefficient_brake_share": _k("float", 0.1, "The fleet brake's share for a drain by "
                                      "the tokens-per-dollar floor.", min=0.0, max=1.0),
        "reboot": _k("bool", False, "Slurm: a CRIT whose action is a reboot or GPU reset asks "
                     "`scontrol reboot ASAP nextstate=RESUME` instead of a drain."),
    },
    "drain.slurm": {
        "scontrol": _k("str", "scontrol", "The scontrol program (a name on PATH or an absolute "
                       "path)."),
        "sinfo": _k("str", "sinfo", "The sinfo program (a name on PATH or an absolute path)."),
        "conf": _k("str", "", "slurm.conf for scontrol and sinfo (SLURM_CONF); empty: "
                   "Slurm's default."),
        "opt_out_feature": _k("str", "gpucostd_no_drain", "A node feature (slurm.conf "
                              "Features=) that keeps gpucostd from draining the node."),
    },
    "drain.kubernetes": {
        "api_url": _k("str", "", "The API server; empty: in-cluster, https://"
                      "$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT."),
        "token_file": _k("str", "/var/run/secrets/kubernetes.io/serviceaccount/token",
                         "The service account's bearer token."),
        "ca_file": _k("str", "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
                      "The CA bundle that signs the API server's certificate."),
        "taint_key": _k("str", "gpucostd.io/unhealthy", "The taint gpucostd puts on a node "
                        "it drains."),
        "taint_effect": _k("choice", "NoSchedule", "The taint's effect.",
                           choices=("NoSchedule", "PreferNoSchedule", "NoExecute")),
        "opt_out_label": _k("str", "gpucostd.io/drain-opt-out", "A node label that keeps "
                            "gpucostd from draining the node."),
        "evict": _k("bool", False, "Also evict the node's pods (Eviction API) after "
                    "cordoning."),
        "eviction_grace_seconds": _k("int", 30, "Grace period of each eviction.", min=0,
                                     max=86400),
    },
}


# the names other modules import (the module itself keeps its short private ones)
make_key = _k

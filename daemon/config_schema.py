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


def make_key(type_, default, doc, **kw) -> Key:
    return Key(type_, default, doc, **kw)


GPU_TUNING_KEYS: Dict[str, Key] = {
    "persistence_mode": make_key("bool", None, "Set persistence mode on (true) or off (false).",
                           optional=True),
    "power_limit_watts": make_key("int", None, "Power limit in watts; must lie in the GPU's range.",
                            optional=True, min=1, max=10000),
    "power_limit_percent": make_key("float", None, "Power limit as a percentage of the GPU's default.",
                              optional=True, min=1, max=200),
}
RING_KEYS = ("rx", "tx", "rx_mini", "rx_jumbo")

SCHEMA: Dict[str, Dict[str, Key]] = {
    "daemon": {
        "interval_seconds": make_key("float", 1.0, "Seconds between poll cycles.", min=0.05, max=3600),
        "listen_address": make_key("str", DEFAULT_LISTEN,
                             "host:port of the /metrics and /healthz HTTP server; empty disables."),
        "socket_path": make_key("str", DEFAULT_SOCKET,
                          "Unix socket of the status API (non-root default: $XDG_RUNTIME_DIR "
                          "or /tmp)."),
        "socket_group": make_key("str", "gpucostd", "Group that may read the status socket (mode 0660)."),
        "state_dir": make_key("str", DEFAULT_STATE_DIR,
                        "Events database, saved originals, cost totals (non-root default: "
                        "$XDG_STATE_HOME or /tmp)."),
        "nvml_timeout_seconds": make_key("float", 2.0, "Deadline of every NVML call.", min=0.01,
                                   max=600),
        "nvml_retry_seconds": make_key("float", 30.0,
                                 "Retry NVML initialisation this often while it fails.",
                                 min=0.1, max=3600),
        "kernel_log": make_key("choice", "auto", "Kernel log source.",
                         choices=("auto", "kmsg", "journal", "none")),
        "host_root": make_key("str", "/", "Root under which /sys and /proc are read (tests: fixtures)."),
        "log_level": make_key("choice", "info", "Log verbosity.",
                        choices=("debug", "info", "warning", "error")),
        "web_config_file": make_key("str", "",
                              "Prometheus exporter-toolkit web config (TLS, basic auth) for "
                              "the HTTP server; empty: plain HTTP."),
    },
    "simulate": {
        "scenario": make_key("str", "builtin:h100x8",
                       "Scenario for --simulate: builtin:NAME or a path to a TOML file."),
    },
    "health": {
        "slowdown_crit_fraction": make_key("float", 0.6,
                                     "HW slowdown active more than this fraction of the window "
                                     "is CRIT.", min=0.0, max=1.0),
        "slowdown_window_seconds": make_key("float", 600.0, "Window of slowdown_crit_fraction.",
                                      min=1, max=86400),
        "sw_power_cap": make_key("choice", "ok", "Health while SW power capping is active.",
                           choices=("ok", "warn")),
        "temperature_margin_celsius": make_key("float", 5.0,
                                         "WARN when the GPU is this close to its slowdown "
                                         "temperature.", min=0, max=100),
        "corrected_ecc_per_hour": make_key("float", 1000.0,
                                     "WARN when corrected ECC errors exceed this rate per hour.",
                                     min=0),
        "pcie_busy_utilization_percent": make_key("float", 20.0,
                                            "PCIe link checks apply above this utilization.",
                                            min=0, max=100),
        "expected_gpu_count": make_key("int", 0, "GPUs this node must show; fewer is CRIT "
                                 "\"GPU missing\" (0: the GPUs seen at first start).",
                                 min=0, max=64),
    },
    "events": {
        "max_age_days": make_key("float", 30.0, "Drop stored events older than this.", min=0.01),
        "max_count": make_key("int", 100000, "Keep at most this many stored events.", min=100),
    },
    "hooks": {
        "on_critical": make_key("argv", [], "argv run when a GPU or the node enters CRIT."),
        "on_recovered": make_key("argv", [], "argv run when a GPU or the node leaves CRIT."),
        "on_inefficient": make_key("argv", [], "argv run when tokens per dollar stays below "
                             "[efficiency] min_tokens_per_dollar for window_seconds (drain)."),
        "on_efficient": make_key("argv", [], "argv run when the node is back at or above the floor "
                           "for window_seconds after on_inefficient ran (undrain)."),
        "timeout_seconds": make_key("float", 30.0, "Kill a hook after this long.", min=0.1, max=3600),
    },
    "tuning": {
        "enforce": make_key("bool", True, "Re-apply settings that drift (false: report drift only)."),
        "verify_interval_seconds": make_key("float", 30.0, "Seconds between verifications.",
                                      min=0.1, max=86400),
        "restore_on_stop": make_key("bool", True, "Restore original values when the daemon stops."),
    },
    "checks": {
        "iommu": make_key("choice", "any", "Required IOMMU mode.",
                    choices=("on", "passthrough", "off", "any")),
        "min_kernel": make_key("version", "5.15", "Minimum kernel version."),
        "min_driver": make_key("version", "535.104", "Minimum NVIDIA driver version."),
        "min_cuda": make_key("version", "12.2", "Minimum CUDA version the driver supports."),
        "serving_ports": make_key("ports", [8000, 8080], "Inference serving ports that must not be "
                            "open to the network without a firewall rule; [] skips."),
        "model_dirs": make_key("paths", [], "Directories of model weights that must not be "
                         "writable by others (mode 0400 asked)."),
        "container_toolkit": make_key("choice", "auto", "NVIDIA Container Toolkit check: auto (when "
                                "a container runtime is installed), required, off.",
                                choices=("auto", "required", "off")),
    },
    "cost": {
        "gpu_hour_usd": make_key("float", 0.0, "Price of one GPU-hour; 0 shows capacity only.",
                           min=0, max=1e6),
        "currency": make_key("str", "USD", "Currency label text."),
        "busy_utilization_percent": make_key("float", 5.0, "A GPU at or above this is busy.",
                                       min=0, max=100),
        "energy_usd_per_kwh": make_key("float", 0.0, "Price of one kWh of energy; 0 leaves energy "
                                 "out of the cost.", min=0, max=1000),
        "pue": make_key("float", 1.0, "Power usage effectiveness: facility energy per GPU energy.",
                  min=1.0, max=5.0),
    },
    "efficiency": {
        "target_utilization_percent": make_key("float", 80.0, "Busy GPUs below this utilization "
                                         "count their unused share as idle capacity.",
                                         min=0, max=100),
        "min_tokens_per_dollar": make_key("float", 0.0, "Floor of node tokens per dollar; 0 is off.",
                                    min=0),
        "window_seconds": make_key("float", 600.0, "Below the floor this long: WARN and "
                             "on_inefficient.", min=1, max=86400),
    },
    "export": {
        "textfile_path": make_key("str", "",
                            "Also write the exposition to this file (a *.prom path in "
                            "node_exporter's textfile directory); empty: off."),
    },
    "inference": {
        "metrics_url": make_key("str", "", "Prometheus endpoint of a local inference server "
                          "(all GPUs; [[inference.endpoint]] for several)."),
        "tokens_metric": make_key("str", "auto", "Generated-tokens series: \"auto\" detects the "
                            "server, or name{label=\"value\"}."),
        "timeout_seconds": make_key("float", 0.5, "Deadline of one whole scrape (connect, headers, "
                              "body); at most half the interval.", min=0.01, max=5),
        "discover": make_key("choice", "auto", "Find running inference servers (known process, "
                       "listening port, /metrics): auto on a real node, on also with --simulate, "
                       "off.", choices=("auto", "on", "off")),
        "discover_interval_seconds": make_key("float", 60.0, "How often discovery looks for new "
                                        "and vanished servers.", min=5, max=3600),
    },
}

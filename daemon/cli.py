"""`gpucostd` command line. Imports are lazy: `gpucostd status` talks to the daemon's socket and
must not import pynvml, pyroute2 or prometheus_client.

Exit codes: status/check 0 OK, 1 WARN, 2 CRIT, 3 UNKNOWN; plan 0 nothing to change, 1 changes,
2 error; ack 3 daemon unreachable, 4 not root; config errors and usage errors 2.
"""
from __future__ import annotations

import json
import os
import re
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: `gpucostd status` pays for neither typing nor argparse
    import argparse
    from typing import List, Optional

EXIT_CONFIG = 2


def _print_err(msg: str) -> None:
    print(f"gpucostd: {msg}", file=sys.stderr)


def parse_duration(text: str) -> float:
    """'90s', '15m', '1h', '7d', or plain seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text or "")
    if not m:
        import argparse
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration; use e.g. 90s, 15m, 1h or 7d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _load_config(path: Optional[str]):
    from gpucostd.config import ConfigError, load
    try:
        return load(path)
    except ConfigError as e:
        _print_err(str(e))
        sys.exit(EXIT_CONFIG)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help="config file (default /etc/gpucostd/gpucostd.toml; missing = defaults)")


def _add_simulate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--simulate", nargs="?", const="", default=None, metavar="SCENARIO",
                   help="run on a simulated GPU node (default scenario: [simulate] scenario, "
                        "builtin:h100x8)")


def _scenario(args, cfg) -> Optional[str]:
    if args.simulate is None:
        return None
    return args.simulate or cfg.simulate.scenario


STATUS_EPILOG = """\
the cost lines (details: docs/cost.md):
  Tokens: tokens/s of the node's inference servers, tokens per dollar, the cost of a million
          tokens, the share of paid GPU-time left idle (and the tokens-per-dollar floor)
    N lost to throttling (modelled tokens): tokens the throttling took, by the cost model
    measured N/s now (R2 x): tokens/s lost right now by a least-squares fit of tokens/s
          against the SM clock over the last hour; R2 (0..1) is how much of the variation
          the clock explains. Shown only with R2 >= 0.5, 30+ points and a clock that varied
          by 3% or more; otherwise the modelled figure stands alone
    tokens/J: tokens per joule of GPU energy
  Energy: power now, kWh counted and their price, paid GPU-time left idle"""


def build_parser() -> argparse.ArgumentParser:
    import argparse
    from gpucostd import __version__
    p = argparse.ArgumentParser(
        prog="gpucostd", description="GPU tuning and health daemon that prices throttling.")
    p.add_argument("--version", action="version", version=f"gpucostd {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="run the daemon (foreground; systemd runs this)")
    _add_config(r)
    _add_simulate(r)

    s = sub.add_parser("status", help="node and GPU health from the running daemon",
                       epilog=STATUS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config(s)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--direct", action="store_true",
                   help="probe the hardware in this process instead of asking the daemon")
    s.add_argument("--socket", metavar="PATH", help="status socket (default from the config)")
    s.add_argument("--events", type=int, default=5, metavar="N", help="recent events to show")
    _add_simulate(s)

    c = sub.add_parser("config", help="check or show the configuration")
    csub = c.add_subparsers(dest="config_command", metavar="ACTION")
    cc = csub.add_parser("check", help="validate a config file; prints ok")
    cc.add_argument("file", nargs="?", help="file to check (default: the default path)")
    cs = csub.add_parser("show", help="print the effective config with defaults, as TOML")
    _add_config(cs)

    e = sub.add_parser("events", help="stored events (survive restarts)")
    _add_config(e)
    e.add_argument("--since", type=parse_duration, default=None, metavar="DURATION",
                   help="only events younger than this (e.g. 1h, 7d)")
    e.add_argument("--limit", type=int, default=200, help="at most this many (newest)")
    e.add_argument("--json", action="store_true")

    co = sub.add_parser("cost", help="dollars and capacity lost to throttling, by GPU and reason")
    _add_config(co)
    co.add_argument("--since", type=parse_duration, default=86400.0, metavar="DURATION",
                    help="window (default 24h)")
    co.add_argument("--json", action="store_true")

    a = sub.add_parser("ack", help="clear sticky faults of a GPU (root only)")
    _add_config(a)
    a.add_argument("gpu", help="GPU index, or 'node'")
    a.add_argument("code", nargs="?", help="only this finding code or Xid (default: all)")

    for name, help_ in (("plan", "show what apply would change (dry run)"),
                        ("apply", "apply the configured settings once (root)"),
                        ("check", "run the host prerequisite checks"),
                        ("restore", "restore the saved original settings (root)")):
        t = sub.add_parser(name, help=help_)
        _add_config(t)
        _add_simulate(t)
        if name == "check":
            t.add_argument("--json", action="store_true")

    cp = sub.add_parser("capture", help="write this node's GPUs as a scenario for --simulate")
    _add_config(cp)
    _add_simulate(cp)
    cp.add_argument("--out", metavar="FILE", help="write here instead of stdout")

    _add_calibrate(sub)

    rp = sub.add_parser("replay", help="run a scenario on a virtual clock and print the cost")
    rp.add_argument("scenario", help="builtin:NAME or a scenario TOML file")
    _add_config(rp)
    rp.add_argument("--duration", type=parse_duration, default=None, metavar="SECONDS")
    rp.add_argument("--step", type=float, default=1.0, metavar="SECONDS")
    rp.add_argument("--json", action="store_true")
    return p


def _add_calibrate(sub) -> None:
    k = sub.add_parser("calibrate", help="find the power limit or SM clock with the most tokens "
                       "per dollar "
                       "(root; --simulate: a simulated node on a virtual clock)")
    _add_config(k)
    k.add_argument("--simulate", nargs="?", const="", default=None, metavar="SCENARIO",
                   help="calibrate a simulated node, one-shot, on a virtual clock (default "
                        "scenario builtin:calibrate); touches no hardware")
    k.add_argument("--gpus", default="all", metavar="LIST",
                   help="GPU indexes (e.g. 0,1; whole endpoint groups) or all (default)")
    k.add_argument("--from", dest="from_watts", type=float, metavar="W",
                   help="first (highest) limit (default: the GPUs' maximum)")
    k.add_argument("--to", dest="to_watts", type=float, metavar="W",
                   help="last (lowest) limit (default: the GPUs' minimum)")
    k.add_argument("--lever", choices=("auto", "power", "clocks", "profile"), default="auto",
                   help="what to sweep: the power limit, the locked SM clock, the workload "
                        "power profile (Blackwell), or auto (default): the power limit where "
                        "it binds (draw near it, SwPowerCap), else the SM clock")
    k.add_argument("--from-mhz", type=float, metavar="MHZ",
                   help="--lever clocks: the highest clock (default: the GPUs' maximum)")
    k.add_argument("--to-mhz", type=float, metavar="MHZ",
                   help="--lever clocks: the lowest clock (default: 60%% of the maximum)")
    k.add_argument("--steps", type=int, default=6, help="steps from --from to --to (default 6)")
    k.add_argument("--dwell", type=parse_duration, default=60.0, metavar="S",
                   help="hold each step this long (default 60s)")
    k.add_argument("--warmup", type=parse_duration, default=None, metavar="S",
                   help="not measured at the start of a step (default: a quarter of the "
                        "dwell, at most 15s)")
    k.add_argument("--min-throughput", type=float, default=0.95, metavar="R",
                   help="recommend only steps with at least this share of the best step's "
                        "tokens/s (default 0.95)")
    k.add_argument("--abort-below", type=float, default=0.5, metavar="R",
                   help="abort and restore when tokens/s fall below this share of the best "
                        "step's (default 0.5)")
    k.add_argument("--apply", action="store_true",
                   help="write the recommended limits to gpucostd.d/calibrated.toml beside "
                        "the config and reload: the daemon enforces them")
    k.add_argument("--dropin", metavar="FILE",
                   help="with --simulate --apply: write the drop-in here (default: a "
                        "temporary file)")
    k.add_argument("--last", action="store_true", help="show the last calibration's report")
    k.add_argument("--socket", metavar="PATH", help="status socket (default from the config)")
    k.add_argument("--json", action="store_true", help="machine-readable report")


# ------------------------------------------------------------------ commands
def cmd_run(args) -> int:
    from gpucostd.service import run_daemon
    cfg = _load_config(args.config)
    return run_daemon(cfg, _scenario(args, cfg))


def _peek(path: str, limit: int = 1 << 20) -> bytes:
    """The first MiB of a regular file, never blocking on a FIFO (statefile.read_regular's
    rules, without its imports: logging and threading would cost `gpucostd status` its start)."""
    import stat
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        return os.read(fd, limit)
    finally:
        os.close(fd)


def _named_socket(config: "Optional[str]") -> "tuple[bool, Optional[str]]":
    """[daemon] socket_path as the config file and its drop-ins (gpucostd.d/*.toml, a later
    one wins) set it, read by a line scanner (tomllines.simple_string) instead of the
    validated config: (True, path or None when none sets it), or (False, None) when a file
    cannot be read that way (a missing or unreadable explicit file, an escape, an inline
    table): then the caller loads the validated config."""
    from gpucostd import DEFAULT_PATH
    from gpucostd.tomllines import simple_string
    main = config or DEFAULT_PATH
    files = [main]
    d = os.path.join(os.path.dirname(os.path.abspath(main)), "gpucostd.d")
    try:
        files += [os.path.join(d, n) for n in sorted(os.listdir(d))
                  if n.endswith(".toml") and not n.startswith(".")]
    except OSError:
        pass
    path = None
    for i, name in enumerate(files):
        try:
            text = _peek(name).decode("utf-8")     # never blocks on a FIFO
        except FileNotFoundError:
            if i == 0 and config is None:
                continue                          # the default file may be missing
            return False, None
        except (OSError, UnicodeDecodeError):
            return False, None
        sure, value = simple_string(text, "daemon", "socket_path")
        if not sure:
            return False, None
        path = value if value is not None else path
    return True, path


def _socket_path(args) -> str:
    """The daemon's socket: --socket, else the config's [daemon] socket_path, else the default.
    The socket path is read by a line scanner; the config is parsed (tomllib and the whole
    schema) only when that cannot read it: `gpucostd status` must start in about the time of
    the interpreter."""
    if getattr(args, "socket", None):
        return args.socket
    from gpucostd import DEFAULT_SOCKET, default_socket_path
    sure, named = _named_socket(args.config)
    path = named or default_socket_path()
    if not sure:
        from gpucostd.config import ConfigError, load
        try:
            path = load(args.config).daemon.socket_path
        except ConfigError as e:
            _print_err(f"{e} (using the default socket path)")
    # A non-root user (a member of the gpucostd group) asks the system daemon when one runs
    # and the config names no socket of its own.
    if path == default_socket_path() != DEFAULT_SOCKET and os.path.exists(DEFAULT_SOCKET):
        return DEFAULT_SOCKET
    return path


def cmd_status(args) -> int:
    from gpucostd.views import statustext as statusview
    if args.direct or args.simulate is not None:
        data = _direct_status(args)
    else:
        from gpucostd.views.statusclient import DaemonRefused, StatusClientError, request
        path = _socket_path(args)
        try:
            data = request(path, {"cmd": "status"})["status"]
        except StatusClientError as e:
            if isinstance(e, DaemonRefused):      # it runs (e.g. starting): say only that
                msg = f"UNKNOWN: {e}"
            else:
                msg = (f"UNKNOWN: cannot reach the gpucostd daemon: {e}. Start it with "
                       f"`sudo systemctl start gpucostd` (or `gpucostd run`), or use "
                       f"`gpucostd status --direct`.")
            if args.json:
                print(json.dumps({"schema": statusview.SCHEMA_VERSION, "error": msg,
                                  "socket": path}))
            else:
                print(msg)
            return 3
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        sys.stdout.write(statusview.render_status(data, statusview.use_colour(),
                                                  events=args.events))
    return statusview.exit_code(data)


def _one_shot(args, cfg):
    """A Daemon for one command. On a simulated node its state (saved originals, events) goes
    to a throw-away directory: simulated GPUs must never mix with the host's saved state."""
    import tempfile
    from gpucostd.loop import Daemon
    scenario = _scenario(args, cfg)
    state_dir = None
    if scenario is not None:
        args._tmp_state = tempfile.TemporaryDirectory(prefix="gpucostd-sim-")
        state_dir = args._tmp_state.name
    return Daemon(cfg, simulate=scenario, one_shot=True, state_dir=state_dir)


def _direct_status(args):
    from gpucostd.views import statusview
    cfg = _load_config(args.config)
    d = _one_shot(args, cfg)
    try:
        snap = d.step()
        return statusview.snapshot_json(snap)
    finally:
        d.shutdown()


def cmd_config(args) -> int:
    from gpucostd.config import ConfigError, load
    if args.config_command == "check":
        try:
            cfg = load(args.file, missing_ok=args.file is None)
        except ConfigError as e:
            _print_err(str(e))
            return EXIT_CONFIG
        except Exception as e:  # noqa: BLE001 - a bad file is exit 2 with one line, always
            _print_err(f"{args.file or 'config'}: cannot be used ({type(e).__name__}: "
                       f"{str(e)[:120]})")
            return EXIT_CONFIG
        for warning in cfg.warnings:
            _print_err(f"warning: {warning}")
        print("ok")
        return 0
    if args.config_command == "show":
        cfg = _load_config(args.config)
        sys.stdout.write(cfg.to_toml(sources=True))
        return 0
    _print_err("config needs an action: check or show")
    return EXIT_CONFIG


def _ask_daemon(args, message):
    from gpucostd.views.statusapi import StatusClientError, request
    path = _socket_path(args)
    try:
        return request(path, message), None
    except StatusClientError as e:
        return None, str(e)


def cmd_events(args) -> int:
    import time
    from gpucostd.views import statusview
    since = time.time() - args.since if args.since else None
    reply, err = _ask_daemon(args, {"cmd": "events", "since": since, "limit": args.limit})
    if reply is not None:
        events = reply["events"]
        if reply.get("note"):
            _print_err(f"note: {reply['note']}")
    else:
        # No daemon: read the store directly (history survives the daemon).
        from gpucostd.record.events import EventStore
        cfg = _load_config(args.config)
        db = os.path.join(cfg.daemon.state_dir, "events.sqlite")
        if not os.path.exists(db):
            _print_err(f"cannot reach the daemon ({err}) and no event database at {db}")
            return 3
        store = EventStore(cfg.daemon.state_dir, cfg.events.max_age_days,
                           cfg.events.max_count)
        try:
            events = [statusview.event_json(e) for e in store.query(since=since,
                                                                      limit=args.limit)]
        finally:
            store.close()
    if args.json:
        print(json.dumps(events, indent=2))
        return 0
    if not events:
        print("no events" + (" in that window" if since else ""))
    for e in events:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"]))
        xid = f" xid={e['xid']}" if e.get("xid") is not None else ""
        line = f"{stamp} {e['severity']:<7} {e['subject']:<8} {e['code']:<16}{xid} {e['message']}"
        print(_fit(line))
    return 0


def _fit(line: str, width: int = 100) -> str:
    """A line cut to `width` columns ends with an ellipsis where it was cut (as status's)."""
    return line if len(line) <= width else line[:width - 1] + "…"


def cmd_cost(args) -> int:
    reply, err = _ask_daemon(args, {"cmd": "cost", "since_seconds": args.since})
    if reply is None:
        from gpucostd.cost.accountant import breakdown_from_state
        cfg = _load_config(args.config)
        data = breakdown_from_state(cfg, args.since)
        if data is None:
            _print_err(f"cannot reach the daemon ({err}) and no saved cost totals in "
                       f"{cfg.daemon.state_dir}")
            return 3
    else:
        data = reply["cost"]
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        from gpucostd.cost.report import format_cost
        sys.stdout.write(format_cost(data, args.since))
    return 0


def cmd_ack(args) -> int:
    gpu = None if args.gpu == "node" else args.gpu
    if gpu is not None and not gpu.isdigit():
        _print_err(f"GPU must be an index like 3 or 'node', not {args.gpu!r}")
        return EXIT_CONFIG
    reply, err = _ask_daemon(args, {"cmd": "ack", "gpu": None if gpu is None else int(gpu),
                                    "code": args.code})
    if reply is None:
        _print_err(err)
        return 3 if "needs root" not in err else 4
    events = reply.get("events") or []
    print(f"acknowledged {len(events)} finding(s)" if events else "nothing to acknowledge")
    for e in events:
        print(_fit(f"  {e['subject']}: {e['message']}"))
    return 0


def _need_root(what: str) -> Optional[int]:
    if os.geteuid() != 0:
        _print_err(f"{what} changes hardware settings and needs root: run it with sudo")
        return EXIT_CONFIG
    return None


def cmd_tuning(args) -> int:
    cfg = _load_config(args.config)
    if args.command in ("apply", "restore") and args.simulate is None:
        rc = _need_root(args.command)
        if rc is not None:
            return rc
    from gpucostd.config import ConfigError
    import logging
    # one message about NVML, ours, without the daemon's "retrying every 30 s"
    logging.getLogger("gpucostd.nvml").setLevel(logging.ERROR)
    d = _one_shot(args, cfg)
    try:
        d.gateway.ensure_initialized()
        gpus = d.gpu_probe.read()
        unplanned = []
        if d.gateway.error and not gpus:
            nvml = d.gateway.error.split("; retrying every")[0]
            _print_err(f"NVML unavailable: {nvml}")
            unplanned = _gpu_keys(cfg) if args.command in ("plan", "apply") else []
        from gpucostd.tuners import manager
        if unplanned:
            print(f"cannot {args.command} the GPU settings ({', '.join(unplanned)}) without NVML: "
                  "load the NVIDIA driver (nvidia-smi must work), then run this again")
        if args.command == "plan":
            settings = d.tuning.plan(gpus)
            if settings or not unplanned:
                sys.stdout.write(manager.format_plan(settings))
            if any(s.error for s in settings) or unplanned:
                return 2
            return 1 if any(not s.in_sync for s in settings) else 0
        if args.command == "apply" and unplanned:
            changes = d.tuning.apply(gpus)
            if changes:
                sys.stdout.write(manager.format_changes(changes))
            return 2
        if args.command == "apply":
            changes = d.tuning.apply(gpus)
            sys.stdout.write(manager.format_changes(changes))
            return 2 if any(not c.ok for c in changes) else 0
        if args.command == "restore":
            changes = d.tuning.restore(gpus)
            sys.stdout.write(manager.format_changes(changes))
            return 2 if any(not c.ok for c in changes) else 0
        # check
        from gpucostd.health import checks
        from gpucostd.views.statusview import EXIT_CODES
        facts = d.host_probe.facts()
        settings = d.tuning.plan(gpus)
        results = checks.run_checks(cfg, facts, gpus, d.gateway.driver_version,
                                    d.gateway.cuda_version, settings,
                                    d.deploy_probe.read(cfg.checks.model_dirs),
                                    d.gateway.error)
        if getattr(args, "json", False):
            print(json.dumps([r.__dict__ for r in results], indent=2))
        else:
            sys.stdout.write(checks.format_checks(results))
        statuses = {r.status for r in results}
        worst = "CRIT" if "fail" in statuses else "WARN" if "warn" in statuses else "OK"
        return EXIT_CODES[worst]
    except ConfigError as e:
        _print_err(str(e))
        return EXIT_CONFIG
    finally:
        d.shutdown()


def _gpu_keys(cfg) -> List[str]:
    """The GPU settings the config asks for ([tuning.gpu] and its overrides)."""
    desired, _ = cfg.gpu_settings_for(-1, None, None)
    keys = set(desired)
    for o in cfg.gpu_overrides:
        keys.update(k for k, v in o.settings.items() if v is not None)
    return sorted(keys)


def cmd_replay(args) -> int:
    from gpucostd.replay import format_replay, run_replay
    from gpucostd.sim.scenario import ScenarioError
    cfg = _load_config(args.config)
    try:
        result = run_replay(args.scenario, cfg, duration=args.duration, step=args.step)
    except (ScenarioError, ValueError) as e:     # ValueError: --duration or --step
        _print_err(str(e))
        return EXIT_CONFIG
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        sys.stdout.write(format_replay(result))
    return 0


def cmd_calibrate(args) -> int:
    from gpucostd.calibration.command import run_cli
    return run_cli(args, _load_config, _socket_path)


def cmd_capture(args) -> int:
    import socket
    from gpucostd.capture import scenario_text
    cfg = _load_config(args.config)
    d = _one_shot(args, cfg)
    try:
        d.gateway.ensure_initialized()
        gpus = d.gpu_probe.read()
        if not gpus:
            _print_err(f"no GPUs to capture: {d.gateway.error or 'NVML reports none'}")
            return 3
        if any(g.mig and g.gpm_supported for g in gpus):
            # each MIG instance's work is GPM between two samples (nvml.h: > 100 ms apart)
            d.clock.sleep(0.5)
            gpus = d.gpu_probe.read()
        text = scenario_text(gpus, d.gateway.driver_version, d.gateway.cuda_version,
                             socket.gethostname())
    finally:
        d.shutdown()
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


COMMANDS = {"run": cmd_run, "status": cmd_status, "config": cmd_config, "events": cmd_events,
            "cost": cmd_cost, "ack": cmd_ack, "plan": cmd_tuning, "apply": cmd_tuning,
            "check": cmd_tuning, "restore": cmd_tuning, "replay": cmd_replay,
            "capture": cmd_capture, "calibrate": cmd_calibrate}


class _StatusArgs:
    """What argparse would give `status` for the common forms (see _quick_status_args)."""

    command = "status"
    direct = False
    simulate = None

    def __init__(self) -> None:
        self.json = False
        self.socket: Optional[str] = None
        self.config: Optional[str] = None
        self.events = 5


def _quick_status_args(argv: List[str]) -> Optional[_StatusArgs]:
    """`gpucostd status [--json] [--socket P] [--config F] [--events N]` without argparse
    (whose import and parser build cost more than the rest of the command). Anything else,
    including every error, goes to argparse, which says what is wrong."""
    if not argv or argv[0] != "status":
        return None
    args = _StatusArgs()
    rest = argv[1:]
    i = 0
    while i < len(rest):
        opt = rest[i]
        value = None
        if "=" in opt and opt.startswith("--"):
            opt, value = opt.split("=", 1)
        if opt == "--json" and value is None:
            args.json = True
            i += 1
            continue
        if opt not in ("--socket", "--config", "--events"):
            return None
        if value is None:
            if i + 1 >= len(rest) or rest[i + 1].startswith("-"):
                return None
            value = rest[i + 1]
            i += 1
        i += 1
        if opt == "--events":
            if not value.isdigit():
                return None
            args.events = int(value)
        else:
            setattr(args, opt[2:], value)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    quick = _quick_status_args(sys.argv[1:] if argv is None else list(argv))
    if quick is not None:
        try:
            return cmd_status(quick)
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:
            return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_CONFIG
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``sockguard`` command line: maps, audit, clean, run, trace, doctor.

Exit status: 0 no findings, 1 bad entries found (``policy.BAD_KINDS``: stale,
shadowing, recvpath; for ``clean``: some remained or were refused), 2 an error,
printed as one line.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from ipaddress import ip_address
from typing import NoReturn

from sockguard.cli.output import (
    audit_json,
    audit_text,
    clean_json,
    clean_text,
    maps_json,
    maps_text,
)
from sockguard.core.errors import FD_ERRNOS, ConfigError, NotRootError, SockguardError
from sockguard.core.escape import printable
from sockguard.core.layout import LAYOUTS, KeyLayout
from sockguard.core.model import IPAddress, MapInfo
from sockguard.kernel import maps as maps_adapter
from sockguard.kernel.cilium import audit_policy
from sockguard.kernel.node_audit import (
    ENTRY_SOURCES,
    SOCKET_SOURCES,
    NodeAudit,
    run_audit,
    with_owners,
)
from sockguard.kernel.remediation import DEFAULT_MAX_DELETES, clean_each_map, deletions
from sockguard.kernel.sockmap_iter import iterator_available, read_sockmap
from sockguard.service.config import MAX_CONFIRM_DELAY, integer_arg, number_arg
from sockguard.service.notify import EscapingFormatter
from sockguard.service.signals import SignalInbox

log = logging.getLogger("sockguard")


def _ip(text: str) -> IPAddress:
    try:
        return ip_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an IP address: {text}") from exc


#: Longest ``trace --duration``: a week (without the flag it runs until stopped).
MAX_TRACE_DURATION = 7 * 86400.0


def _seconds_arg(high: float) -> Callable[[str], float]:
    """argparse type: a finite number of seconds from 0 to ``high``."""
    def seconds(text: str) -> float:
        value = number_arg(text)
        if not (math.isfinite(value) and 0 <= value <= high):
            raise argparse.ArgumentTypeError(
                f"must be >= 0 and <= {high:g} (seconds, a finite number), got {text!r}")
        return value
    return seconds


def _nonneg_int(text: str) -> int:
    value = integer_arg(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with sockguard's error format: one line, ``sockguard: ...``, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"sockguard: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = _Parser(
        prog="sockguard",
        description="Find and safely remove stale entries of eBPF sockhash maps.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--map", action="append", default=[], metavar="SPEC",
                       help="pin path, id:N or map name (repeatable); default: discover")
        p.add_argument("--json", action="store_true", help="stable JSON on stdout")
        p.add_argument("--bpffs", default="/sys/fs/bpf", metavar="DIR",
                       help="where to look for pinned maps (default /sys/fs/bpf)")
        p.add_argument("--discover-name", action="append", default=[], metavar="NAME",
                       help="map name to discover among loaded maps (repeatable; "
                            "default cilium_sock_ops)")

    p_maps = sub.add_parser("maps", help="list the sockhash/sockmap maps on this node")
    common(p_maps)

    for name, text in (("audit", "report stale, shadowing and recvpath entries (never "
                                 "writes)"),
                       ("clean", "delete confirmed stale and shadowing entries (dry run "
                                 "unless --apply; recvpath ones with --delete-unproven)")):
        p = sub.add_parser(name, help=text)
        common(p)
        p.add_argument("--layout", choices=sorted(LAYOUTS), default="cilium",
                       help="key layout (default: cilium)")
        p.add_argument("--proxy-ip", action="append", type=_ip, default=[], metavar="IP",
                       help="host gateway IP that marks L7-proxy entries (cilium_host's); "
                            "repeatable")
        p.add_argument("--confirm-delay", type=_seconds_arg(MAX_CONFIRM_DELAY), default=0.2,
                       metavar="SECONDS",
                       help=f"pause before the confirming second look (default 0.2; 0 to "
                            f"{MAX_CONFIRM_DELAY:g})")
        p.add_argument("--no-iterator", action="store_true",
                       help="read keys with syscalls only (same as --entry-source syscall)")
        p.add_argument("--entry-source", choices=ENTRY_SOURCES, default="auto",
                       help="how to learn which socket each entry points to: the iter/sockmap "
                            "iterator, the tc lookup (a SCHED_CLS program run with "
                            "BPF_PROG_TEST_RUN), syscalls only (cannot tell), or auto (the "
                            "first that runs here; default)")
        p.add_argument("--socket-source", choices=SOCKET_SOURCES, default="auto",
                       help="where live sockets are read: the iter/tcp iterator (also sees "
                            "each socket's receive path), sock_diag, or auto (the iterator "
                            "where it loads; default)")
        p.add_argument("--all", action="store_true", help="also list ok and proxy entries")
        if name == "clean":
            p.add_argument("--apply", action="store_true", help="really delete")
            p.add_argument("--max-deletes", type=_nonneg_int, default=DEFAULT_MAX_DELETES,
                           metavar="N",
                           help=f"stop after N deletes (default {DEFAULT_MAX_DELETES})")
            p.add_argument("--delete-unproven", action="store_true",
                           help="also delete the keys of recvpath findings whose entry socket "
                                "could not be identified, while their owner is still live "
                                "(deleting a valid entry only costs acceleration; default: "
                                "delete only what is proven)")
    _add_run_parser(sub)  # `sockguard run`, see the section at the end
    _add_tracer_parsers(sub)  # `sockguard trace` and `doctor`, see their section
    return parser


def _require_root() -> None:
    if os.geteuid() != 0:
        raise NotRootError("must run as root (needs CAP_SYS_ADMIN to open BPF maps by id and "
                           "to enter network namespaces; CAP_BPF alone is not enough)")


def _select_maps(args: argparse.Namespace) -> tuple[list[MapInfo], bool]:
    if not args.map and not maps_adapter.is_bpffs(args.bpffs):
        log.warning("%s is not a bpf filesystem: no pinned maps searched there, only loaded "
                    "maps named %s", args.bpffs, " or ".join(_discover_names(args)))
    return maps_adapter.select_maps(args.map, args.bpffs, _discover_names(args))


def _discover_names(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(args.discover_name) or ("cilium_sock_ops",)


def _layout(name: str) -> KeyLayout:
    try:
        return LAYOUTS[name]
    except KeyError as exc:
        raise ConfigError(f"unknown layout {name}") from exc


def _audit(args: argparse.Namespace) -> tuple[NodeAudit, list[MapInfo]]:
    maps, discovered = _select_maps(args)
    policy = audit_policy(args.proxy_ip)
    audit = run_audit(maps, _layout(args.layout), policy, args.confirm_delay,
                      use_iterator=not args.no_iterator, tolerate_skips=discovered,
                      socket_source=args.socket_source, entry_source_name=args.entry_source,
                      include_ok=bool(getattr(args, "all", False)))
    if getattr(args, "all", False):
        with_owners(audit)
    return audit, maps


def _entry_count(info: MapInfo) -> int | None:
    """Occupied entries. A sockmap's get_next_key walks every index, used or not
    (sock_map_get_next_key), so only the iterator can count a sockmap."""
    with maps_adapter.open_map(info) as handle:
        if handle.is_hash:
            return sum(1 for _ in handle.keys())
        if iterator_available()[0]:
            return len(read_sockmap(handle.fd, info.key_size))
    return None


def cmd_maps(args: argparse.Namespace) -> int:
    maps, _ = _select_maps(args)
    counts = {m.id: _entry_count(m) for m in maps}
    print(maps_json(maps, counts) if args.json
          else maps_text(maps, counts, args.bpffs, _discover_names(args)))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    audit, _ = _audit(args)
    print(audit_json(audit, args.all) if args.json else audit_text(audit, args.all))
    return _status(bool(audit.bad), audit)


#: Exit status when nothing bad was found but the node could not be fully seen.
EXIT_INCOMPLETE = 3


def _status(bad_left: bool, audit: NodeAudit) -> int:
    """1: bad entries (left); 3: none seen, but not every namespace could be seen; 0: neither."""
    if bad_left:
        return 1
    return 0 if audit.complete else EXIT_INCOMPLETE


def cmd_clean(args: argparse.Namespace) -> int:
    audit, _ = _audit(args)
    cleaned = clean_each_map(audit.results, args.apply, args.max_deletes,
                             delete_unproven=args.delete_unproven)
    done = deletions(cleaned)
    if args.json:
        print(clean_json(done, args.apply, audit))
    else:
        print(clean_text(done, args.apply))
    if any(c.error is not None for c in cleaned):
        return 2  # a map failed mid-way: the reason is in each deletion and on stderr
    left = [d for d in done if d.outcome not in ("deleted", "gone")]
    return _status(bool(left), audit)


# -- `sockguard run`: the always-on service (sockguard/service/daemon.py) -----------------------


def _add_run_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from sockguard.service.config import add_run_arguments

    p = sub.add_parser("run", help="audit periodically as a systemd service, with metrics "
                                   "(see packaging/README.md)")
    add_run_arguments(p)


def cmd_run(args: argparse.Namespace) -> int:
    # Before the daemon's imports and config: a stop asked for while it starts is then a
    # clean stop, and a reload a no-op, instead of the default action (death).
    signals = SignalInbox()
    signals.install()
    try:
        from sockguard.service.daemon import main as run_daemon

        return run_daemon(args, signals)
    finally:
        signals.close()


# -- `sockguard trace` and `sockguard doctor` (sockguard/trace/tracer.py, doctor.py) ------------


def _add_tracer_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("trace", help="live stream of sockhash/socket events (tracer)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--duration", type=_seconds_arg(MAX_TRACE_DURATION), default=None,
                   metavar="SECONDS",
                   help=f"stop after this long (at most {MAX_TRACE_DURATION:g}; default: until "
                        "SIGINT/SIGTERM)")
    p.add_argument("--all-states", action="store_true",
                   help="every TCP state transition, not only ESTABLISHED and CLOSE")
    p.add_argument("--every-recv", action="store_true",
                   help="every recvmsg, not once per socket and receive function")
    p.add_argument("--map", action="append", default=[], metavar="SPEC",
                   help="maps whose keys are checked for mismatches, collisions at connect "
                        "and left-behind keys (default: discover)")
    p.add_argument("--bpffs", default="/sys/fs/bpf", metavar="DIR",
                   help="where to look for pinned maps (default /sys/fs/bpf)")
    p.add_argument("--no-map-check", action="store_true",
                   help="do not look keys up in maps (recv/close events; no collision check)")
    d = sub.add_parser("doctor", help="what this kernel allows and what sockguard can detect")
    d.add_argument("--json", action="store_true", help="stable JSON on stdout")


def cmd_trace(args: argparse.Namespace) -> int:
    """Print events until SIGINT/SIGTERM or --duration; links are destroyed on the way out."""
    import json
    import signal
    import time

    from sockguard.trace.events import TraceEvent
    from sockguard.trace.tracer import Tracer, TracerOptions, attached_detections
    from sockguard.trace.watched import MapWatch

    def emit(ev: TraceEvent) -> None:
        print(json.dumps(ev.as_dict()) if args.json else printable(ev.line()), flush=True)

    specs = list(args.map)
    if specs and not args.no_map_check:
        # Named maps are resolved once before anything is attached: an unknown or
        # invalid one is an error (exit 2), as in the other commands, not a silent no-op.
        for info in maps_adapter.select_maps(specs, args.bpffs, ("cilium_sock_ops",))[0]:
            LAYOUTS["cilium"].check_map(info.key_size, info.name)
    watch = None if args.no_map_check else MapWatch(
        lambda: maps_adapter.select_maps(specs, args.bpffs, ("cilium_sock_ops",))[0])
    options = TracerOptions(all_states=args.all_states, every_recv=args.every_recv,
                            check_maps=not args.no_map_check)
    stop = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with Tracer(emit, options, watch) as tracer:
            detections = tracer.start()
            print(f"sockguard: {attached_detections(detections)}", file=sys.stderr, flush=True)
            deadline = None if args.duration is None else time.monotonic() + args.duration
            while not stop:
                wait = 200 if deadline is None else max(0, min(200, int(
                    (deadline - time.monotonic()) * 1000)))
                tracer.poll(wait)
                if deadline is not None and time.monotonic() >= deadline:
                    break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """One screen about the node; always exit 0 (it reports, it does not judge)."""
    from sockguard.cli.doctor import render_json, render_text, report

    if os.geteuid() != 0:
        print("sockguard: doctor: not root: BPF program loads and the map and program "
              "listings are refused, so those probes show 'no' with the reason; run as root "
              "(CAP_SYS_ADMIN) for the full report", file=sys.stderr)
    doc = report()
    print(render_json(doc) if args.json else render_text(doc))
    return 0


COMMANDS = {"maps": cmd_maps, "audit": cmd_audit, "clean": cmd_clean, "run": cmd_run,
            "trace": cmd_trace, "doctor": cmd_doctor}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter("sockguard: %(message)s"))  # see escape.py
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        handlers=[handler])
    try:
        if args.command != "doctor":  # doctor reports what it could not probe instead
            _require_root()
        return COMMANDS[args.command](args)
    except SockguardError as exc:
        print(f"sockguard: {exc}", file=sys.stderr)
        return exc.exit_code
    except PermissionError as exc:
        print(f"sockguard: permission denied: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # BpfError included: one line, never a traceback
        if exc.errno in FD_ERRNOS:
            print(f"sockguard: out of file descriptors ({exc}); nothing was deleted after it; "
                  "raise the limit (ulimit -n)", file=sys.stderr)
        else:
            print(f"sockguard: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

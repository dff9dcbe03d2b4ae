"""The configuration of ``sockguard run``: one TOML file, every key overridable by a flag.

Why one table (``OPTIONS``) drives everything: the TOML keys, their defaults,
their types, their validation, the ``sockguard run`` flags and the shipped
``packaging/sockguard.toml`` must never drift apart.  Each ``Option`` names
its TOML ``section.key``, the ``Config`` attribute it sets and its flag; the
parser, the argparse wiring and the packaging test all walk this one table.

Precedence: built-in default < config file < command-line flag.  Flags keep
winning after a SIGHUP reload (the file is re-read, the same flags re-applied),
so an operator's ExecStart override is never silently undone by a reload.

A file that is not valid TOML, has an unknown section or key, or a value of
the wrong type or out of range raises ``ConfigError`` naming the file, the key
and what was expected: at start the daemon exits 2, on reload the old
configuration is kept.
"""

from __future__ import annotations

import argparse
import math
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from ipaddress import ip_address
from typing import Any

from sockguard.core.errors import ConfigError
from sockguard.core.layout import LAYOUTS
from sockguard.core.model import IPAddress
from sockguard.kernel.node_audit import ENTRY_SOURCES
from sockguard.trace.collision import GATE_MODES

LOG_TARGETS = ("auto", "journal", "stderr")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Config:
    """The daemon's settings; defaults here are the documented defaults."""

    interval: float = 10.0
    maps: tuple[str, ...] = ()
    bpffs: str = "/sys/fs/bpf"
    discover_names: tuple[str, ...] = ("cilium_sock_ops",)
    layout: str = "cilium"
    proxy_ips: tuple[IPAddress, ...] = ()
    confirm_delay: float = 0.2
    use_iterator: bool = True
    entry_source: str = "auto"
    remediate: bool = False
    max_deletes: int = 100
    delete_unproven: bool = False
    metrics_enabled: bool = True
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 9795
    liveness_timeout: float = 30.0
    log_target: str = "auto"
    log_level: str = "info"
    log_max_findings: int = 100
    tracer_enabled: bool = True
    collision_check: str = "auto"
    source: str | None = None  # the file it came from; not a key


Check = Callable[[Any], str | None]  # returns what is wrong, or None


@dataclass(frozen=True)
class Option:
    """One configuration key: where it lives in TOML, its type, its flag, its doc."""

    section: str
    key: str
    attr: str
    kind: str  # "float", "int", "bool", "str", "str-list", "ip-list"
    help: str
    flag: str
    check: Check | None = None

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"

    @property
    def default(self) -> object:
        value: object = getattr(Config(), self.attr)
        return value


#: Bounds of the float settings: finite only (TOML and float() accept inf and nan; an
#: infinite interval would audit once and then never again, an infinite confirm_delay
#: would hang every cycle).  A day between audits is already useless as monitoring;
#: the confirming look is meant to be a fraction of a second.
MAX_INTERVAL = 86400.0
MAX_CONFIRM_DELAY = 60.0
#: An hour without progress is no liveness check at all; a second is below a busy audit's
#: longest phase on a loaded node.
MIN_LIVENESS, MAX_LIVENESS = 1.0, 3600.0


def _seconds(low: float, high: float, low_open: bool) -> Check:
    lower = f"> {low:g}" if low_open else f">= {low:g}"

    def check(v: float) -> str | None:
        if math.isfinite(v) and (v > low if low_open else v >= low) and v <= high:
            return None
        return f"must be {lower} and <= {high:g} (seconds, a finite number)"
    return check


def _nonneg(v: float) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _one_of(choices: Sequence[str]) -> Check:
    def check(v: str) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}"
    return check


def _port(v: int) -> str | None:
    return None if 1 <= v <= 65535 else "must be a TCP port, 1-65535"


def _absolute(v: str) -> str | None:
    return None if v.startswith("/") else "must be an absolute path"


def _ip_literal(v: str) -> str | None:
    try:
        ip_address(v)
    except ValueError:
        return "must be an IP address literal (e.g. 127.0.0.1 or ::1)"
    return None


OPTIONS: tuple[Option, ...] = (
    Option("audit", "interval", "interval", "float",
           f"seconds from the start of one audit to the start of the next (> 0, at most "
           f"{MAX_INTERVAL:g})", "--interval",
           _seconds(0.0, MAX_INTERVAL, low_open=True)),
    Option("audit", "maps", "maps", "str-list",
           "maps to audit: pin paths, id:N or names; empty = discover (pins under "
           "/sys/fs/bpf and loaded maps named cilium_sock_ops)", "--map"),
    Option("audit", "bpffs", "bpffs", "str",
           "bpffs directory searched for pinned maps (discovery and map names)", "--bpffs",
           _absolute),
    Option("audit", "discover_names", "discover_names", "str-list",
           "names of loaded maps that discovery picks up (pinned or not)", "--discover-name"),
    Option("audit", "layout", "layout", "str", "key layout", "--layout",
           _one_of(sorted(LAYOUTS))),
    Option("audit", "proxy_ips", "proxy_ips", "ip-list",
           "host gateway IPs (cilium_host) that mark L7-proxy entries", "--proxy-ip"),
    Option("audit", "confirm_delay", "confirm_delay", "float",
           f"seconds between the first look and the confirming second look (0 to "
           f"{MAX_CONFIRM_DELAY:g})", "--confirm-delay",
           _seconds(0.0, MAX_CONFIRM_DELAY, low_open=False)),
    Option("audit", "use_iterator", "use_iterator", "bool",
           "use the iter/sockmap BPF iterator where it works (needed to see shadowing on "
           "4-byte-value maps)", "--iterator"),
    Option("audit", "entry_source", "entry_source", "str",
           "how to learn which socket each entry points to: auto, iterator (iter/sockmap), "
           "tc_lookup (SCHED_CLS lookup run with BPF_PROG_TEST_RUN) or syscall (cannot tell)",
           "--entry-source", _one_of(ENTRY_SOURCES)),
    Option("remediation", "enabled", "remediate", "bool",
           "delete confirmed, re-verified stale and shadowing entries (and recvpath ones "
           "with remediation.delete_unproven)", "--remediate"),
    Option("remediation", "max_deletes", "max_deletes", "int",
           "at most this many deletes per audit cycle", "--max-deletes", _nonneg),
    Option("remediation", "delete_unproven", "delete_unproven", "bool",
           "also delete the keys of recvpath findings whose entry socket could not be "
           "identified, while their owner is still live (costs only acceleration if the "
           "entry was valid)", "--delete-unproven"),
    Option("metrics", "enabled", "metrics_enabled", "bool",
           "serve Prometheus metrics over HTTP (GET only)", "--metrics"),
    Option("metrics", "address", "metrics_address", "str",
           "address the metrics endpoint binds to", "--metrics-address", _ip_literal),
    Option("metrics", "port", "metrics_port", "int",
           "TCP port of the metrics endpoint", "--metrics-port", _port),
    Option("metrics", "liveness_timeout", "liveness_timeout", "float",
           f"GET /healthz answers 503 once the audit thread has made no progress for this "
           f"many seconds ({MIN_LIVENESS:g} to {MAX_LIVENESS:g}; for a Kubernetes "
           f"livenessProbe)", "--liveness-timeout",
           _seconds(MIN_LIVENESS, MAX_LIVENESS, low_open=False)),
    Option("log", "target", "log_target", "str",
           "auto (journald when started by systemd, else stderr), journal or stderr",
           "--log-target", _one_of(LOG_TARGETS)),
    Option("log", "level", "log_level", "str", "log level", "--log-level",
           _one_of(LOG_LEVELS)),
    Option("log", "max_findings", "log_max_findings", "int",
           "log at most this many newly seen findings per cycle (the rest are summed up)",
           "--log-max-findings", _nonneg),
    Option("tracer", "enabled", "tracer_enabled", "bool",
           "run the event tracer where the kernel allows it (update failures, psock drops, "
           "receive-path mismatches, early audit after a socket closes)", "--tracer"),
    Option("tracer", "collision_check", "collision_check", "str",
           "when the collision check listens at every new connection: auto (while an audited "
           "map may hold a key to collide with: until an audit proves every entry owned, and "
           "again after an entry goes bad) or always", "--collision-check",
           _one_of(GATE_MODES)),
)

_BY_NAME = {o.name: o for o in OPTIONS}
SECTIONS = tuple(dict.fromkeys(o.section for o in OPTIONS))

_TYPE_WORDS = {
    "float": "a number", "int": "an integer", "bool": "true or false", "str": "a string",
    "str-list": "a list of strings", "ip-list": "a list of IP address strings",
}


def _type_name(value: object) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string",
            list: "array", dict: "table"}.get(type(value), type(value).__name__)


def _coerce(opt: Option, value: object, where: str) -> object:
    """``value`` as the option's Python type, or ConfigError saying what was expected."""
    bad = ConfigError(
        f"{where}: {opt.name} must be {_TYPE_WORDS[opt.kind]}, "
        f"got {_type_name(value)} {value!r}"
    )
    out: object
    if opt.kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        out = float(value)
    elif opt.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        out = value
    elif opt.kind == "bool":
        if not isinstance(value, bool):
            raise bad
        out = value
    elif opt.kind == "str":
        if not isinstance(value, str):
            raise bad
        out = value
    else:
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise bad
        if opt.kind == "ip-list":
            try:
                out = tuple(ip_address(v) for v in value)
            except ValueError as exc:
                raise ConfigError(f"{where}: {opt.name}: {exc}") from exc
        else:
            out = tuple(value)
    if opt.check is not None:
        problem = opt.check(out)
        if problem is not None:
            raise ConfigError(f"{where}: {opt.name} {problem}, got {value!r}")
    return out


def parse_toml(text: str, where: str = "<config>") -> dict[str, object]:
    """The ``Config`` attributes a TOML document sets (validated), by attribute name."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from exc
    out: dict[str, object] = {}
    for section, body in doc.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"{where}: unknown section [{section}] (known: {', '.join(SECTIONS)})"
            )
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: {section} must be a table ([{section}]), "
                              f"got {_type_name(body)}")
        for key, value in body.items():
            opt = _BY_NAME.get(f"{section}.{key}")
            if opt is None:
                known = ", ".join(o.key for o in OPTIONS if o.section == section)
                raise ConfigError(f"{where}: unknown key {section}.{key} "
                                  f"(known in [{section}]: {known})")
            out[opt.attr] = _coerce(opt, value, where)
    return out


def load_config(path: str | None, overrides: Mapping[str, object] | None = None) -> Config:
    """Defaults, then the file at ``path`` (if any), then ``overrides`` (by attribute).

    Overrides are validated like file values, so ``--interval -1`` is as
    clear an error as ``interval = -1``.
    """
    values: dict[str, object] = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text: {exc}") from exc
        values.update(parse_toml(text, path))
    by_attr = {o.attr: o for o in OPTIONS}
    for attr, value in (overrides or {}).items():
        opt = by_attr.get(attr)
        if opt is None:
            raise ConfigError(f"unknown override {attr}")
        values[attr] = _coerce(opt, value, f"flag {opt.flag}")
    return replace(Config(), source=path, **values)  # type: ignore[arg-type]


# -- flags ------------------------------------------------------------------------------


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``sockguard run`` flags: ``--config`` and one flag per option.

    Every flag defaults to None ("not given"), so only flags the operator
    typed override the file.
    """
    parser.add_argument("--config", metavar="FILE",
                        help="TOML configuration file (default: built-in defaults only)")
    for opt in OPTIONS:
        text = f"{opt.help} [{opt.name}, default {_show_default(opt)}]"
        if opt.kind == "bool":
            parser.add_argument(opt.flag, dest=opt.attr, action=argparse.BooleanOptionalAction,
                                default=None, help=text)
        elif opt.kind in ("str-list", "ip-list"):
            parser.add_argument(opt.flag, dest=opt.attr, action="append", default=None,
                                metavar=opt.key.upper().rstrip("S"),
                                help=text + "; repeatable, replaces the file's list")
        else:
            convs: dict[str, Callable[[str], object]] = {
                "float": number_arg, "int": integer_arg, "str": str}
            conv = convs[opt.kind]
            parser.add_argument(opt.flag, dest=opt.attr, type=conv, default=None,
                                metavar=opt.key.upper(), help=text)


def number_arg(text: str) -> float:
    """argparse type of number flags: the error names what was expected, not a function."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def integer_arg(text: str) -> int:
    """argparse type of integer flags."""
    try:
        return int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def overrides_from_args(args: argparse.Namespace) -> dict[str, object]:
    """The options given on the command line, by ``Config`` attribute."""
    return {o.attr: getattr(args, o.attr) for o in OPTIONS
            if getattr(args, o.attr, None) is not None}


def _show_default(opt: Option) -> str:
    value = opt.default
    if isinstance(value, tuple):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def describe(cfg: Config) -> str:
    """One line with every effective setting, for the log at start and reload."""
    parts = []
    for opt in OPTIONS:
        value = getattr(cfg, opt.attr)
        if isinstance(value, tuple):
            value = "[" + ",".join(str(v) for v in value) + "]"
        parts.append(f"{opt.name}={value}")
    return " ".join(parts)


__all__ = ["OPTIONS", "Config", "ConfigError", "Option", "add_run_arguments", "describe",
           "load_config", "overrides_from_args", "parse_toml"]

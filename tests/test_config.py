"""``sockguard run`` configuration: defaults, every key, errors, flag overrides (no root).

Also the pieces of the daemon that need no kernel: the sd_notify and journald
wire protocols (against sockets the test binds), the metrics registry and its
read-only endpoint, and the bounded label mappings.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import struct
import urllib.error
import urllib.request
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest

from sockguard.cli.commands import build_parser
from sockguard.core.errors import ConfigError
from sockguard.service.config import OPTIONS, Config, load_config, overrides_from_args, parse_toml
from sockguard.service.metrics import Metrics, start_server
from sockguard.service.notify import (
    JournaldHandler,
    NativeJournalSender,
    Notifier,
    encode_journal_fields,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "packaging" / "sockguard.toml"

#: A non-default value for every option, as TOML text and as the parsed value.
NON_DEFAULT: dict[str, tuple[str, object]] = {
    "audit.interval": ("2.5", 2.5),
    "audit.maps": ('["/sys/fs/bpf/tc/globals/cilium_sock_ops", "id:7"]',
                   ("/sys/fs/bpf/tc/globals/cilium_sock_ops", "id:7")),
    "audit.bpffs": ('"/run/cilium/bpffs"', "/run/cilium/bpffs"),
    "audit.discover_names": ('["cilium_sock_ops", "my_sockhash"]',
                             ("cilium_sock_ops", "my_sockhash")),
    "audit.layout": ('"cilium"', "cilium"),  # the only layout; still parsed
    "audit.proxy_ips": ('["10.0.0.1", "fd00::1"]', (ip_address("10.0.0.1"),
                                                     ip_address("fd00::1"))),
    "audit.confirm_delay": ("0", 0.0),
    "audit.use_iterator": ("false", False),
    "audit.entry_source": ('"tc_lookup"', "tc_lookup"),
    "remediation.enabled": ("true", True),
    "remediation.max_deletes": ("7", 7),
    "remediation.delete_unproven": ("true", True),
    "metrics.enabled": ("false", False),
    "metrics.address": ('"::1"', "::1"),
    "metrics.port": ("19999", 19999),
    "metrics.liveness_timeout": ("5", 5.0),
    "log.target": ('"stderr"', "stderr"),
    "log.level": ('"debug"', "debug"),
    "log.max_findings": ("3", 3),
    "tracer.enabled": ("false", False),
    "tracer.collision_check": ('"always"', "always"),
}


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "sockguard.toml"
    path.write_text(text)
    return str(path)


def _run_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", *argv])


# -- defaults and every key -------------------------------------------------------------


def test_no_file_means_documented_defaults() -> None:
    cfg = load_config(None)
    assert cfg == Config()
    assert (cfg.interval, cfg.remediate, cfg.metrics_address, cfg.metrics_port) == \
        (10.0, False, "127.0.0.1", 9795)


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path, "")
    assert load_config(path) == Config(source=path)


def test_table_covers_every_config_field() -> None:
    attrs = {o.attr for o in OPTIONS}
    fields = set(Config.__dataclass_fields__) - {"source"}
    assert attrs == fields
    assert set(NON_DEFAULT) == {o.name for o in OPTIONS}


@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: o.name)
def test_every_key_parses(opt: object, tmp_path: Path) -> None:
    from sockguard.service.config import Option

    assert isinstance(opt, Option)
    text, expected = NON_DEFAULT[opt.name]
    path = _write(tmp_path, f"[{opt.section}]\n{opt.key} = {text}\n")
    cfg = load_config(path)
    assert getattr(cfg, opt.attr) == expected
    # and nothing else changed
    others = {o.attr for o in OPTIONS} - {opt.attr}
    assert all(getattr(cfg, a) == getattr(Config(), a) for a in others)


def test_all_keys_at_once(tmp_path: Path) -> None:
    sections: dict[str, list[str]] = {}
    for opt in OPTIONS:
        sections.setdefault(opt.section, []).append(f"{opt.key} = {NON_DEFAULT[opt.name][0]}")
    text = "\n".join(f"[{s}]\n" + "\n".join(lines) for s, lines in sections.items())
    cfg = load_config(_write(tmp_path, text))
    for opt in OPTIONS:
        assert getattr(cfg, opt.attr) == NON_DEFAULT[opt.name][1], opt.name


def test_shipped_file_lists_every_key_with_its_default() -> None:
    """packaging/sockguard.toml documents every key, each set to the built-in default."""
    text = SHIPPED.read_text()
    for opt in OPTIONS:
        assert f"\n{opt.key} = " in text, f"{opt.name} missing from {SHIPPED}"
        assert opt.flag in text, f"{opt.flag} not documented for {opt.name}"
    assert load_config(str(SHIPPED)) == Config(source=str(SHIPPED))


# -- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[audit\ninterval = 1", "not valid TOML"),
        ("[audit]\ninterval = ", "not valid TOML"),
        ("[audit]\nintervall = 5", "unknown key audit.intervall"),
        ("[audti]\ninterval = 5", "unknown section [audti]"),
        ("interval = 5", "unknown section [interval]"),
        ('[audit]\ninterval = "10s"', "audit.interval must be a number, got string '10s'"),
        ("[audit]\ninterval = true", "audit.interval must be a number, got boolean"),
        ("[audit]\ninterval = 0", "audit.interval must be > 0"),
        ("[audit]\nconfirm_delay = -1", "audit.confirm_delay must be >= 0"),
        ("[audit]\ninterval = inf", "audit.interval must be > 0 and <= 86400"),
        ("[audit]\ninterval = nan", "audit.interval must be > 0 and <= 86400"),
        ("[audit]\ninterval = 1e308", "audit.interval must be > 0 and <= 86400"),
        ("[audit]\ninterval = 86401", "audit.interval must be > 0 and <= 86400"),
        ("[audit]\nconfirm_delay = inf", "audit.confirm_delay must be >= 0 and <= 60"),
        ("[audit]\nconfirm_delay = nan", "audit.confirm_delay must be >= 0 and <= 60"),
        ("[audit]\nconfirm_delay = 61", "audit.confirm_delay must be >= 0 and <= 60"),
        ('[audit]\nmaps = "cilium_sock_ops"', "audit.maps must be a list of strings"),
        ("[audit]\nmaps = [1]", "audit.maps must be a list of strings"),
        ('[audit]\nproxy_ips = ["10.0.0.256"]', "audit.proxy_ips"),
        ('[audit]\nlayout = "calico"', "audit.layout must be one of cilium"),
        ('[audit]\nbpffs = "sys/fs/bpf"', "audit.bpffs must be an absolute path"),
        ('[audit]\nuse_iterator = "yes"', "audit.use_iterator must be true or false"),
        ("[remediation]\nenabled = 1", "remediation.enabled must be true or false"),
        ("[remediation]\nmax_deletes = 1.5", "remediation.max_deletes must be an integer"),
        ("[remediation]\nmax_deletes = -1", "remediation.max_deletes must be >= 0"),
        ("[metrics]\nport = 70000", "metrics.port must be a TCP port"),
        ('[metrics]\naddress = "localhost"', "metrics.address must be an IP address literal"),
        ('[log]\ntarget = "syslog"', "log.target must be one of auto, journal, stderr"),
        ('[log]\nlevel = "loud"', "log.level must be one of"),
        ("metrics = 5", "metrics must be a table"),
    ],
)
def test_bad_config_is_a_clear_config_error(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert message in str(exc.value)
    assert str(exc.value).startswith(path), "the error names the file"


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(str(tmp_path / "nope.toml"))


def test_parse_toml_reports_where() -> None:
    with pytest.raises(ConfigError, match=r"^/etc/x\.toml: unknown key"):
        parse_toml("[log]\ncolour = true", "/etc/x.toml")


# -- flags ------------------------------------------------------------------------------


def test_every_key_has_a_flag() -> None:
    parser = build_parser()
    run = next(a for a in parser._subparsers._actions  # type: ignore[union-attr]
               if isinstance(a, argparse._SubParsersAction)).choices["run"]
    flags = {s for a in run._actions for s in a.option_strings}
    for opt in OPTIONS:
        assert opt.flag in flags, opt.name
    assert "--config" in flags


def test_flags_override_file(tmp_path: Path) -> None:
    path = _write(tmp_path, '[audit]\ninterval = 30\nmaps = ["a", "b"]\n'
                            "[remediation]\nenabled = true\nmax_deletes = 5\n"
                            '[metrics]\nport = 1234\n')
    args = _run_args("--config", path, "--interval", "0.5", "--map", "c", "--no-remediate",
                     "--metrics-port", "4321", "--proxy-ip", "10.1.1.1")
    cfg = load_config(args.config, overrides_from_args(args))
    assert cfg.interval == 0.5
    assert cfg.maps == ("c",)  # a flag list replaces the file's list
    assert cfg.remediate is False
    assert cfg.max_deletes == 5  # not given as a flag: the file's value
    assert cfg.metrics_port == 4321
    assert cfg.proxy_ips == (ip_address("10.1.1.1"),)


def test_flags_without_file_and_unset_flags_do_not_override() -> None:
    args = _run_args("--remediate", "--no-iterator")
    overrides = overrides_from_args(args)
    assert overrides == {"remediate": True, "use_iterator": False}
    cfg = load_config(None, overrides)
    assert cfg.remediate and not cfg.use_iterator and cfg.interval == 10.0


def test_bad_flag_value_is_a_config_error() -> None:
    args = _run_args("--interval", "-1")
    with pytest.raises(ConfigError, match=r"flag --interval: audit.interval must be > 0"):
        load_config(None, overrides_from_args(args))


# -- sd_notify and journald wire protocols ------------------------------------------------


@pytest.fixture
def dgram(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield sock, path
    sock.close()


def test_notify_without_socket_is_a_noop() -> None:
    n = Notifier(env={})
    assert not n.enabled and n.notify("READY=1") is False and n.watchdog_seconds is None


def test_raw_notify_reaches_the_socket(dgram: tuple[socket.socket, str]) -> None:
    sock, path = dgram
    n = Notifier(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}, use_library=False)
    assert n.notify("READY=1", "STATUS=hello world")
    assert sock.recv(4096) == b"READY=1\nSTATUS=hello world"
    assert n.watchdog_seconds == 2.0


def test_library_notify_reaches_the_socket(dgram: tuple[socket.socket, str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("systemd.daemon", reason="systemd-python not installed")
    sock, path = dgram
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    n = Notifier()
    assert n.notify("STATUS=via libsystemd")
    assert sock.recv(4096) == b"STATUS=via libsystemd"


def test_watchdog_for_another_pid_is_ignored() -> None:
    n = Notifier(env={"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert n.watchdog_seconds is None


def _decode_journal(data: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    while data:
        line, _sep, rest = data.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            data = rest
        else:  # binary-safe form: KEY\n<u64 LE length><value>\n
            (size,) = struct.unpack("<Q", rest[:8])
            fields[line.decode()] = rest[8 : 8 + size].decode()
            data = rest[8 + size + 1 :]
    return fields


def test_journal_protocol_encodes_multiline_values() -> None:
    raw = encode_journal_fields({"MESSAGE": "a\nb", "SOCKGUARD_KIND": "stale"})
    assert _decode_journal(raw) == {"MESSAGE": "a\nb", "SOCKGUARD_KIND": "stale"}


def test_journald_handler_sends_structured_fields(dgram: tuple[socket.socket, str]) -> None:
    sock, path = dgram
    sender = NativeJournalSender(path)
    handler = JournaldHandler(sender)
    logger = logging.getLogger("sockguard.test-journal")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("stale entry %s", "x", extra={
            "SOCKGUARD_MAP_ID": 7, "SOCKGUARD_KIND": "stale", "SOCKGUARD_KEY": "0a0b",
            "SOCKGUARD_TUPLE": "10.0.0.1:1 -> 10.0.0.2:2", "not_a_field": "dropped"})
        fields = _decode_journal(sock.recv(65536))
    finally:
        logger.removeHandler(handler)
        sender.close()
    assert fields["MESSAGE"] == "stale entry x"
    assert fields["PRIORITY"] == "4"
    assert fields["SYSLOG_IDENTIFIER"] == "sockguard"
    assert fields["SOCKGUARD_MAP_ID"] == "7"
    assert fields["SOCKGUARD_KIND"] == "stale"
    assert fields["SOCKGUARD_TUPLE"] == "10.0.0.1:1 -> 10.0.0.2:2"
    assert "not_a_field" not in fields and "NOT_A_FIELD" not in fields


# -- metrics ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_metrics_registry_is_dedicated_and_endpoint_is_get_only() -> None:
    from prometheus_client import REGISTRY

    m = Metrics()
    assert m.registry is not REGISTRY
    assert REGISTRY.get_sample_value("sockguard_audits_total") is None
    m.audits.inc()
    m.audit_failed("map_gone")
    m.configured(2.5, True)
    port = _free_port()
    server = start_server(m, "127.0.0.1", port)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        text = body.decode()
        assert "sockguard_audits_total 1.0" in text
        assert 'sockguard_audit_failures_total{reason="map_gone"} 1.0' in text
        assert 'sockguard_audit_failures_total{reason="permission"} 0.0' in text
        assert "sockguard_audit_interval_seconds 2.5" in text
        assert "sockguard_remediation_enabled 1.0" in text
        assert 'sockguard_build_info{' in text
        for method in ("POST", "PUT", "DELETE"):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", data=b"x",
                                         method=method)
            with pytest.raises(urllib.error.HTTPError) as exc:
                urllib.request.urlopen(req, timeout=5)
            assert exc.value.code == 405
    finally:
        server.shutdown()
        server.server_close()


def test_unknown_failure_reason_is_bounded() -> None:
    m = Metrics()
    m.audit_failed("something new")
    assert m.registry.get_sample_value("sockguard_audit_failures_total",
                                       {"reason": "internal"}) == 1.0


def test_refusal_reasons_are_bounded_labels_of_remediations_refusals() -> None:
    """The ``reason`` label of sockguard_deletions_refused_total, from remediation's refusal
    (decided with its outcome; tests/test_refusals.py drives each decision)."""
    from sockguard.core.layout import CILIUM, decode
    from sockguard.core.model import Finding, Kind, MapEntry, MapInfo
    from sockguard.kernel.remediation import Deletion, Refusal
    from sockguard.service.metrics import REFUSAL_REASONS, refusal_reason

    raw = bytes.fromhex("0a0a8630" + "00" * 12 + "0a0a65f9" + "00" * 12
                        + "01000000" + "1f900000" + "db780000")  # the README's worked key example
    info = MapInfo(1, "cilium_sock_ops", "sockhash", 44, 4, 65535)
    f = Finding(Kind.STALE, info, MapEntry(raw.hex(), decode(CILIUM, raw)), "why")
    cases = {
        ("gone", "gone: the key is no longer in the map"): "gone",
        ("skipped-cap", "--max-deletes 3 reached"): "cap_reached",
        ("refused", "refused: the entry now points to socket 5, re-inserted since the audit"):
            "reinserted",
        ("refused", "refused: L7 proxy entries are reported, not deleted"): "proxy_entry",
        ("refused", "refused: a live socket owns 1 -> 2 now (netns host)"): "live_owner",
        ("refused", "refused: the entry now belongs to its live owner"): "owner_matches",
        ("refused", "refused: recvpath entries are deleted only with --delete-unproven "
                    "(remediation.delete_unproven)"): "unproven",
        ("refused", "refused: no live socket owns 1 -> 2 now; the next audit judges the "
                    "entry again"): "no_owner",
    }
    for (outcome, reason), label in cases.items():
        d = Deletion.refused(f, Refusal(label), reason)
        assert d.outcome == outcome
        assert refusal_reason(d) == label
        assert label in REFUSAL_REASONS
    assert refusal_reason(Deletion(f, "refused", "refused: something new")) == "other"
    assert "other" in REFUSAL_REASONS

"""sockguard.service under systemd as PID 1 (run by ``tests/vm/run --systemd`` in the guest).

A oneshot unit runs this script after basic.target.  It installs sockguard the
way an operator does on a Debian node: ``dpkg -i`` of the package that
``tests/vm/run --systemd`` built from this tree (packaging/debian/build-deb),
the conffile /etc/sockguard/sockguard.toml edited, ``systemctl enable``.  One
drop-in holds what the VM needs: the documented SOCKGUARD_TEST_BLOCK_FILE hook
and a shorter WatchdogSec so the watchdog check takes seconds, not minutes;
ExecStart stays the package's (/opt/sockguard/.venv).  Then it asserts, with
systemctl, journalctl and dpkg only:

0. package_install, package_enable: dpkg -i succeeds, the unit is the
   package's, ``systemctl enable`` works;
1. ready_gating: while the first audit is held (block file), the unit stays
   ``activating``; it turns ``active`` only after the daemon logged READY;
2. status_line: ``systemctl status`` shows the daemon's STATUS= line;
3. journal_stale: ``journalctl -u sockguard SOCKGUARD_KIND=stale -o json`` holds
   the injected stale key with its structured fields;
4. watchdog_restart: a hung audit (block file again) stops the pings, systemd
   kills the unit for its watchdog and restarts it (NRestarts rises);
5. clean_stop: ``systemctl stop`` ends in ``inactive``, Result=success, exit 0;
6. conffile_kept: installing the package again keeps the operator's config;
7. purge: ``dpkg --purge`` leaves no /opt/sockguard, /etc/sockguard or unit.

The stale entry: a sockhash (Cilium's key layout, named cilium_sock_ops)
created with ``sockguard.kernel.libbpf``, pinned where the config's ``audit.maps``
points, holding one socket of a loopback pair under the key of a tuple no
socket owns.  Results: ``systemd.json`` (and ``journal.txt``) in the results
directory given as argv[1]; ``rc`` is 0 when every check passed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sockguard.kernel import libbpf  # noqa: E402
from tests.lab.keys import cilium_key  # noqa: E402

UNIT = "sockguard.service"
PIN_DIR = Path("/sys/fs/bpf/sockguard-vmtest")
PIN = PIN_DIR / "cilium_sock_ops"
BLOCK = Path("/run/sockguard-vmtest/block")
CONFIG = Path("/etc/sockguard/sockguard.toml")
UNIT_DIR = Path("/etc/systemd/system")
#: What the package installs (packaging/debian/build-deb).
PACKAGED_UNIT = Path("/lib/systemd/system") / UNIT
PACKAGED_SOCKGUARD = Path("/opt/sockguard/.venv/bin/sockguard")
#: The results share, where tests/vm/run left the package.
RESULTS = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/vmresults")
WATCHDOG_SEC = 20  # the drop-in's; the packaged unit says 60 s
#: Facts for systemd.json besides the checks (filled as they are learnt).
INFO: dict[str, object] = {}
#: The stale key's tuple: 10.254.0.1:8080 <- 10.254.0.2:40000, a socket nobody has.
STALE = ("10.254.0.1", 8080, "10.254.0.2", 40000)


def sh(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def show(*props: str) -> dict[str, str]:
    out = sh("systemctl", "show", UNIT, "-p", ",".join(props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait(pred: Callable[[], bool], timeout: float, step: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def journal(*match: str, grep: str = "") -> list[dict[str, object]]:
    """The unit's journal entries (matches as journalctl takes them), MESSAGE containing grep."""
    out = sh("journalctl", "-u", UNIT, *match, "-o", "json", "--no-pager").stdout
    entries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [e for e in entries if grep in str(e.get("MESSAGE", ""))]


class Abort(Exception):
    """A check failed in a way that makes the later ones meaningless."""


class Checks:
    def __init__(self, results: Path) -> None:
        self.results = results
        self.items: list[dict[str, object]] = []
        self.info = INFO

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.items.append({"name": name, "ok": bool(ok), "detail": detail})
        print(f"vmcheck: {'ok' if ok else 'FAIL'} {name}: {detail}", flush=True)

    def write(self, error: str | None = None) -> None:
        doc = {"kernel": os.uname().release, "checks": self.items, "info": self.info,
               "error": error}
        (self.results / "systemd.json").write_text(json.dumps(doc, indent=2) + "\n")
        ok = not error and self.items and all(c["ok"] for c in self.items)
        (self.results / "rc").write_text("0\n" if ok else "1\n")


# -- set-up ------------------------------------------------------------------------------


def package() -> Path:
    """The .deb tests/vm/run built into the results share."""
    debs = sorted((RESULTS / "deb").glob("sockguard_*.deb"))
    if not debs:
        raise Abort(f"no package in {RESULTS / 'deb'}: tests/vm/run builds it")
    return debs[-1]


def install(c: Checks) -> None:
    """What an operator does with the package: dpkg -i, edit the conffile, enable.

    The .deb is the one ``tests/vm/run --systemd`` built from this tree
    (packaging/debian/build-deb) into the results share.  The only drop-in is
    the VM's: the documented SOCKGUARD_TEST_BLOCK_FILE hook and a shorter
    WatchdogSec; ExecStart stays the package's /opt/sockguard venv.
    """
    deb = package()
    INFO["package"] = deb.name
    r = sh("dpkg", "-i", str(deb), timeout=300)
    status = sh("dpkg-query", "-W", "-f", "${Status} ${Version}", "sockguard").stdout
    unit_path = show("FragmentPath").get("FragmentPath", "")
    ok = (r.returncode == 0 and status.startswith("install ok installed")
          and PACKAGED_SOCKGUARD.is_file() and CONFIG.is_file()
          and unit_path == str(PACKAGED_UNIT))
    c.add("package_install", ok, f"dpkg -i rc {r.returncode}; {status}; unit {unit_path}; "
                                 f"{PACKAGED_SOCKGUARD} present: {PACKAGED_SOCKGUARD.is_file()}"
                                 f"{'; ' + r.stderr.strip()[-500:] if r.returncode else ''}")
    if not ok:
        raise Abort("the package did not install")
    text = CONFIG.read_text()
    text = text.replace("\ninterval = 10.0\n", "\ninterval = 2.0\n", 1)
    text = text.replace("\nmaps = []\n", f'\nmaps = ["{PIN}"]\n', 1)
    assert f'maps = ["{PIN}"]' in text and "interval = 2.0" in text, "config template changed"
    CONFIG.write_text(text)
    dropin = UNIT_DIR / f"{UNIT}.d"
    dropin.mkdir(parents=True, exist_ok=True)
    lines = [
        "[Service]",
        f"Environment=SOCKGUARD_TEST_BLOCK_FILE={BLOCK}",
        f"WatchdogSec={WATCHDOG_SEC}s",
    ]
    INFO["dropin"] = lines
    (dropin / "vmtest.conf").write_text("\n".join(lines) + "\n")
    BLOCK.parent.mkdir(parents=True, exist_ok=True)
    r = sh("systemctl", "daemon-reload")
    assert r.returncode == 0, r.stderr
    r = sh("systemctl", "enable", UNIT)
    enabled = sh("systemctl", "is-enabled", UNIT).stdout.strip()
    c.add("package_enable", r.returncode == 0 and enabled == "enabled",
          f"systemctl enable rc {r.returncode}; is-enabled: {enabled}")


def conffile_kept(c: Checks) -> None:
    """Reinstalling the package (an upgrade's path through dpkg) keeps the edited config."""
    edited = CONFIG.read_text()
    r = sh("dpkg", "-i", str(package()), timeout=300)
    kept = CONFIG.read_text() == edited
    c.add("conffile_kept", r.returncode == 0 and kept,
          f"dpkg -i again rc {r.returncode}; operator's edits kept: {kept}")


def purge(c: Checks) -> None:
    """dpkg --purge stops and disables the unit and removes everything the package put."""
    r = sh("dpkg", "--purge", "sockguard", timeout=300)
    left = [str(p) for p in (PACKAGED_SOCKGUARD.parents[2], CONFIG.parent, PACKAGED_UNIT)
            if p.exists()]
    active = sh("systemctl", "is-active", UNIT).stdout.strip()
    c.add("purge", r.returncode == 0 and not left and active != "active",
          f"dpkg --purge rc {r.returncode}; left behind: {left or 'nothing'}; unit {active}"
          f"{'; ' + (r.stdout + r.stderr).strip()[-800:] if r.returncode else ''}")


def stale_entry() -> tuple[int, list[socket.socket], bytes]:
    """A pinned sockhash holding one loopback socket under a key no socket owns."""
    fd = libbpf.map_create(libbpf.BPF_MAP_TYPE_SOCKHASH, "cilium_sock_ops", 44, 4, 65535)
    PIN_DIR.mkdir(parents=True, exist_ok=True)
    libbpf.obj_pin(fd, str(PIN))
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    a = socket.create_connection(lst.getsockname())
    b, _ = lst.accept()
    lst.close()
    key = cilium_key(*STALE)
    libbpf.map_update(fd, key, struct.pack("i", a.fileno()), libbpf.BPF_NOEXIST)
    return fd, [a, b], key


# -- the checks ----------------------------------------------------------------------------


def ready_gating(c: Checks) -> None:
    BLOCK.touch()
    t0 = time.monotonic()
    r = sh("systemctl", "start", "--no-block", UNIT)
    assert r.returncode == 0, r.stderr
    # Until the daemon holds its first audit at the hook it may still be importing.
    def held_or_failed() -> bool:
        st = show("ActiveState", "NRestarts")
        return (bool(journal(grep="test hook: audit blocked")) or st["ActiveState"] == "failed"
                or int(st["NRestarts"] or 0) > 0)

    wait(held_or_failed, 120)
    held = bool(journal(grep="test hook: audit blocked"))
    if not held:
        BLOCK.unlink()
        tail = sh("journalctl", "-u", UNIT, "-n", "40", "--no-pager").stdout
        st = show("ActiveState", "Result", "NRestarts", "ExecMainStatus", "StatusText")
        c.add("ready_gating", False, f"the daemon never reached its first audit: {st}\n{tail}")
        raise Abort("sockguard.service does not start")
    states = []
    for _ in range(12):  # 3 s with the first audit held: never active
        states.append(show("ActiveState")["ActiveState"])
        time.sleep(0.25)
    during = show("ActiveState", "SubState", "StatusText")
    released_us = time.monotonic_ns() // 1000  # CLOCK_MONOTONIC, as systemd's timestamps
    BLOCK.unlink()
    active = wait(lambda: show("ActiveState")["ActiveState"] == "active", 120)
    after = show("ActiveState", "ActiveEnterTimestampMonotonic", "StatusText", "MainPID")
    # The daemon logs "audit: ..." right before it sends READY=1 and "ready: ..." after.
    # Journal timestamps are journald's reception times (milliseconds late under TCG),
    # so the order is shown by our own clock: active only after the hook was released.
    audit = [e for e in journal(grep="audit: ") if str(e.get("MESSAGE")).startswith("audit: ")]
    audit_us = int(str(audit[0]["__MONOTONIC_TIMESTAMP"])) if audit else None
    ready = journal(grep="ready: first audit done")
    enter_us = int(after.get("ActiveEnterTimestampMonotonic") or 0)
    ok = (held and set(states) == {"activating"} and active and audit_us is not None
          and enter_us >= released_us and bool(ready))
    c.info["start_seconds"] = round(time.monotonic() - t0, 1)
    c.add("ready_gating", ok,
          f"first audit held: {held}; states while held: {sorted(set(states))} "
          f"(StatusText {during.get('StatusText')!r}); active after release: {active}; "
          f"monotonic us: hook released {released_us}, ActiveEnter {enter_us} (first audit "
          f"received by journald {audit_us}); 'ready: first audit done' logged: {bool(ready)}")


def status_line(c: Checks) -> None:
    def has_stale() -> bool:
        return "1 stale" in show("StatusText")["StatusText"]

    wait(has_stale, 30)
    out = sh("systemctl", "status", UNIT, "--no-pager", "-n", "0").stdout
    line = next((ln.strip() for ln in out.splitlines() if ln.strip().startswith("Status:")), "")
    c.info["systemctl_status"] = out
    c.add("status_line", "1 maps" in line and "1 stale" in line, line or out[:300])


def journal_stale(c: Checks, key: bytes) -> None:
    found: list[dict[str, object]] = []

    def seen() -> bool:
        found[:] = [e for e in journal("SOCKGUARD_KIND=stale")
                    if str(e.get("SOCKGUARD_KEY", "")).lower() == key.hex()]
        return bool(found)

    ok = wait(seen, 30)
    fields = {k: v for k, v in (found[0] if found else {}).items() if k.startswith("SOCKGUARD_")}
    c.info["stale_entry_fields"] = fields
    c.add("journal_stale", ok and fields.get("SOCKGUARD_MAP_NAME") == "cilium_sock_ops",
          f"{len(found)} entries for key {key.hex()[:16]}...; fields {fields}")


def watchdog_restart(c: Checks) -> None:
    before = show("NRestarts", "MainPID")
    t0 = time.monotonic()
    BLOCK.touch()

    def restarted() -> bool:
        now = show("NRestarts", "MainPID")
        return int(now["NRestarts"]) > int(before["NRestarts"])

    ok = wait(restarted, WATCHDOG_SEC * 3 + 30)
    killed_after = round(time.monotonic() - t0, 1)
    BLOCK.unlink()  # the restarted daemon may come up now
    back = wait(lambda: show("ActiveState")["ActiveState"] == "active", 120)
    after = show("NRestarts", "MainPID", "ActiveState")
    msgs = [str(e.get("MESSAGE")) for e in journal(grep="atchdog")]
    timeout_logged = any("Watchdog timeout" in m for m in msgs)
    c.add("watchdog_restart", ok and back and timeout_logged
          and after["MainPID"] != before["MainPID"],
          f"NRestarts {before['NRestarts']} -> {after['NRestarts']} {killed_after} s after "
          f"the audit hung (WatchdogSec={WATCHDOG_SEC}); MainPID {before['MainPID']} -> "
          f"{after['MainPID']}; active again: {back}; systemd said: "
          f"{[m for m in msgs if 'timeout' in m.lower()][:2]}")


def clean_stop(c: Checks) -> None:
    t0 = time.monotonic()
    r = sh("systemctl", "stop", UNIT, timeout=60)
    took = round(time.monotonic() - t0, 1)
    st = show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    stopped = [e for e in journal(grep="stopped") if e.get("MESSAGE") == "stopped"]
    ok = (r.returncode == 0 and st["ActiveState"] == "inactive" and st["Result"] == "success"
          and st["ExecMainStatus"] == "0")
    c.add("clean_stop", ok, f"systemctl stop rc {r.returncode} in {took} s; {st}; "
                            f"daemon logged 'stopped': {bool(stopped)}")


def doctor_in_sandbox(c: Checks, key: str = "doctor_in_unit",
                      extra: tuple[str, ...] = ()) -> None:
    """Not a check: ``sockguard doctor --json`` under the unit's own sandbox.

    A copy of sockguard.service as a oneshot (same hardening, same drop-in
    adjustments) shows what the tracer may do inside it: the capability probe's
    answers, e.g. whether /proc/kallsyms shows addresses with the unit's
    CapabilityBoundingSet.  ``extra`` lines are added to the drop-in (to try a
    change of the unit before proposing it).
    """
    name = f"sockguard-{key.replace('_', '-')}.service"
    shutil.copy(PACKAGED_UNIT, UNIT_DIR / name)
    dropin = UNIT_DIR / f"{name}.d"
    dropin.mkdir(exist_ok=True)
    lines = [ln for ln in INFO.get("dropin", []) if isinstance(ln, str)
             and not ln.startswith(("ExecStart", "Environment", "WatchdogSec"))]
    lines += ["Type=oneshot", "Restart=no", "WatchdogSec=0", "ExecStart=",
              f"ExecStart={PACKAGED_SOCKGUARD} doctor --json", "StandardOutput=journal",
              "ExecStartPre=/bin/sh -c 'grep ^Cap /proc/self/status; head -n 2 /proc/kallsyms'",
              *extra]
    (dropin / "vmtest.conf").write_text("\n".join(lines) + "\n")
    sh("systemctl", "daemon-reload")
    r = sh("systemctl", "start", name, timeout=300)
    out = sh("journalctl", "-u", name, "-o", "cat", "--no-pager").stdout
    start = out.find("{")
    try:
        doc = json.loads(out[start:out.rfind("}") + 1])
    except ValueError:
        INFO[key] = {"rc": r.returncode, "output": out[-2000:]}
        return
    feats = doc.get("features", {})
    dets = doc.get("detections", {})
    INFO[key] = {
        "extra": list(extra),
        "sandbox": out[:start].strip().splitlines(),
        "features": {k: feats[k] for k in ("kallsyms", "kprobe", "fentry", "tp_btf", "raw_tp",
                                           "iter_sockmap", "iter_tcp") if k in feats},
        "detections": {k: {"active": v.get("active"), "via": v.get("via"),
                           "reason": v.get("reason")} for k, v in dets.items()},
    }


def main(results: Path) -> int:
    c = Checks(results)
    (results / "kernel").write_text(os.uname().release + "\n")
    error = None
    try:
        install(c)
        _fd, _socks, key = stale_entry()
        ready_gating(c)
        status_line(c)
        journal_stale(c, key)
        tracer = journal("SOCKGUARD_TRACER=started")
        c.info["tracer"] = [str(e.get("MESSAGE")) for e in tracer[:1]]
        watchdog_restart(c)
        clean_stop(c)
        doctor_in_sandbox(c)
        # The changes the first doctor's answers point to: kprobes attach with
        # perf_event_open, which @system-service does not allow; kallsyms addresses
        # need CAP_SYSLOG (kptr_restrict 0 with Debian's perf_event_paranoid 3), and
        # ProtectKernelTunables=yes makes /proc/kallsyms an inaccessible empty file.
        # Whether ProtectKernelLogs=yes (which drops CAP_SYSLOG) must go too: both ways.
        for name in ("kptr_restrict", "perf_event_paranoid"):
            INFO[name] = Path(f"/proc/sys/kernel/{name}").read_text().strip()
        proposed = ("SystemCallFilter=perf_event_open", "CapabilityBoundingSet=CAP_SYSLOG",
                    "ProtectKernelTunables=no")
        doctor_in_sandbox(c, "doctor_in_unit_proposed", proposed)
        doctor_in_sandbox(c, "doctor_in_unit_proposed_logs", (*proposed, "ProtectKernelLogs=no"))
        conffile_kept(c)
        purge(c)
    except Abort as exc:
        error = str(exc)
    except Exception:
        error = traceback.format_exc()
        print(error, flush=True)
    finally:
        (results / "journal.txt").write_text(
            sh("journalctl", "-b", "-o", "short-monotonic", "--no-pager").stdout)
        c.write(error)
        PIN.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/vmresults")))

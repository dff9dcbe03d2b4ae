"""The shipped systemd unit and Prometheus rules are valid, as their own tools judge them.

``systemd-analyze verify`` checks that ExecStart exists, so the unit is verified
as a copy whose ExecStart points at this tree's venv; everything else is the
shipped text.  ``promtool test rules`` runs the unit tests of every alert.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from tests.conftest import entry_source_skip_reason
from tests.lab import Lab

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "sockguard.service"
RULES = ROOT / "packaging" / "prometheus" / "sockguard.rules.yml"
RULE_TESTS = ROOT / "packaging" / "prometheus" / "sockguard.rules.test.yml"
INSTALLED = "/opt/sockguard/.venv/bin/sockguard"
VENV_SOCKGUARD = ROOT / ".venv" / "bin" / "sockguard"


def _unit_lines() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed")
    if not VENV_SOCKGUARD.exists():
        pytest.skip(f"{VENV_SOCKGUARD} missing (make venv)")
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED} run --config /etc/sockguard/sockguard.toml" in text
    copy = tmp_path / "sockguard.service"
    copy.write_text(text.replace(INSTALLED, str(VENV_SOCKGUARD)))
    proc = subprocess.run([tool, "verify", str(copy)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "sockguard.service" not in proc.stderr, proc.stderr  # no warnings about our unit


def test_unit_is_a_watchdogged_notify_service_with_least_privilege() -> None:
    unit = _unit_lines()
    assert unit["Type"] == ["notify"]
    assert unit["Restart"] == ["on-failure"]
    assert re.fullmatch(r"\d+s", unit["WatchdogSec"][0])
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    caps = unit["CapabilityBoundingSet"][0].split()
    assert sorted(caps) == ["CAP_DAC_READ_SEARCH", "CAP_SYSLOG", "CAP_SYS_ADMIN",
                            "CAP_SYS_PTRACE"]
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]
    assert "ReadWritePaths" not in unit  # nothing is written, bpffs included
    assert unit["RestrictNamespaces"] == ["net"]
    # Every capability is explained in a comment.
    text = UNIT.read_text()
    for cap in caps:
        assert f"# {cap}:" in text, f"{cap} is not explained"


def test_promtool_rule_unit_tests() -> None:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool not installed (apt-get install prometheus; make system-deps)")
    check = subprocess.run([tool, "check", "rules", str(RULES)], capture_output=True,
                           text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.run([tool, "test", "rules", str(RULE_TESTS)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_firing_and_silent_rule_tests() -> None:
    """Each alert appears in the tests with an expected alert and with ``exp_alerts: []``."""
    alerts = re.findall(r"^\s*- alert: (\w+)", RULES.read_text(), re.M)
    assert len(alerts) >= 6
    tests = RULE_TESTS.read_text()
    blocks = re.split(r"\n\s*- eval_time:", tests)
    for alert in alerts:
        mine = [b for b in blocks if re.search(rf"alertname: {alert}\n", b)]
        fires = [b for b in mine if "exp_labels" in b]
        silent = [b for b in mine if "exp_alerts: []" in b]
        assert fires, f"{alert}: no test where it fires"
        assert silent, f"{alert}: no test where it stays silent"


def test_unit_bounds_fds_and_keeps_sys_and_proc_sys_read_only() -> None:
    unit = _unit_lines()
    nofile = int(unit["LimitNOFILE"][0])
    assert 1024 < nofile <= 65536  # above systemd's default 1024 soft limit, still bounded
    ro = " ".join(unit["ReadOnlyPaths"]).split()
    assert {"/sys", "/proc/sys", "/proc/sysrq-trigger"} <= set(ro)
    # ProtectKernelTunables=no is what makes these needed (see the unit's comment).
    assert unit["ProtectKernelTunables"] == ["no"]


def test_documented_exposure_is_the_measured_one() -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed")
    proc = subprocess.run([tool, "security", "--offline=true", str(UNIT)], capture_output=True,
                          text=True, timeout=60, check=False)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    readme = (ROOT / "packaging" / "README.md").read_text()
    assert f"rates the\nunit **{found.group(1)} " in readme, \
        f"packaging/README.md does not state the measured exposure {found.group(1)}"


def _built_wheel(out: Path) -> Path:
    """This tree as a wheel, built the way `pip wheel .` builds it (clang compiles bpf/)."""
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "pip", "wheel", str(ROOT),
                           "--no-deps", "-q", "-w", str(out)], capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = out.glob("sockguard-*.whl")
    return wheel


@pytest.mark.kernel
def test_wheel_carries_the_bpf_objects_and_runs_where_clang_is_absent(
        tmp_path: Path, lab: Lab) -> None:
    """`pip install sockguard-*.whl` on a node without clang: nothing is compiled there,
    the prebuilt objects load, and the audit reads the lab's map through them."""
    wheel = _built_wheel(tmp_path / "dist")
    shipped = {n.rsplit("/", 1)[1] for n in zipfile.ZipFile(wheel).namelist()
               if n.startswith("sockguard/bpf/") and n.endswith(".bpf.o")}
    sources = {p.name.replace(".bpf.c", ".bpf.o") for p in (ROOT / "bpf").glob("*.bpf.c")}
    assert shipped == sources

    venv = tmp_path / "node"
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True, timeout=120)
    # A PATH with the node's tools but no compiler: only ip, ss and bpftool.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("ip", "ss", "bpftool"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    env = {"PATH": f"{venv / 'bin'}:{bin_dir}", "HOME": str(tmp_path)}
    assert shutil.which("clang", path=env["PATH"]) is None
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)],
                             capture_output=True, text=True, timeout=600, env=env, check=False)
    assert install.returncode == 0, install.stderr[-2000:]
    installed = list((venv / "lib").glob("python3*/site-packages/sockguard/bpf/*.bpf.o"))
    assert {p.name for p in installed} == sources

    audit = subprocess.run([str(venv / "bin" / "sockguard"), "audit", "--map", str(lab.pin_path),
                            "--json"], capture_output=True, text=True, timeout=120, env=env,
                           check=False)
    assert audit.returncode in (0, 1), audit.stderr
    doc = json.loads(audit.stdout)
    exact = [s for s in ("iterator", "tc_lookup") if entry_source_skip_reason(s) is None]
    if exact:  # a BPF object from the wheel read the map
        assert doc["maps"][0]["source"] == exact[0], doc["maps"][0]
    assert doc["entry_source"]["name"] == doc["maps"][0]["source"]


@pytest.mark.kernel
def test_debian_package_is_self_contained_and_audits_from_its_venv(
        tmp_path: Path, lab: Lab) -> None:
    """packaging/debian/build-deb: the unit, the bpffs mount, the config as a conffile, a
    venv under /opt/sockguard naming no build path; its sockguard audits a lab map."""
    for tool in ("dpkg-deb", "fakeroot"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    build = subprocess.run([str(ROOT / "packaging" / "debian" / "build-deb"),
                            str(tmp_path / "out")], capture_output=True, text=True,
                           timeout=900, check=False)
    assert build.returncode == 0, build.stderr[-3000:]
    deb = Path(build.stdout.strip().splitlines()[-1])

    def field(name: str) -> str:
        return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True,
                              text=True, check=True).stdout.strip()

    assert field("Package") == "sockguard"
    assert "libbpf1" in field("Depends") and "python3 (>= 3.11)" in field("Depends")
    control = tmp_path / "control"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    assert (control / "conffiles").read_text().split() == ["/etc/sockguard/sockguard.toml"]
    assert "rm -rf /etc/sockguard" in (control / "postrm").read_text()  # purge only

    root = tmp_path / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    assert (root / "etc/sockguard/sockguard.toml").read_text() == (
        ROOT / "packaging" / "sockguard.toml").read_text()
    assert (root / "lib/systemd/system/sockguard.service").read_text() == UNIT.read_text()
    assert (root / "lib/systemd/system/sys-fs-bpf.mount").is_file()
    venv = root / "opt/sockguard/.venv"
    assert (venv / "bin/sockguard").read_text().startswith("#!/opt/sockguard/.venv/bin/python")
    objects = {p.name for p in venv.glob("lib/python3*/site-packages/sockguard/bpf/*.bpf.o")}
    assert objects == {p.name.replace(".bpf.c", ".bpf.o") for p in (ROOT / "bpf").glob("*.bpf.c")}
    leaks = subprocess.run(["grep", "-rl", "--", str(tmp_path), str(root)], capture_output=True,
                           text=True, check=False).stdout
    assert leaks == "", f"build paths inside the package: {leaks[:500]}"

    # Unpacked elsewhere the venv still works: python finds it by its pyvenv.cfg.
    audit = subprocess.run([str(venv / "bin/python3"), "-m", "sockguard", "audit", "--map",
                            str(lab.pin_path), "--json"], capture_output=True, text=True,
                           timeout=120, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                           check=False)
    assert audit.returncode in (0, 1), audit.stderr
    doc = json.loads(audit.stdout)
    exact = [s for s in ("iterator", "tc_lookup") if entry_source_skip_reason(s) is None]
    if exact:
        assert doc["maps"][0]["source"] == exact[0]

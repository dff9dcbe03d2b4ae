"""Bad input gets one clear line on stderr and exit status 2, never a traceback.

Real kernel objects: maps created and pinned for the test, a real unprivileged
user, a real network namespace deleted under the scanner.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from sockguard.kernel import libbpf
from sockguard.kernel.netns import enumerate_netns
from sockguard.kernel.sockets import scan_all

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("bpf_kernel")]

MakeMap = Callable[..., int]


def sockguard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sockguard", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def assert_error(proc: subprocess.CompletedProcess[str], message: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sockguard: "), proc.stderr
    assert message in lines[0], lines[0]


@pytest.mark.parametrize("command", ["maps", "audit", "clean"])
def test_unknown_map_name(command: str) -> None:
    assert_error(sockguard(command, "--map", "no_such_map_x"), "no map named no_such_map_x")


def test_unknown_map_id() -> None:
    assert_error(sockguard("audit", "--map", "id:999999999"), "no map with id 999999999")


def test_malformed_map_id() -> None:
    proc = sockguard("audit", "--map", "id:abc")
    assert_error(proc, "bad map id 'abc': expected id:N")


def test_missing_pin(bpffs_dir: Path) -> None:
    assert_error(sockguard("audit", "--map", str(bpffs_dir / "nothing")), "no such pinned map")


def test_pin_path_outside_bpffs(tmp_path: Path) -> None:
    assert_error(sockguard("audit", "--map", str(tmp_path / "cilium_sock_ops")),
                 "is not on a bpf filesystem; is bpffs mounted?")


def test_wrong_key_size(make_map: MakeMap, bpffs_dir: Path) -> None:
    fd = make_map(libbpf.BPF_MAP_TYPE_SOCKHASH, 8, 4, 16, name="sg_small_key")
    pin = bpffs_dir / "small"
    libbpf.obj_pin(fd, str(pin))
    assert_error(sockguard("audit", "--map", str(pin)), "8-byte keys; layout cilium needs 44")
    assert_error(sockguard("clean", "--apply", "--map", str(pin)), "8-byte keys")


def test_not_a_sockhash(make_map: MakeMap, bpffs_dir: Path) -> None:
    fd = make_map(1, 44, 4, 16, name="sg_plain_hash")  # BPF_MAP_TYPE_HASH
    pin = bpffs_dir / "plain"
    libbpf.obj_pin(fd, str(pin))
    libbpf.map_update(fd, b"\1" * 44, struct.pack("i", 7))
    assert_error(sockguard("audit", "--map", str(pin)), "not a sockhash or sockmap")
    assert_error(sockguard("clean", "--apply", "--map", str(pin)), "not a sockhash or sockmap")
    assert libbpf.map_lookup(fd, b"\1" * 44, 4) == struct.pack("i", 7)  # untouched


def test_without_capabilities(make_map: MakeMap, bpffs_dir: Path) -> None:
    """Root without capabilities (a container's root): a clear error, no traceback."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    fd = make_map(libbpf.BPF_MAP_TYPE_SOCKHASH, 44, 4, 16, name="sg_perm")
    pin = bpffs_dir / "perm"
    libbpf.obj_pin(fd, str(pin))
    drop = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"]
    for args in (["audit", "--map", str(pin)], ["clean", "--apply"], ["maps"]):
        proc = subprocess.run([*drop, sys.executable, "-m", "sockguard", *args],
                              capture_output=True, text=True, timeout=60, check=False)
        assert_error(proc, "needs root (CAP_SYS_ADMIN; CAP_BPF alone is not enough)")


def test_bad_flag_values() -> None:
    assert_error(sockguard("clean", "--max-deletes", "-1"), "must be >= 0")
    assert_error(sockguard("audit", "--proxy-ip", "not-an-ip"), "not an IP address")


@pytest.mark.parametrize(("args", "message"), [
    # audit/clean: a confirming look of inf/nan/1e308 s crashed or hung every run
    (["audit", "--confirm-delay", "inf"], "--confirm-delay: must be >= 0 and <= 60"),
    (["audit", "--confirm-delay", "nan"], "--confirm-delay: must be >= 0 and <= 60"),
    (["clean", "--confirm-delay", "1e308"], "--confirm-delay: must be >= 0 and <= 60"),
    (["clean", "--confirm-delay", "-1"], "--confirm-delay: must be >= 0 and <= 60"),
    (["audit", "--confirm-delay", "soon"], "--confirm-delay: expected a number, got 'soon'"),
    (["clean", "--max-deletes", "abc"], "--max-deletes: expected an integer, got 'abc'"),
    (["trace", "--duration", "inf"], "--duration: must be >= 0 and <= 604800"),
    # run's flags go through the configuration's checks
    (["run", "--interval", "inf"], "flag --interval: audit.interval must be > 0 and <= 86400"),
    (["run", "--interval", "nan"], "flag --interval: audit.interval must be > 0 and <= 86400"),
    (["run", "--interval", "1e308"], "audit.interval must be > 0 and <= 86400"),
    (["run", "--interval", "0"], "audit.interval must be > 0 and <= 86400"),
    (["run", "--confirm-delay", "inf"], "audit.confirm_delay must be >= 0 and <= 60"),
    (["run", "--confirm-delay", "nan"], "audit.confirm_delay must be >= 0 and <= 60"),
    (["run", "--confirm-delay", "1e308"], "audit.confirm_delay must be >= 0 and <= 60"),
    (["run", "--max-deletes", "many"], "--max-deletes: expected an integer, got 'many'"),
    (["run", "--metrics-port", "x"], "--metrics-port: expected an integer, got 'x'"),
])
def test_bad_numbers_are_one_line_errors(args: list[str], message: str) -> None:
    proc = sockguard(*args)
    assert_error(proc, message)
    assert "_nonneg" not in proc.stderr and "usage:" not in proc.stderr


@pytest.mark.parametrize(("text", "message"), [
    ("[audit]\ninterval = inf\n", "audit.interval must be > 0 and <= 86400"),
    ("[audit]\ninterval = nan\n", "audit.interval must be > 0 and <= 86400"),
    ("[audit]\ninterval = 1e308\n", "audit.interval must be > 0 and <= 86400"),
    ("[audit]\nconfirm_delay = inf\n", "audit.confirm_delay must be >= 0 and <= 60"),
    ("[audit]\nconfirm_delay = nan\n", "audit.confirm_delay must be >= 0 and <= 60"),
])
def test_bad_numbers_in_the_config_file_stop_run(tmp_path: Path, text: str,
                                                 message: str) -> None:
    config = tmp_path / "sockguard.toml"
    config.write_text(text)
    assert_error(sockguard("run", "--config", str(config)), message)


def test_trace_with_an_unknown_map_is_an_error(bpffs_dir: Path) -> None:
    assert_error(sockguard("trace", "--map", "no_such_map_x", "--duration", "1"),
                 "no map named no_such_map_x")
    assert_error(sockguard("trace", "--map", str(bpffs_dir / "nothing"), "--duration", "1"),
                 "no such pinned map")


def test_a_bpffs_directory_as_map_says_it_is_a_directory(bpffs_dir: Path) -> None:
    for command in ("audit", "clean", "maps", "trace"):
        proc = sockguard(command, "--map", str(bpffs_dir))
        assert_error(proc, f"{bpffs_dir} is a directory, not a pinned map")
        assert "Permission denied" not in proc.stderr


def test_a_bpffs_option_that_is_no_bpffs_is_named() -> None:
    assert_error(sockguard("audit", "--bpffs", "/etc", "--map", "no_such_map_x"),
                 "/etc is not a bpf filesystem")
    proc = sockguard("maps", "--bpffs", "/etc", "--discover-name", "sg_none_here")
    assert proc.returncode == 0
    assert "pinned under /etc" in proc.stdout and "/sys/fs/bpf" not in proc.stdout
    assert "/etc is not a bpf filesystem" in proc.stderr


def test_doctor_as_non_root_exits_0_and_says_what_it_could_not_probe() -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                           sys.executable, "-m", "sockguard", "doctor"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "not root" in proc.stderr and "detections" in proc.stdout


def test_no_maps_is_said_plainly(bpffs_dir: Path) -> None:
    proc = sockguard("audit", "--bpffs", str(bpffs_dir), "--discover-name", "sg_none_here")
    assert proc.returncode == 0, proc.stderr
    assert "no sockhash maps on this node" in proc.stdout + proc.stderr
    proc = sockguard("maps", "--bpffs", str(bpffs_dir), "--discover-name", "sg_none_here")
    assert proc.returncode == 0 and "no sockhash or sockmap maps found" in proc.stdout


def test_namespace_vanishing_mid_scan_is_skipped() -> None:
    name = f"sg-vanish-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        refs = enumerate_netns()
        assert any(r.path == f"/run/netns/{name}" for r in refs)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)
    scan = scan_all(refs)
    assert f"/run/netns/{name}" in scan.vanished
    assert scan.namespaces, "the other namespaces were still scanned"


def test_discovery_needs_no_dac_override(make_map: MakeMap, bpffs_dir: Path) -> None:
    """Pins of mode 0400 (like the kernel's maps.debug) open read-only for the scan."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    fd = make_map(libbpf.BPF_MAP_TYPE_SOCKHASH, 44, 4, 16, name="sg_ro_pin")
    pin = bpffs_dir / "ro"
    libbpf.obj_pin(fd, str(pin))
    pin.chmod(0o400)
    proc = subprocess.run(
        ["setpriv", "--bounding-set=-all,+sys_admin,+sys_ptrace,+dac_read_search",
         "--inh-caps=-all", "--", sys.executable, "-m", "sockguard", "maps",
         "--bpffs", str(bpffs_dir), "--discover-name", "sg_none_here", "--json"],
        capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert [m["path"] for m in json.loads(proc.stdout)["maps"]] == [str(pin)]

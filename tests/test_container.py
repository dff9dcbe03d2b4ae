"""The container image, built from Debian's archive and run as the DaemonSet runs it.

``packaging/container/build-image`` builds the image (mmdebstrap + podman, no
registry).  The image then runs under podman with the flags the DaemonSet's
manifest implies — read from ``packaging/kubernetes/30-daemonset.yaml``, not
restated here: host network and PID namespaces, all capabilities dropped but
the four it adds, no privilege escalation, a read-only root, the same host
mounts read-only — and audits the lab's map, in which it must find a stale
and a shadowing entry.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import entry_source_skip_reason
from tests.lab import Lab, cilium_key, recv_exact

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "packaging" / "container" / "build-image"
DAEMONSET = ROOT / "packaging" / "kubernetes" / "30-daemonset.yaml"
IMAGE = "localhost/sockguard:lab-test"
#: The unit's LimitNOFILE.  podman's default rlimits (nofile 1048576, nproc = the
#: caller's) are refused (EPERM) inside this machine kind's own sandbox, whose hard
#: limits are lower; a node's runtime sets its own.
ULIMITS = ["--ulimit", "nofile=2048:2048", "--ulimit", "nproc=4096:4096"]
#: Runtimes to try, in order: crun refuses hybrid cgroup hierarchies ("cgroups in
#: hybrid mode not supported") where cgroup2 still has a controller, runc does not.
RUNTIMES: tuple[tuple[str, ...], ...] = ((), ("--runtime", "runc"))
#: The containers' parent cgroup, ours to remove: podman's cgroupfs manager would
#: otherwise create ``libpod_parent`` in every hierarchy and leave it there.
CGROUP_PARENT = f"/sockguard-test-{secrets.token_hex(3)}"


def _container() -> dict[str, Any]:
    doc = yaml.safe_load(DAEMONSET.read_text())
    [container] = doc["spec"]["template"]["spec"]["containers"]
    return {"pod": doc["spec"]["template"]["spec"], "container": container}


def daemonset_flags() -> list[str]:
    """podman run flags for what the DaemonSet's pod spec asks of the runtime."""
    spec = _container()
    pod, ctr = spec["pod"], spec["container"]
    sec = ctr["securityContext"]
    flags: list[str] = []
    if pod.get("hostNetwork"):
        flags += ["--network", "host"]
    if pod.get("hostPID"):
        flags += ["--pid", "host"]
    flags += ["--user", str(sec["runAsUser"])]
    assert sec["capabilities"]["drop"] == ["ALL"]
    flags += ["--cap-drop", "all", "--cap-add", ",".join(sec["capabilities"]["add"])]
    if sec.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    if sec.get("readOnlyRootFilesystem"):
        flags.append("--read-only")
    assert not sec.get("privileged")
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in ctr["volumeMounts"]:
        vol = volumes[mount["name"]]
        if "hostPath" in vol:
            opts = ["ro" if mount.get("readOnly") else "rw"]
            if mount.get("mountPropagation") == "HostToContainer":
                opts.append("rslave")
            flags += ["-v", f"{vol['hostPath']['path']}:{mount['mountPath']}:{','.join(opts)}"]
        elif "emptyDir" in vol:
            flags += ["--tmpfs", mount["mountPath"]]
        # the ConfigMap: the image's default config stands in for it (the audit names its map)
    return flags


def missing_host_dirs() -> list[Path]:
    """The DaemonSet's DirectoryOrCreate host paths this machine lacks (kubelet would make
    them; the test makes them and removes them again)."""
    vols = _container()["pod"]["volumes"]
    return [Path(v["hostPath"]["path"]) for v in vols
            if v.get("hostPath", {}).get("type") == "DirectoryOrCreate"
            and not Path(v["hostPath"]["path"]).exists()]


def _skip_reason() -> str | None:
    for tool in ("podman", "mmdebstrap", "dpkg-deb", "fakeroot"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (make image, or make test-deps, installs it)"
    return None


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    build = subprocess.run([str(BUILD), IMAGE], capture_output=True, text=True, timeout=1200,
                           check=False)
    assert build.returncode == 0, build.stderr[-3000:]
    assert build.stdout.strip().splitlines()[-1] == IMAGE
    try:
        yield IMAGE
    finally:
        subprocess.run(["podman", "rmi", "-f", IMAGE], capture_output=True, check=False)


def _cgroup_mounts() -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[2] in ("cgroup", "cgroup2")]


def _remove_cgroup_parent() -> None:
    """rmdir CGROUP_PARENT, children first, in every hierarchy the runtime made it in."""
    for mount in _cgroup_mounts():
        top = mount + CGROUP_PARENT
        if not os.path.isdir(top):
            continue
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
            os.rmdir(dirpath)


@pytest.fixture(scope="module")
def run_flags(image: str) -> Iterator[list[str]]:
    """The DaemonSet's flags plus the runtime this machine can start containers with."""
    flags = [*daemonset_flags(), "--cgroup-parent", CGROUP_PARENT]
    errors = []
    made = missing_host_dirs()
    try:
        for path in made:
            path.mkdir()
        for runtime in RUNTIMES:
            args = ["podman", "run", "--rm", *runtime, *ULIMITS, *flags, image, "true"]
            r = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
            if r.returncode == 0:
                yield [*runtime, *ULIMITS, *flags]
                return
            errors.append(f"{' '.join(runtime) or 'default runtime'}: "
                          f"{r.stderr.strip()[-300:]}")
        pytest.skip("no container runtime can start a container here: " + "; ".join(errors))
    finally:
        _remove_cgroup_parent()
        for path in reversed(made):
            if path.exists():
                path.rmdir()


def podman_run(run_flags: list[str], *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", "run", "--rm", *run_flags, IMAGE, *cmd],
                          capture_output=True, text=True, timeout=300, check=False)


def test_image_has_no_compiler_and_runs_as_the_daemonset_says(
        run_flags: list[str]) -> None:
    inspect = subprocess.run(["podman", "image", "inspect", IMAGE], capture_output=True,
                             text=True, check=True)
    [info] = json.loads(inspect.stdout)
    assert info["Config"]["Cmd"][:2] == ["sockguard", "run"]
    assert info["Config"]["User"] in ("0", "root")
    probe = podman_run(run_flags, "sh", "-c",
                       "command -v clang gcc cc apt-get; grep ^CapEff /proc/self/status; "
                       "command -v sockguard")
    assert probe.returncode == 0, probe.stderr
    lines = probe.stdout.split()
    assert lines[-1] == "/opt/sockguard/.venv/bin/sockguard"
    assert not [w for w in lines if w.endswith(("/clang", "/gcc", "/cc", "/apt-get"))]
    cap_eff = int(lines[lines.index("CapEff:") + 1], 16)
    # CAP_DAC_READ_SEARCH 2, CAP_SYS_PTRACE 19, CAP_SYS_ADMIN 21, CAP_SYSLOG 34: no others
    assert cap_eff == (1 << 2) | (1 << 19) | (1 << 21) | (1 << 34), hex(cap_eff)


def test_image_finds_the_labs_stale_and_shadowing_entries(run_flags: list[str],
                                                          lab: Lab) -> None:
    server_pod, client_pod = lab.pods
    s_ip, c_ip = server_pod.addr(), client_pod.addr()
    listener = lab.listen(server_pod, port=8080)
    dummy, _ = lab.dummy_pair()
    other, _ = lab.dummy_pair()
    future = cilium_key(s_ip, 8080, c_ip, 40000)  # the incident: a key for a coming connection
    lab.inject(future, dummy)
    left = cilium_key(s_ip, 9090, c_ip, 41000)  # a tuple no socket has
    lab.inject(left, other)
    cli = lab.connect(client_pod, s_ip, 8080, src_port=40000)
    srv = lab.accept(listener)
    cli.sendall(b"ping")
    assert recv_exact(dummy, 4) == b"ping"  # the hang, for real
    del srv

    audit = podman_run(run_flags, "sockguard", "audit", "--map", str(lab.pin_path), "--json")
    assert audit.returncode == 1, audit.stderr[-2000:]
    doc = json.loads(audit.stdout)
    kinds = {f["key_hex"]: f["kind"] for f in doc["findings"]}
    assert kinds == {future.hex(): "shadowing", left.hex(): "stale"}, doc["findings"]
    assert all(f["confirmed"] for f in doc["findings"])
    exact = [s for s in ("iterator", "tc_lookup") if entry_source_skip_reason(s) is None]
    if exact:  # the image's own BPF objects read which socket each entry points to
        assert doc["maps"][0]["source"] == exact[0]
    # The pods' namespaces were all read from inside the container (no "could not look").
    assert doc["maps"][0]["counts"]["stale"] == 1
    assert not doc.get("unseen_namespaces"), doc.get("unseen_namespaces")


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except OSError:
        return 0, b""


def _last_success(metrics: bytes) -> float:
    for line in metrics.decode(errors="replace").splitlines():
        if line.startswith("sockguard_last_successful_audit_timestamp_seconds "):
            return float(line.split()[1])
    return 0.0


def _logs(name: str) -> str:
    out = subprocess.run(["podman", "logs", name], capture_output=True, text=True, timeout=60,
                         check=False)
    return (out.stdout + out.stderr)[-3000:]


def test_image_runs_the_daemon_as_the_daemonset_does_and_answers_its_probes(
        run_flags: list[str], lab: Lab) -> None:
    """The manifest's own command (the node IP replaced by loopback), on the lab's map:
    every probe's path answers 200 once the first audit is in, and SIGTERM exits 0."""
    ctr = _container()["container"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [a.replace("$(NODE_IP)", "127.0.0.1") for a in ctr["command"]]
    argv += ["--map", str(lab.pin_path), "--metrics-port", str(port), "--interval", "1"]
    name = f"sockguard-test-{secrets.token_hex(3)}"
    started = subprocess.run(["podman", "run", "-d", "--name", name, *run_flags, IMAGE, *argv],
                             capture_output=True, text=True, timeout=120, check=False)
    assert started.returncode == 0, started.stderr[-2000:]
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _last_success(_get(base + "/metrics")[1]) <= 0:
            time.sleep(0.2)
        assert _last_success(_get(base + "/metrics")[1]) > 0, _logs(name)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            status, body = _get(base + ctr[probe]["httpGet"]["path"])
            assert status == 200, (probe, status, body[-500:])
        status, body = _get(base + ctr["livenessProbe"]["httpGet"]["path"])
        assert body.startswith(b"ok: the audit thread made progress"), body
        status, body = _get(base + "/metrics")
        assert b'sockguard_map_entries{' in body, body[-2000:]
        stop = subprocess.run(["podman", "stop", "-t", "10", name], capture_output=True,
                              text=True, timeout=60, check=False)
        assert stop.returncode == 0, stop.stderr
        code = subprocess.run(["podman", "inspect", "--format", "{{.State.ExitCode}}", name],
                              capture_output=True, text=True, timeout=60, check=True)
        assert code.stdout.strip() == "0", _logs(name)
        assert "stopped" in _logs(name)
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True, timeout=60,
                       check=False)

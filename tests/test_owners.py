"""Findings name the process, container and Kubernetes pod that hold a socket.

kubelet names a pod's cgroup after the pod's UID (systemd driver:
``kubepods-<qos>-pod<uid, _ for ->.slice``; cgroupfs driver:
``/kubepods/<qos>/pod<uid>``) and the runtime names the container's scope after
its id; kubelet keeps the pod's logs in ``/var/log/pods/<namespace>_<name>_<uid>``.
The parsing is pure and tested without root; the lab test puts the process that
holds the hung connection's server socket into a cgroup named the way kubelet
and containerd name them, gives the pod a log directory, and the CLI's finding
must name that pod.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockguard.kernel import task_owners
from sockguard.kernel.owners import POD_LOGS, find_owners, kubelet_identity, pod_names
from tests.lab import Lab, cilium_key

POD = "1f2e3d4c-5b6a-4789-8abc-def012345678"
CID = "ab" * 32


@pytest.mark.parametrize(("cgroup", "expected"), [
    # cgroup v2, systemd driver, containerd, burstable QoS
    (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
     f"{POD.replace('-', '_')}.slice/cri-containerd-{CID}.scope\n", (POD, CID)),
    # systemd driver, guaranteed QoS (no QoS slice), CRI-O
    (f"0::/kubepods.slice/kubepods-pod{POD.replace('-', '_')}.slice/crio-{CID}.scope\n",
     (POD, CID)),
    # cgroupfs driver, besteffort and guaranteed
    (f"0::/kubepods/besteffort/pod{POD}/{CID}\n", (POD, CID)),
    (f"0::/kubepods/pod{POD}/{CID}\n", (POD, CID)),
    # cgroup v1 lines, cgroupfs driver
    (f"12:pids:/kubepods/burstable/pod{POD}/{CID}\n"
     f"1:name=systemd:/kubepods/burstable/pod{POD}/{CID}\n", (POD, CID)),
    # a pod's cgroup itself (the pause process's parent), no container yet
    (f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
     f"{POD.replace('-', '_')}.slice\n", (POD, None)),
    # docker without Kubernetes: a container, no pod
    (f"0::/system.slice/docker-{CID}.scope\n", (None, CID)),
    # a plain host process
    ("0::/user.slice/user-0.slice/session-1.scope\n", (None, None)),
    # a pod-like word that is not kubelet's naming
    ("0::/system.slice/kubepods-notapod.slice\n", (None, None)),
])
def test_kubelet_identity(cgroup: str, expected: tuple[str | None, str | None]) -> None:
    assert kubelet_identity(cgroup) == expected


@given(st.uuids(), st.binary(min_size=32, max_size=32),
       st.sampled_from(["", "burstable", "besteffort"]), st.booleans(),
       st.sampled_from(["cri-containerd", "crio", "docker"]))
def test_kubelet_identity_round_trips(pod: uuid.UUID, raw: bytes, qos: str, systemd: bool,
                                      runtime: str) -> None:
    uid, cid = str(pod), raw.hex()
    if systemd:
        slices = "/kubepods.slice" + (f"/kubepods-{qos}.slice" if qos else "")
        leaf = f"kubepods{'-' + qos if qos else ''}-pod{uid.replace('-', '_')}.slice"
        path = f"{slices}/{leaf}/{runtime}-{cid}.scope"
    else:
        path = f"/kubepods{'/' + qos if qos else ''}/pod{uid}/{cid}"
    assert kubelet_identity(f"0::{path}\n") == (uid, cid)


SERVER_PORT, CLIENT_PORT = 8080, 40000


def test_pod_names_come_from_kubelets_log_directories(tmp_path: Path) -> None:
    (tmp_path / f"kube-system_coredns-7db6d8ff4d-x2x9k_{POD}").mkdir()
    (tmp_path / "default_web-0_0a1b2c3d-0000-4000-8000-000000000001").mkdir()
    (tmp_path / "default_notadir_0a1b2c3d-0000-4000-8000-000000000002").write_text("")
    (tmp_path / "one_two").mkdir()
    (tmp_path / "a_b_c_d").mkdir()
    assert pod_names(str(tmp_path)) == {
        POD: "kube-system/coredns-7db6d8ff4d-x2x9k",
        "0a1b2c3d-0000-4000-8000-000000000001": "default/web-0"}
    assert pod_names(str(tmp_path / "absent")) == {}


@pytest.mark.kernel
def test_a_finding_names_the_kubelet_style_pod_of_its_socket(lab: Lab) -> None:
    """The incident's hang, its server socket held by a 'pod' process: the finding names
    the pod (namespace/name, UID) and container id, in the JSON and in the human table."""
    server_pod, client_pod = lab.pods
    s_ip, c_ip = server_pod.addr(), client_pod.addr()
    listener = lab.listen(server_pod, port=SERVER_PORT)
    dummy, _ = lab.dummy_pair()
    future = cilium_key(s_ip, SERVER_PORT, c_ip, CLIENT_PORT)
    lab.inject(future, dummy)
    cli = lab.connect(client_pod, s_ip, SERVER_PORT, src_port=CLIENT_PORT)
    srv = lab.accept(listener)

    pod_uid, container = str(uuid.uuid4()), os.urandom(32).hex()
    levels = ["kubepods.slice", "kubepods-besteffort.slice",
              f"kubepods-besteffort-pod{pod_uid.replace('-', '_')}.slice",
              f"cri-containerd-{container}.scope"]
    made: list[Path] = []
    logs_root = Path(POD_LOGS)
    logs = [p for p in (logs_root, logs_root / f"sgl-lab_web-0_{pod_uid}") if not p.exists()]
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                              pass_fds=[srv.fileno()])
    try:
        path = lab.cgroup.path
        for level in levels:
            path = path / level
            path.mkdir()
            made.append(path)
        (path / "cgroup.procs").write_text(str(holder.pid))
        for p in logs:
            p.mkdir()
        srv.close()  # the pod's process alone holds the server socket now
        proc = subprocess.run([sys.executable, "-m", "sockguard", "audit", "--map",
                               str(lab.pin_path), "--json"], capture_output=True, text=True,
                              timeout=60, check=False)
        assert proc.returncode == 1, proc.stderr
        [f] = [f for f in json.loads(proc.stdout)["findings"] if f["key_hex"] == future.hex()]
        assert f["kind"] == "shadowing"
        owner = f["owner"]
        assert (owner["pid"], owner["container"], owner["pod_uid"], owner["pod"]) == (
            holder.pid, container, pod_uid, "sgl-lab/web-0")
        table = subprocess.run([sys.executable, "-m", "sockguard", "audit", "--map",
                                str(lab.pin_path)], capture_output=True, text=True, timeout=60,
                               check=False)
        assert f"pod sgl-lab/web-0, {container[:12]}" in table.stdout, table.stdout
    finally:
        for p in reversed(logs):
            if p.exists():
                p.rmdir()
        holder.kill()
        holder.wait()
        cli.close()
        for path in reversed(made):
            deadline = time.monotonic() + 5
            while True:
                try:
                    path.rmdir()
                    break
                except OSError:  # the killed process leaves the cgroup a moment later
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)


# --- who holds a socket: the task-file iterator and /proc agree -------------------------


@pytest.fixture
def held_sockets() -> Iterator[tuple[dict[int, int], list[int]]]:
    """Sockets held by this process and by a child (inode -> pid), and inodes nobody holds
    any more: the truth both ways of finding holders must give."""
    mine = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(3)]
    theirs = [socket.socket(socket.AF_INET6, socket.SOCK_STREAM) for _ in range(3)]
    gone = [socket.socket() for _ in range(2)]
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                              pass_fds=[s.fileno() for s in theirs])
    try:
        truth = {os.fstat(s.fileno()).st_ino: os.getpid() for s in mine}
        truth |= {os.fstat(s.fileno()).st_ino: holder.pid for s in theirs}
        for s in theirs:
            s.close()  # the child alone holds them now
        gone_inodes = [os.fstat(s.fileno()).st_ino for s in gone]
        for s in gone:
            s.close()
        yield truth, gone_inodes
    finally:
        holder.kill()
        holder.wait()
        for s in mine:
            s.close()


@pytest.mark.kernel
@pytest.mark.usefixtures("bpf_kernel")
@pytest.mark.parametrize("walk", ["iterator", "proc"])
def test_find_owners_names_each_sockets_process(held_sockets: tuple[dict[int, int], list[int]],
                                                walk: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    truth, gone = held_sockets
    if walk == "iterator":
        ok, why = task_owners.available()
        if not ok:
            pytest.skip(why)
        monkeypatch.setattr(task_owners, "WANTED_MAX", 2)  # several walks of the iterator
    else:
        monkeypatch.setattr(task_owners, "available", lambda: (False, "forced"))
    found = find_owners([*truth, *gone, 0])
    assert {ino: o.pid for ino, o in found.items()} == truth
    assert all(o.comm for o in found.values())


@pytest.mark.kernel
@pytest.mark.usefixtures("bpf_kernel")
def test_the_iterators_holders_are_procs(held_sockets: tuple[dict[int, int], list[int]]) -> None:
    ok, why = task_owners.available()
    if not ok:
        pytest.skip(why)
    truth, gone = held_sockets
    assert task_owners.holders([*truth, *gone]) == truth
    assert task_owners.holders([]) == {}

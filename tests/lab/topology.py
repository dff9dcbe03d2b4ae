"""Network namespaces for the lab: one "node" and N "pods", each pod on a veth.

The shape mirrors a Cilium node closely enough for sockops: pod-to-pod TCP
is routed through the node namespace (ip_forward on), and node-to-pod
connections originate from the node's veth address.  Everything is created
inside namespaces the lab owns (veths are created in the node netns with
their peer moved straight into the pod), so the host namespace is never
touched and ``ip netns del`` takes the veths with it.

Addressing for pod k (0-based):
    pod   eth0   10.200.k.2/24    fd00:200:k::2/64
    node  vpk    10.200.k.1/24    fd00:200:k::1/64
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from sockguard.kernel.netns import entered

RUN_NETNS = Path("/run/netns")
IP_TIMEOUT = 10.0
LINK_UP_TIMEOUT = 5.0


class TopologyError(RuntimeError):
    """An ``ip`` command failed; the message carries its stderr."""


def ip(*args: str, input_text: str | None = None) -> str:
    """Run ``ip`` with a timeout, raising TopologyError with stderr on failure."""
    proc = subprocess.run(
        ["ip", *args],
        input=input_text,
        capture_output=True,
        text=True,
        timeout=IP_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        raise TopologyError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def sysctl(netns_path: str, key: str, value: str) -> None:
    """Write ``/proc/sys/<key>`` of the namespace at ``netns_path``.

    Network sysctls resolve against the *calling thread's* namespace at open
    time, so entering the namespace on this thread is enough (no fork/exec).
    """
    with entered(netns_path), open(f"/proc/sys/{key}", "w") as fh:
        fh.write(value)


@dataclass(frozen=True)
class Namespace:
    """A lab network namespace and the addresses others reach it by."""

    role: str  # "node", "pod-a", "pod-b", ...
    name: str  # the /run/netns name (unique per lab)
    ip4: IPv4Address | None = None
    ip6: IPv6Address | None = None
    gw4: IPv4Address | None = None  # node-side address on this pod's veth
    gw6: IPv6Address | None = None

    @property
    def path(self) -> str:
        """The nsfs path ``sockguard.kernel.netns.entered`` takes."""
        return str(RUN_NETNS / self.name)

    def addr(self, family: int = socket.AF_INET) -> str:
        """This pod's address for ``family``, as a string for bind/connect."""
        value = self.ip4 if family == socket.AF_INET else self.ip6
        if value is None:
            raise ValueError(f"{self.role} has no address for family {family}")
        return str(value)

    def __str__(self) -> str:
        return f"{self.role}({self.name})"


@dataclass
class Topology:
    """Creates the namespaces on construction; ``close()`` deletes them (idempotent)."""

    pods: int = 2
    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    node: Namespace = field(init=False)
    pod_list: list[Namespace] = field(init=False, default_factory=list)
    _created: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if not 1 <= self.pods <= 26:
            raise ValueError("1..26 pods")
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _add_netns(self, name: str) -> None:
        ip("netns", "add", name)
        self._created.append(name)
        # No DAD: a tentative link-local address stalls IPv6 forwarding (the
        # node cannot resolve the next pod) for ~2 s after setup.  ``default``
        # covers interfaces created (or moved) into this namespace later.
        path = str(RUN_NETNS / name)
        for scope in ("all", "default"):
            sysctl(path, f"net/ipv6/conf/{scope}/accept_dad", "0")

    def _build(self) -> None:
        node_name = f"sgl-node-{self.suffix}"
        self._add_netns(node_name)
        self.node = Namespace("node", node_name)
        node_cmds = [
            "link set lo up",
        ]
        for k in range(self.pods):
            letter = chr(ord("a") + k)
            pod_name = f"sgl-pod-{letter}-{self.suffix}"
            self._add_netns(pod_name)
            pod = Namespace(
                role=f"pod-{letter}",
                name=pod_name,
                ip4=IPv4Address(f"10.200.{k}.2"),
                ip6=IPv6Address(f"fd00:200:{k}::2"),
                gw4=IPv4Address(f"10.200.{k}.1"),
                gw6=IPv6Address(f"fd00:200:{k}::1"),
            )
            self.pod_list.append(pod)
            veth, peer = f"vp{k}", f"pl{k}"
            # Order matters for speed: the node end goes up while its peer is
            # still down, then the peer moves into the pod and comes up there.
            # That last carrier-on is an "urgent" linkwatch event, handled at
            # once; other orders wait for linkwatch's ~1 s rate limit.
            ip("-n", node_name, "link", "add", veth, "type", "veth", "peer", "name", peer)
            ip("-n", node_name, "link", "set", veth, "up")
            ip("-n", node_name, "link", "set", peer, "netns", pod_name)
            node_cmds += [
                f"addr add {pod.gw4}/24 dev {veth}",
                f"addr add {pod.gw6}/64 dev {veth} nodad",
            ]
            ip("-n", pod_name, "-batch", "-", input_text="\n".join([
                "link set lo up",
                f"link set {peer} name eth0",
                f"addr add {pod.ip4}/24 dev eth0",
                f"addr add {pod.ip6}/64 dev eth0 nodad",
                "link set eth0 up",
                f"route add default via {pod.gw4}",
                f"route add default via {pod.gw6}",
            ]) + "\n")  # fmt: skip
        ip("-n", node_name, "-batch", "-", input_text="\n".join(node_cmds) + "\n")
        # Routing between pods goes through the node: forward both families.
        sysctl(self.node.path, "net/ipv4/ip_forward", "1")
        sysctl(self.node.path, "net/ipv6/conf/all/forwarding", "1")
        self._wait_links_up()

    def _wait_links_up(self, timeout: float = LINK_UP_TIMEOUT) -> None:
        """Block until every veth reports operstate UP on both ends.

        The carrier change is propagated by the kernel's linkwatch work, which
        is rate-limited to about once a second for non-urgent events.  Until it
        ran, IPv6 forwarding through the node silently drops the first SYN
        (IPv4 does not), so a connect would need a 1 s SYN retransmit.  With
        the link-up order of ``_build`` this returns within milliseconds.
        """
        names = [self.node.name, *(p.name for p in self.pod_list)]
        deadline = time.monotonic() + timeout
        while True:
            down = [
                f"{ns}:{line.split()[1]}"
                for ns in names
                for line in ip("-n", ns, "-o", "link", "show").splitlines()
                if " lo:" not in line and "state UP" not in line
            ]
            if not down:
                return
            if time.monotonic() > deadline:
                raise TopologyError(f"links not up after {timeout} s: {', '.join(down)}")
            time.sleep(0.02)

    def close(self) -> None:
        """Delete every namespace this topology created (veths go with them)."""
        while self._created:
            name = self._created.pop()
            with contextlib.suppress(TopologyError, subprocess.TimeoutExpired):
                ip("netns", "del", name)
            if os.path.exists(RUN_NETNS / name):  # pragma: no cover - should not happen
                raise TopologyError(f"netns {name} survived 'ip netns del'")

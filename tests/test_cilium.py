"""Finding Cilium's host gateway address, in a namespace of our own."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from ipaddress import ip_address

import pytest

from sockguard.kernel.cilium import gateway_ips

pytestmark = pytest.mark.kernel


@pytest.fixture
def netns() -> Iterator[str]:
    if subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() != "0":
        pytest.skip("needs root to create a network namespace")
    name = f"sg-cil-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def test_gateway_ips_are_cilium_hosts_addresses(netns: str) -> None:
    path = f"/run/netns/{netns}"
    assert gateway_ips(path) == frozenset()
    # Cilium's cilium_host is one end of a veth pair (the other is cilium_net).
    for args in (["link", "add", "cilium_host", "type", "veth", "peer", "name", "cilium_net"],
                 ["addr", "add", "10.99.0.1/32", "dev", "cilium_host"],
                 ["addr", "add", "fd99::1/128", "dev", "cilium_host"]):
        subprocess.run(["ip", "-n", netns, *args], check=True)
    assert gateway_ips(path) == {ip_address("10.99.0.1"), ip_address("fd99::1")}


def test_gateway_ips_of_a_vanished_namespace_are_none() -> None:
    assert gateway_ips("/run/netns/sg-never-existed") == frozenset()

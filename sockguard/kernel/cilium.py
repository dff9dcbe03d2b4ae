"""Facts about a Cilium node that the audit needs: gateway address, proxy ports.

Cilium's L7-proxy redirect entries carry the host gateway IP (the address of
the ``cilium_host`` interface, IPV4_GATEWAY in its datapath) as their sip and
the proxy's port as their sport.  The gateway address alone proves nothing:
the host reaches pods from that very address (kubelet's probes), so the
audit calls an entry ``proxy`` only when its sport is a port something
listens on in the host namespace and its client socket is alive.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable
from ipaddress import ip_address

from sockguard.core.audit import AuditPolicy
from sockguard.core.model import IPAddress
from sockguard.kernel.netns import NamespaceGone, entered, host_netns_path

log = logging.getLogger(__name__)

CILIUM_HOST = "cilium_host"


def _addresses_of(ifname: str) -> frozenset[IPAddress]:
    try:
        socket.if_nametoindex(ifname)
    except OSError:  # no such interface: not a Cilium node, and no pyroute2 import
        return frozenset()
    # Imported here: pyroute2 costs ~150 ms of start-up, and only this needs it.
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=ifname)
        if not links:
            return frozenset()
        return frozenset(
            ip_address(msg.get_attr("IFA_ADDRESS"))
            for msg in ipr.get_addr(index=links[0])
            if msg.get_attr("IFA_ADDRESS")
        )


def gateway_ips(netns_path: str | None = None, ifname: str = CILIUM_HOST) -> frozenset[IPAddress]:
    """Addresses of ``cilium_host`` in the host namespace (none when Cilium is absent).

    The netlink socket must be created inside the namespace, hence ``entered``;
    a failure to look only costs the ``proxy`` label, so it is logged, not raised.
    """
    try:
        with entered(netns_path or host_netns_path()):
            return _addresses_of(ifname)
    except (NamespaceGone, OSError) as exc:
        log.debug("no %s addresses: %s", ifname, exc)
        return frozenset()


def proxy_ports(netns_path: str | None = None) -> frozenset[int] | None:
    """Ports listened on in the host namespace (where Cilium's L7 proxy listens).

    None when they could not be read: then no entry is called ``proxy`` by
    its port, and no entry that could be one is deleted (see audit).
    """
    from sockguard.kernel.sockets import listen_ports

    try:
        return listen_ports(netns_path or host_netns_path())
    except (NamespaceGone, OSError) as exc:
        # Only without privileges, where the audit itself fails next with the reason.
        log.debug("cannot list the host namespace's listening ports (L7-proxy "
                  "evidence): %s", exc)
        return None


def audit_policy(explicit_proxy_ips: Iterable[IPAddress] = ()) -> AuditPolicy:
    """The policy for this node: proxy IPs (the operator's and cilium_host's), proxy ports."""
    return AuditPolicy(proxy_ips=frozenset(explicit_proxy_ips) | gateway_ips(),
                       host_listen_ports=proxy_ports())

"""TCP states (include/net/tcp_states.h), their names, and the groups the rules use.

One place for the numbers: the audit core, the collision check and the tracer
all name states and ask "does a socket in this state own its connection?".
"""

from __future__ import annotations

TCP_ESTABLISHED = 1
TCP_SYN_SENT = 2
TCP_SYN_RECV = 3
TCP_FIN_WAIT1 = 4
TCP_FIN_WAIT2 = 5
TCP_TIME_WAIT = 6
TCP_CLOSE = 7
TCP_CLOSE_WAIT = 8
TCP_LAST_ACK = 9
TCP_LISTEN = 10
TCP_CLOSING = 11
TCP_NEW_SYN_RECV = 12
TCP_BOUND_INACTIVE = 13  # 6.9+: a bound, never-connected socket

TCP_STATE_NAMES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
    6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
    11: "CLOSING", 12: "NEW_SYN_RECV", 13: "BOUND_INACTIVE",
}

#: A full socket in one of these states owns its connection (its tuple).
OWNER_STATES = frozenset(
    {TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING}
)
#: A tuple only in its handshake: neither owned nor stale yet.
HANDSHAKE_STATES = frozenset({TCP_SYN_SENT, TCP_SYN_RECV, TCP_NEW_SYN_RECV})


def state_name(state: int) -> str:
    """The kernel's name of a TCP state, or its number when unknown."""
    return TCP_STATE_NAMES.get(state, str(state))

"""Hunt for sockhash entries left behind at close (the incident's 5.10 leak), with the lab.

Run inside a VM (``tests/vm/run --kernel 5.10 --script tests/vm/leak_hunt.py``)
or on the host as root (``.venv/bin/python tests/vm/leak_hunt.py OUT_DIR``).

Each scenario builds a fresh lab (child cgroup, pod netns, Cilium-like
sockops + sk_msg on ``cilium_sock_ops``), opens lab connections, ends them one
way, closes every fd it holds, waits for the kernel to settle, and then looks
for keys left in the map: every lab socket is closed by then, so any key
still there is a leaked entry.  ``sockguard audit --json`` is run on the map
so its verdict (``stale``) is recorded next to the raw key list.  A second
connection that reuses a tuple (same client port) checks the incident's symptom:
an insert that fails with EEXIST (lab_stats ``insert_eexist``) or a payload
that never arrives.

Writes ``leak_hunt.json`` to OUT_DIR and prints one line per scenario.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sockguard.kernel.netns import entered  # noqa: E402
from tests.lab import Lab, build_lab_object, close_rst, describe, recv_exact  # noqa: E402

PORT = 8080
SETTLE = 1.0  # seconds for deferred teardown (RCU, workqueues, TIME_WAIT) before looking


def linger0(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def exchange(cli: socket.socket, srv: socket.socket) -> None:
    cli.sendall(b"ping")
    assert recv_exact(srv, 4) == b"ping"
    srv.sendall(b"pong")
    assert recv_exact(cli, 4) == b"pong"


# --- scenarios: each gets a lab and ends its connections one way -----------------------


def s_fin(lab: Lab) -> None:
    """Orderly close: client first, then server."""
    a, b = lab.pods
    for i in range(8):
        cli, srv = lab.pair(a, b, PORT + i)
        exchange(cli, srv)
        cli.close()
        srv.close()


def s_server_first(lab: Lab) -> None:
    """Orderly close, server side first (server ends in TIME_WAIT)."""
    a, b = lab.pods
    for i in range(8):
        cli, srv = lab.pair(a, b, PORT + i)
        exchange(cli, srv)
        srv.close()
        cli.close()


def s_rst(lab: Lab) -> None:
    """Client aborts with RST (SO_LINGER 0); server closes after reading the reset."""
    a, b = lab.pods
    for i in range(8):
        cli, srv = lab.pair(a, b, PORT + i)
        exchange(cli, srv)
        close_rst(cli)
        with contextlib.suppress(OSError):
            srv.recv(16)
        srv.close()


def s_rst_fd_kept_then_closed(lab: Lab) -> None:
    """RST, the server keeps its fd for a while (entry stays by design), then closes."""
    a, b = lab.pods
    socks = []
    for i in range(8):
        cli, srv = lab.pair(a, b, PORT + i)
        close_rst(cli)
        socks.append(srv)
    time.sleep(0.5)
    for s in socks:
        s.close()


def s_half_close(lab: Lab) -> None:
    """shutdown(SHUT_WR) by the client, server answers after EOF, then both close."""
    a, b = lab.pods
    for i in range(8):
        cli, srv = lab.pair(a, b, PORT + i)
        cli.shutdown(socket.SHUT_WR)
        assert srv.recv(16) == b""
        srv.sendall(b"bye")
        assert recv_exact(cli, 3) == b"bye"
        srv.shutdown(socket.SHUT_RDWR)
        cli.close()
        srv.close()


def s_unread_data(lab: Lab) -> None:
    """Close with unread (redirected) data in the receive queue: the kernel sends RST."""
    a, b = lab.pods
    for i in range(8):
        cli, srv = lab.pair(a, b, PORT + i)
        cli.sendall(b"x" * 4096)
        time.sleep(0.05)
        srv.close()
        cli.close()


def s_listener_unaccepted(lab: Lab) -> None:
    """Listener closed with established but never accepted children."""
    a, b = lab.pods
    for round_ in range(4):
        lst = lab.listen(b, port=PORT + round_, backlog=16)
        clients = [lab.connect(a, b.addr(), PORT + round_) for _ in range(8)]
        time.sleep(0.2)  # children ESTABLISHED (and inserted) in the accept queue
        lst.close()
        for c in clients:
            with contextlib.suppress(OSError):
                c.recv(1)
            c.close()


def s_concurrent_close_send(lab: Lab) -> None:
    """One thread sends in a loop while another closes the peer (and then the sender)."""
    a, b = lab.pods
    for i in range(16):
        cli, srv = lab.pair(a, b, PORT + i)
        stop = threading.Event()

        def pump(sock: socket.socket = cli, stop: threading.Event = stop) -> None:
            with contextlib.suppress(OSError):
                while not stop.is_set():
                    sock.send(b"y" * 512)

        t = threading.Thread(target=pump)
        t.start()
        time.sleep(0.01 * (i % 4))
        if i % 2:
            close_rst(srv)
        else:
            srv.close()
        time.sleep(0.02)
        if i % 3 == 0:
            cli.close()  # under the sender's feet
        stop.set()
        t.join(5)
        cli.close()


def s_netns_deleted(lab: Lab) -> None:
    """Sockets live in a netns that is deleted (ip netns del) before they are closed."""
    name = f"sgleak-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    path = f"/run/netns/{name}"
    socks: list[socket.socket] = []
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        with lab.cgroup.member(), entered(path):
            lst = socket.socket()
            lst.bind(("127.0.0.1", PORT))
            lst.listen(16)
            for _ in range(8):
                c = socket.socket()
                c.connect(("127.0.0.1", PORT))
                s, _ = lst.accept()
                socks += [c, s]
            lst.close()
        for s in socks:
            s.settimeout(2)
        socks[0].sendall(b"z")
        assert recv_exact(socks[1], 1) == b"z"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    time.sleep(0.3)  # the netns lives on through its sockets
    for s in socks:
        s.close()


def s_killed_process(lab: Lab) -> None:
    """The only owner of the fds is SIGKILLed (fds closed by do_exit)."""
    a, b = lab.pods
    pairs = [lab.pair(a, b, PORT + i) for i in range(8)]
    pid = os.fork()
    if pid == 0:  # child: keep the fds, sleep until killed
        time.sleep(60)
        os._exit(0)
    for cli, srv in pairs:  # parent drops its copies; the child holds the sockets now
        lab._sockets.remove(cli)
        lab._sockets.remove(srv)
        cli.close()
        srv.close()
    time.sleep(0.2)
    os.kill(pid, 9)
    os.waitpid(pid, 0)


def s_user_timeout(lab: Lab) -> None:
    """The kernel kills the connection (TCP_USER_TIMEOUT after the path died); fd closed later."""
    a, b = lab.pods
    socks = []
    for i in range(4):
        cli, srv = lab.pair(a, b, PORT + i)
        cli.setsockopt(socket.IPPROTO_TCP, 18, 500)  # TCP_USER_TIMEOUT, ms
        socks.append((cli, srv))
    # drop all traffic from pod a: payloads to b are still redirected by sk_msg,
    # so make the socket need the wire: a FIN has to be retransmitted.
    subprocess.run(["ip", "-n", a.name, "link", "set", "dev", "eth0", "down"], check=False)
    for cli, _ in socks:
        cli.shutdown(socket.SHUT_WR)
    time.sleep(3)
    subprocess.run(["ip", "-n", a.name, "link", "set", "dev", "eth0", "up"], check=False)
    for cli, srv in socks:
        cli.close()
        close_rst(srv)


def s_reuse_tuple(lab: Lab) -> None:
    """The incident's sequence: connect from a fixed port, close, reconnect from that port."""
    a, b = lab.pods
    lst = lab.listen(b, port=PORT)
    for i in range(20):
        cli = lab.connect(a, b.addr(), PORT, src_port=41000 + (i % 2))
        srv = lab.accept(lst)
        exchange(cli, srv)
        if i % 2:
            close_rst(cli)
        else:
            cli.close()
        srv.close()
        time.sleep(0.01)
    lst.close()


SCENARIOS: list[Callable[[Lab], None]] = [
    s_fin, s_server_first, s_rst, s_rst_fd_kept_then_closed, s_half_close, s_unread_data,
    s_listener_unaccepted, s_concurrent_close_send, s_netns_deleted, s_killed_process,
    s_user_timeout, s_reuse_tuple,
]  # fmt: skip


def audit(lab: Lab) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "sockguard", "audit", "--map", str(lab.pin_path), "--json", "--all"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    try:
        doc: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        return {"rc": proc.returncode, "error": proc.stderr.strip()[-500:]}
    counts = doc["maps"][0]["counts"] if doc.get("maps") else {}
    stale = [f["key_hex"] for f in doc.get("findings", []) if f["kind"] == "stale"]
    return {"rc": proc.returncode, "counts": counts, "stale": stale}


def run(obj: Path, scenario: Callable[[Lab], None]) -> dict[str, Any]:
    out: dict[str, Any] = {"scenario": scenario.__name__[2:], "doc": scenario.__doc__}
    with Lab(pods=2, obj_path=obj) as lab:
        try:
            scenario(lab)
            out["error"] = None
        except Exception as exc:  # record and go on
            out["error"] = f"{type(exc).__name__}: {exc}"
        lab._close_sockets()
        time.sleep(SETTLE)
        left = lab.keys()
        out["left"] = [describe(k) for k in left]
        out["stats"] = lab.stats()
        out["audit"] = audit(lab) if left else {"skipped": "map empty"}
        out["legacy_sk_msg"] = lab.sk_msg_legacy
    return out


def main(argv: list[str]) -> int:
    out_dir = Path(argv[1]) if len(argv) > 1 else Path(tempfile.mkdtemp(prefix="leak-hunt-"))
    kernel = os.uname().release
    results = []
    with tempfile.TemporaryDirectory(prefix="leak-hunt-obj-") as tmp:
        obj = build_lab_object(Path(tmp))
        for scenario in SCENARIOS:
            t0 = time.monotonic()
            res = run(obj, scenario)
            res["seconds"] = round(time.monotonic() - t0, 2)
            results.append(res)
            st = res["stats"]
            print(f"{kernel} {res['scenario']:<26} left={len(res['left'])} "
                  f"inserts={st['insert_ok']} eexist={st['insert_eexist']} "
                  f"audit={res['audit'].get('counts', res['audit'])} "
                  f"error={res['error']}", flush=True)  # fmt: skip
            for k in res["left"]:
                print(f"    left behind: {k}", flush=True)
    (out_dir / "leak_hunt.json").write_text(json.dumps({"kernel": kernel, "results": results},
                                                       indent=2))  # fmt: skip
    leaks = sum(len(r["left"]) for r in results)
    print(f"{kernel}: {leaks} entries left behind over {len(results)} scenarios", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

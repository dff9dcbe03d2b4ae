"""The ``Lab``: a Cilium-compatible sockops world of our own.

What it sets up (and tears down, in reverse, even when setup fails halfway):

1. a child cgroup v2 (``sockguard-lab-<hex>``) — never the root cgroup;
2. a node netns and N pod netns joined by veths (``topology.Topology``);
3. ``bpf/lab/cilium_lab.bpf.c`` loaded: sockops attached to the child cgroup
   and sk_msg attached to ``cilium_sock_ops``, both with bpf_links, so a
   crashed test process detaches everything by exiting (before kernel 6.10
   there is no sockmap link: sk_msg is then attached the legacy way and
   detached in teardown, see ``sk_msg_attached``);
4. the map pinned at ``/sys/fs/bpf/sockguard-lab-<hex>/cilium_sock_ops``, where
   sockguard's map discovery can find it like a real Cilium pin.

Sockets made with ``lab.socket()`` / ``listen()`` / ``connect()`` live in a pod
netns *and* in the lab cgroup, so the lab's sockops program sees them and
inserts them into the map when they become ESTABLISHED.  Sockets the test
process makes normally (``dummy_pair()``) are outside both: they are what
tests inject under chosen keys to fabricate stale entries.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import secrets
import shutil
import socket
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from socket import AF_INET, AF_INET6
from socket import socket as Socket  # Lab.socket() shadows the module in the class
from types import ModuleType, TracebackType

from sockguard.kernel import libbpf
from sockguard.kernel.netns import entered

from .cgroup import CGROUP2_ROOT, LabCgroup
from .keys import KEY_SIZE
from .sockets import DEFAULT_TIMEOUT, close_rst
from .topology import Namespace, Topology

ROOT = Path(__file__).resolve().parents[2]
LAB_SRC = ROOT / "bpf" / "lab" / "cilium_lab.bpf.c"
BPFFS = Path("/sys/fs/bpf")
MAP_NAME = "cilium_sock_ops"
STATS_MAP = "lab_stats"
SOCKOPS_PROG = "lab_sockops"
SK_MSG_PROG = "lab_sk_msg"

#: lab_stats indices, as documented in cilium_lab.bpf.c.
STAT_NAMES = ("insert_ok", "insert_eexist", "insert_other", "redirects", "sockops_cb")

#: The kernel-internal ENOTSUPP (524) some bpf(2) paths return for "not supported".
_ENOTSUPP = 524


def _build_module() -> ModuleType:
    """``bpf/build.py`` is a script, not a package: load it by path."""
    spec = importlib.util.spec_from_file_location("sockguard_bpf_build", ROOT / "bpf" / "build.py")
    if spec is None or spec.loader is None:  # pragma: no cover
        raise ImportError("cannot load bpf/build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_object(src: Path, out_dir: Path) -> Path:
    """Compile ``src`` (a ``*.bpf.c``) into ``out_dir`` (clang, CO-RE against this kernel)."""
    build = _build_module()
    result: Path = build.compile_one(src, out_dir / f"{src.name[: -len('.c')]}.o")
    return result


def build_lab_object(out_dir: Path) -> Path:
    """Compile cilium_lab.bpf.c into ``out_dir``."""
    return build_object(LAB_SRC, out_dir)


def bpffs_ready() -> bool:
    """Mount bpffs at /sys/fs/bpf if it is not.

    It is not mounted at boot on the development machine (README, "Kernel facts").
    """
    with open("/proc/mounts") as fh:
        if any(line.split()[1:3] == [str(BPFFS), "bpf"] for line in fh):
            return True
    proc = subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)],
                          capture_output=True, timeout=10, check=False)  # fmt: skip
    return proc.returncode == 0


class Lab:
    """Context manager owning every kernel object of one lab instance.

    ``obj_path`` is a pre-built ``cilium_lab.bpf.o`` (the session fixture
    compiles once); without it the lab compiles into its own temp dir.
    """

    def __init__(self, pods: int = 2, obj_path: Path | None = None) -> None:
        self.suffix = secrets.token_hex(4)
        self._obj_path = obj_path
        self._stack = contextlib.ExitStack()
        self._sockets: list[Socket] = []
        self._pods = pods
        # Set in __enter__.
        self.cgroup: LabCgroup
        self.topology: Topology
        self.obj: libbpf.BpfObject
        self.map_fd: int
        self.stats_fd: int
        self.pin_dir = BPFFS / f"sockguard-lab-{self.suffix}"
        self.pin_path = self.pin_dir / MAP_NAME

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            self._setup()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Tear down in reverse order of setup; safe to call twice."""
        self._stack.close()

    def _setup(self) -> None:
        stack = self._stack
        # Registered first, so it runs last: the namespaces and cgroup outlive
        # everything that refers to them.
        self.cgroup = stack.enter_context(LabCgroup())
        self.topology = Topology(pods=self._pods, suffix=self.suffix[:6])
        stack.callback(self.topology.close)

        obj_path = self._obj_path
        if obj_path is None:
            tmp = Path(tempfile.mkdtemp(prefix="sockguard-lab-obj-"))
            stack.callback(shutil.rmtree, tmp, True)
            obj_path = build_lab_object(tmp)

        self.obj = stack.enter_context(libbpf.BpfObject(obj_path))
        self.obj.load()
        self.map_fd = self.obj.map(MAP_NAME).fd
        self.stats_fd = self.obj.map(STATS_MAP).fd

        if not bpffs_ready():
            raise RuntimeError(f"no bpffs at {BPFFS} and mounting one failed")
        self.pin_dir.mkdir()
        stack.callback(shutil.rmtree, self.pin_dir, True)
        libbpf.obj_pin(self.map_fd, str(self.pin_path))
        stack.callback(_unlink_quiet, self.pin_path)

        #: True when sk_msg is attached the legacy way (kernel < 6.10, no sockmap link).
        self.sk_msg_legacy: bool = stack.enter_context(
            sk_msg_attached(self.obj.program(SK_MSG_PROG), self.map_fd)
        )
        sockops_link = self.obj.program(SOCKOPS_PROG).attach_cgroup(self.cgroup.fd)
        stack.callback(sockops_link.destroy)
        self.links = (sockops_link,)

        # Registered last, so it runs first: close every socket while the
        # links, map and namespaces still exist.
        stack.callback(self._close_sockets)

    def _close_sockets(self) -> None:
        while self._sockets:
            close_rst(self._sockets.pop())

    def track(self, sock: Socket) -> Socket:
        """Have teardown close ``sock`` (with RST) if the test did not."""
        self._sockets.append(sock)
        return sock

    # -- topology --------------------------------------------------------------

    @property
    def node(self) -> Namespace:
        return self.topology.node

    @property
    def pods(self) -> list[Namespace]:
        return self.topology.pod_list

    # -- sockets ---------------------------------------------------------------

    def socket(
        self,
        ns: Namespace,
        family: int = AF_INET,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Socket:
        """A TCP socket living in ``ns`` and charged to the lab cgroup (so: Cilium-managed).

        The cgroup is captured at creation (sk_alloc -> cgroup_sk_alloc), the
        netns too; both stick after the thread moves back.
        """
        with self.cgroup.member(), entered(ns.path):
            sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        return self.track(sock)

    def listen(
        self,
        ns: Namespace,
        ip: str | None = None,
        port: int = 0,
        family: int = AF_INET,
        backlog: int = 16,
    ) -> Socket:
        """A listening lab socket; ``ip`` defaults to the namespace's pod address."""
        sock = self.socket(ns, family)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if ip is None:
            ip = ns.addr(family) if ns.ip4 is not None else ("::" if family == AF_INET6
                                                              else "0.0.0.0")  # fmt: skip
        sock.bind((ip, port))
        sock.listen(backlog)
        return sock

    def connect(
        self,
        ns: Namespace,
        dst_ip: str,
        dst_port: int,
        src_port: int | None = None,
        family: int = AF_INET,
        src_ip: str | None = None,
    ) -> Socket:
        """A lab socket in ``ns`` connected to ``dst_ip:dst_port``.

        With ``src_port`` the socket binds explicitly (SO_REUSEADDR), which is
        how tests reproduce a 5-tuple: the incident's collision needs the client
        to come back from the same port.
        """
        sock = self.socket(ns, family)
        if src_port is not None or src_ip is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if src_ip is None:
                src_ip = ns.addr(family) if ns.ip4 is not None else ""
            sock.bind((src_ip, src_port or 0))
        sock.connect((dst_ip, dst_port))
        return sock

    def accept(self, listener: Socket, timeout: float = DEFAULT_TIMEOUT) -> Socket:
        """Accept one connection within ``timeout``; the new socket inherits lab membership."""
        listener.settimeout(timeout)
        conn, _ = listener.accept()
        conn.settimeout(DEFAULT_TIMEOUT)
        return self.track(conn)

    def pair(
        self,
        client: Namespace,
        server: Namespace,
        port: int,
        family: int = AF_INET,
        src_port: int | None = None,
        listener: Socket | None = None,
    ) -> tuple[Socket, Socket]:
        """(client socket, accepted server socket) for client -> server:port.

        Pass ``listener`` to reuse one across reconnects; otherwise one is made
        and closed once the connection is accepted.
        """
        own = listener is None
        lst = listener if listener is not None else self.listen(server, port=port, family=family)
        try:
            dst = server.addr(family)
            cli = self.connect(client, dst, port, src_port=src_port, family=family)
            srv = self.accept(lst)
        finally:
            if own:
                lst.close()
        return cli, srv

    def dummy_pair(self) -> tuple[Socket, Socket]:
        """An established loopback pair in the host netns, OUTSIDE the lab cgroup.

        Neither end is in the map (the sockops program never sees them), so
        either can be injected under any key, as a stale entry's socket.
        """
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as lst:
            lst.settimeout(DEFAULT_TIMEOUT)
            lst.bind(("127.0.0.1", 0))
            lst.listen(1)
            a = self.track(socket.create_connection(lst.getsockname(), timeout=DEFAULT_TIMEOUT))
            b, _ = lst.accept()
        b.settimeout(DEFAULT_TIMEOUT)
        return a, self.track(b)

    # -- map -------------------------------------------------------------------

    def inject(self, key: bytes, sock: Socket) -> None:
        """Insert ``sock`` under ``key`` from userspace (BPF_NOEXIST), like a stale entry."""
        if len(key) != KEY_SIZE:
            raise ValueError(f"key must be {KEY_SIZE} bytes, got {len(key)}")
        libbpf.map_update(self.map_fd, key, struct.pack("i", sock.fileno()), libbpf.BPF_NOEXIST)

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; False when it was not there."""
        return libbpf.map_delete(self.map_fd, key)

    def keys(self) -> list[bytes]:
        """The map's current keys (a snapshot; bounded walk, restarts detected)."""
        return list(self._iter_keys())

    def _iter_keys(self) -> Iterator[bytes]:
        seen: set[bytes] = set()
        key: bytes | None = None
        for _ in range(65536 + 1):
            nxt = libbpf.map_get_next_key(self.map_fd, key, KEY_SIZE)
            if nxt is None or nxt in seen:
                return
            seen.add(nxt)
            yield nxt
            key = nxt
        raise RuntimeError("sockhash walk did not terminate")

    def stats(self) -> dict[str, int]:
        """lab_stats counters by name (see STAT_NAMES)."""
        out: dict[str, int] = {}
        for idx, name in enumerate(STAT_NAMES):
            raw = libbpf.map_lookup(self.stats_fd, struct.pack("I", idx), 8)
            out[name] = struct.unpack("Q", raw)[0] if raw is not None else 0
        return out


def link_attach_unsupported(exc: libbpf.BpfError) -> bool:
    """True when ``exc`` is a kernel saying "no such link type" (EINVAL/EOPNOTSUPP/ENOTSUPP)."""
    return exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, _ENOTSUPP)


def sockmap_prog_query_supported() -> bool:
    """Whether BPF_PROG_QUERY works on a sockmap/sockhash (kernel 6.0+).

    Before 6.0 (sock_map_bpf_prog_query) the kernel answers EINVAL, so nobody,
    sockguard included, can list the sk_msg/sk_skb programs attached to a map.
    """
    fd = libbpf.map_create(libbpf.BPF_MAP_TYPE_SOCKHASH, "sg_probe", 4, 4, 1)
    try:
        libbpf.prog_query(fd, libbpf.BPF_SK_MSG_VERDICT)
    except libbpf.BpfError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    finally:
        os.close(fd)
    return True


@contextlib.contextmanager
def sk_msg_attached(prog: libbpf.Program, map_fd: int) -> Iterator[bool]:
    """Attach an sk_msg program to a sockmap/sockhash for the body; yields True if legacy.

    BPF_LINK_TYPE_SOCKMAP exists only since kernel 6.10: Debian's 5.10 and 6.1
    kernels (tests/vm) answer ``bpf_link_create`` with EINVAL.  There the
    program is attached with ``bpf_prog_attach``, which outlives the process
    (as long as the map lives), so it is detached explicitly on the way out
    (the lab leaves nothing attached behind it).
    """
    try:
        link = prog.attach_to_map(map_fd, libbpf.BPF_SK_MSG_VERDICT)
    except libbpf.BpfError as exc:
        if not link_attach_unsupported(exc):
            raise
    else:
        with link:
            yield False
        return
    libbpf.prog_attach(prog.fd, map_fd, libbpf.BPF_SK_MSG_VERDICT)
    try:
        yield True
    finally:
        libbpf.prog_detach(prog.fd, map_fd, libbpf.BPF_SK_MSG_VERDICT)


def _unlink_quiet(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def lab_unavailable_reason() -> str | None:
    """Why the lab cannot run here (None when it can): the skip reason tests print."""
    if os.geteuid() != 0:
        return "lab needs root (bpf, cgroup v2, netns)"
    from .cgroup import is_cgroup2

    if not is_cgroup2(CGROUP2_ROOT):
        return f"no cgroup v2 hierarchy at {CGROUP2_ROOT}"
    if shutil.which("clang") is None and shutil.which("clang-14") is None:
        return "clang not installed: cannot build bpf/lab/cilium_lab.bpf.c"
    if shutil.which("bpftool") is None and not (ROOT / "bpf" / ".output" / "vmlinux.h").exists():
        return "bpftool not installed: cannot generate vmlinux.h"
    if shutil.which("ip") is None:
        return "iproute2 (ip) not installed"
    if not Path("/sys/kernel/btf/vmlinux").exists():
        return "kernel has no BTF (/sys/kernel/btf/vmlinux)"
    ok, why = libbpf.available()
    if not ok:
        return why
    if not bpffs_ready():
        return f"no bpffs at {BPFFS} and mount failed"
    return None

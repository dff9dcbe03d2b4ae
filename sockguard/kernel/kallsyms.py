"""Kernel text symbols from ``/proc/kallsyms``: the one reader, the one rule.

Two ways in: :func:`find_symbols` looks up a few names in the raw text (the
iterators' three receive functions, ``recvsyms``: no need to parse the whole
table for them), :func:`load` parses the whole table (the tracer's stacks
and function pointers, modules' included so that a frame in a module is not
named after the core function below it).  Both read text symbols only
(:data:`TEXT_TYPES`) and give a name listed at two addresses no address.

Why userspace symbolization: the tracer's BPF programs report raw kernel
addresses (``sk->sk_prot->recvmsg``, the return addresses above
``sk_psock_drop``) and stay free of ``__ksym`` externs, which would make an
object fail to load where one named function is missing or renamed.  Naming
happens here against the running kernel's table: address -> containing
function for stack frames, exact start address for function pointers.

Addresses read as zero when ``kptr_restrict`` hides them; ``usable`` says so,
and callers then report names as unknown instead of guessing.  A name listed at
two addresses (two static functions) has no address, as libbpf rules too:
guessing one of them could name the wrong function.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass, field

KALLSYMS = "/proc/kallsyms"
#: The kallsyms types of kernel text: local, global, weak.
TEXT_TYPES = ("t", "T", "w", "W")


@dataclass
class Kallsyms:
    """Sorted text symbols with address -> name and name -> address lookups."""

    addrs: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    by_name: dict[str, int] = field(default_factory=dict)
    ambiguous: frozenset[str] = frozenset()  # names listed at more than one address

    @classmethod
    def parse(cls, text: str) -> Kallsyms:
        """Read the ``kallsyms`` format: ``address type name [module]`` per line."""
        rows: list[tuple[int, str]] = []
        by_name: dict[str, int] = {}
        ambiguous: set[str] = set()
        for line in text.splitlines():
            parts = line.split()
            if len(parts) < 3 or parts[1] not in TEXT_TYPES:
                continue
            addr = int(parts[0], 16)
            name = parts[2]
            rows.append((addr, name))
            if by_name.setdefault(name, addr) != addr:
                ambiguous.add(name)
        rows.sort()
        return cls([a for a, _ in rows], [n for _, n in rows], by_name, frozenset(ambiguous))

    @property
    def usable(self) -> bool:
        """False when the table is empty or every address is hidden (kptr_restrict)."""
        return bool(self.addrs) and self.addrs[-1] != 0

    def address(self, name: str) -> int | None:
        """The address of function ``name``; None when absent, hidden or ambiguous."""
        if name in self.ambiguous:
            return None
        addr = self.by_name.get(name)
        return addr if addr else None

    def name_at(self, addr: int) -> str | None:
        """The function containing ``addr`` (the nearest symbol at or below it)."""
        if not addr or not self.usable:
            return None
        i = bisect.bisect_right(self.addrs, addr) - 1
        return self.names[i] if i >= 0 else None

    def exact(self, addr: int) -> str | None:
        """The symbol starting exactly at ``addr`` (function pointers point there)."""
        if not addr or not self.usable:
            return None
        i = bisect.bisect_left(self.addrs, addr)
        if i < len(self.addrs) and self.addrs[i] == addr:
            return self.names[i]
        return None


def find_symbols(data: bytes, names: tuple[str, ...]) -> tuple[dict[str, int], list[str]]:
    """Addresses of the core-kernel text symbols ``names`` in kallsyms ``data``.

    A name listed with different addresses (two static functions) or with
    address 0 (kptr_restrict hides addresses) gets no address; module
    symbols (``\\t[mod]`` suffix) never match.
    """
    found: dict[str, int] = {}
    problems: list[str] = []
    for name in names:
        needle = b" " + name.encode() + b"\n"
        addrs: set[int] = set()
        at = data.find(needle)
        while at >= 0:
            start = data.rfind(b"\n", 0, at) + 1
            fields = data[start:at].split()
            if len(fields) == 2 and fields[1].decode() in TEXT_TYPES:
                addrs.add(int(fields[0], 16))
            at = data.find(needle, at + 1)
        if not addrs:
            problems.append(f"{name} not in {KALLSYMS}")
        elif len(addrs) > 1:
            problems.append(f"{name} is ambiguous in {KALLSYMS}")
        elif addrs == {0}:
            problems.append(f"{name}'s address is hidden (kernel.kptr_restrict)")
        else:
            found[name] = addrs.pop()
    return found, problems


@functools.cache
def load(path: str = KALLSYMS) -> Kallsyms:
    """The running kernel's symbols (read once per process; empty when unreadable)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return Kallsyms.parse(fh.read())
    except OSError:
        return Kallsyms()

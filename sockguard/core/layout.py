"""Key layouts: how a sockhash key's bytes map to a connection tuple.

A layout is data — offsets, sizes, byte order, family codes and which key
field is the owning socket's local side — so a second layout is a new
``KeyLayout`` value, not new code in the audit core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sockguard.core.errors import (
    KeyDecodeError as KeyDecodeError,  # raised here; importable from here too
)
from sockguard.core.errors import LayoutMismatchError
from sockguard.core.model import IPAddress, SockKey, Tuple4
from sockguard.core.rows import Interner, positional_constructor


@dataclass(frozen=True)
class Field:
    offset: int
    size: int


@dataclass(frozen=True)
class KeyLayout:
    """Where each part of a 5-tuple key lives.

    ``families`` maps the key's family byte to 4 or 6.  ``port_order`` is the
    byte order of the port's u16 at the start of its field; the field's other
    bytes must be zero.  ``owner_local`` says which of the key's sides is the
    local side of the socket the entry was written for: Cilium writes the key
    from the peer's point of view, so its owner's local side is (dip, dport).
    """

    name: str
    size: int
    sip: Field
    dip: Field
    family: Field
    sport: Field
    dport: Field
    families: tuple[tuple[int, int], ...]
    padding: tuple[Field, ...] = ()
    port_order: Literal["big", "little"] = "big"
    owner_local: Literal["dst", "src"] = "dst"

    def family_code(self, family: int) -> int:
        for code, fam in self.families:
            if fam == family:
                return code
        raise KeyDecodeError(f"layout {self.name} has no code for IPv{family}")

    def check_map(self, key_size: int, map_name: str) -> None:
        """Refuse a map whose keys cannot be this layout's, before reading any."""
        if key_size != self.size:
            raise LayoutMismatchError(
                f"map {map_name} has {key_size}-byte keys; layout {self.name} needs {self.size}"
            )


CILIUM = KeyLayout(
    name="cilium",
    size=44,
    sip=Field(0, 16),
    dip=Field(16, 16),
    family=Field(32, 1),
    sport=Field(36, 4),
    dport=Field(40, 4),
    families=((1, 4), (2, 6)),
    padding=(Field(33, 3),),
)

LAYOUTS: dict[str, KeyLayout] = {CILIUM.name: CILIUM}


def decode_fields(layout: KeyLayout, data: bytes) -> tuple[int, bytes, int, bytes, int]:
    """``(family, sip, sport, dip, dport)`` of ``data``, addresses as packed bytes.

    The checks and their order are those of :func:`decode`; raises KeyDecodeError.
    """
    if len(data) != layout.size:
        raise KeyDecodeError(f"key is {len(data)} bytes, layout {layout.name} needs {layout.size}")
    for pad in layout.padding:
        if any(data[pad.offset : pad.offset + pad.size]):
            raise KeyDecodeError("non-zero padding between fields")
    f = layout.family
    code = int.from_bytes(data[f.offset : f.offset + f.size], "little")
    family = 0
    for known, fam in layout.families:
        if known == code:
            family = fam
            break
    if not family:
        raise KeyDecodeError(f"unknown family code {code}")
    f = layout.sip
    sip = data[f.offset : f.offset + f.size]
    f = layout.dip
    dip = data[f.offset : f.offset + f.size]
    if family == 4:
        if any(sip[4:]) or any(dip[4:]):
            raise KeyDecodeError("IPv4 address with non-zero padding")
        sip, dip = sip[:4], dip[:4]
    elif len(sip) != 16 or len(dip) != 16:
        raise KeyDecodeError("IPv6 address field is not 16 bytes")
    f = layout.sport
    sport = data[f.offset : f.offset + f.size]
    f = layout.dport
    dport = data[f.offset : f.offset + f.size]
    if any(sport[2:]) or any(dport[2:]):
        raise KeyDecodeError("port field with non-zero high bytes")
    order = layout.port_order
    return family, sip, int.from_bytes(sport[:2], order), dip, int.from_bytes(dport[:2], order)


_new_sock_key = positional_constructor(SockKey)


def decode(layout: KeyLayout, data: bytes, interner: Interner | None = None) -> SockKey:
    """Decode ``data``; raise KeyDecodeError for bytes this layout cannot hold.

    ``interner`` shares address, endpoint and tuple objects between keys
    (and with the sockets of the same look).
    """
    family, sip, sport, dip, dport = decode_fields(layout, data)
    interner = interner if interner is not None else Interner()
    if layout.owner_local == "dst":
        owner = interner.tuple4((dip, dport, sip, sport))
    else:
        owner = interner.tuple4((sip, sport, dip, dport))
    return _new_sock_key(family, interner.ip(sip), sport, interner.ip(dip), dport, owner)


def _put(buf: bytearray, f: Field, value: bytes) -> None:
    buf[f.offset : f.offset + len(value)] = value


def encode(layout: KeyLayout, family: int, sip: IPAddress, sport: int,
           dip: IPAddress, dport: int) -> bytes:
    """The key bytes for the given fields (padding zero)."""
    buf = bytearray(layout.size)
    _put(buf, layout.sip, sip.packed)
    _put(buf, layout.dip, dip.packed)
    _put(buf, layout.family, layout.family_code(family).to_bytes(layout.family.size, "little"))
    _put(buf, layout.sport, sport.to_bytes(2, layout.port_order))
    _put(buf, layout.dport, dport.to_bytes(2, layout.port_order))
    return bytes(buf)


def key_for_socket(layout: KeyLayout, tup: Tuple4) -> bytes:
    """The key this layout stores for the socket whose tuple is ``tup``."""
    if layout.owner_local == "dst":
        src, dst = tup.remote, tup.local
    else:
        src, dst = tup.local, tup.remote
    return encode(layout, tup.family, src.ip, src.port, dst.ip, dst.port)


#: The form the tracer's kernel-side filter keys a socket by (bpf/sockguard_trace.h,
#: struct sg_tuple_key): its connection as its peer sees it, byte for byte Cilium's
#: layout.  A map of another layout is watched through :func:`filter_key`.
FILTER_KEY = CILIUM


def filter_key(layout: KeyLayout, key: bytes) -> bytes | None:
    """``key`` of ``layout`` in the filter's form; None for bytes ``layout`` cannot hold."""
    if layout == FILTER_KEY:
        return key
    try:
        return key_for_socket(FILTER_KEY, decode(layout, key).owner)
    except KeyDecodeError:
        return None


@dataclass(frozen=True)
class KernelKeyForm:
    """What the entry sources' programs need to write a layout's key for a socket
    (``struct sg_key_form`` in bpf/entry_record.h): byte offsets of the owning
    socket's remote and local address and port, of the family code, the two
    family codes, and the ports' byte order."""

    remote_addr: int
    local_addr: int
    remote_port: int
    local_port: int
    family: int
    family_v4: int
    family_v6: int
    port_big_endian: int

    def settings(self, prefix: str) -> dict[str, int]:
        """The load-time settings of a struct of this form at ``prefix`` in .rodata."""
        return {f"{prefix}.{name}": value for name, value in vars(self).items()}


#: The longest key the programs hold (KEY_MAX in bpf/entry_record.h).
KERNEL_KEY_MAX = 64


def kernel_form(layout: KeyLayout) -> KernelKeyForm | None:
    """How the programs write ``layout``'s keys; None when they cannot, and the audit
    then judges that layout's entries in Python (slower, not wrong).

    The programs write a 16-byte address field (IPv4 in its first 4 bytes), a
    port as a u16 at the start of its field, and a one-byte family code (a
    longer field must hold its code in the first byte, the rest zero); every
    other byte of the key is zero.
    """
    codes = dict((fam, code) for code, fam in layout.families)
    fields = (layout.sip, layout.dip, layout.sport, layout.dport, layout.family)
    if (layout.size > KERNEL_KEY_MAX or any(f.offset + f.size > layout.size for f in fields)
            or layout.sip.size != 16 or layout.dip.size != 16
            or layout.sport.size < 2 or layout.dport.size < 2
            or set(codes) != {4, 6} or any(not 0 <= c < 256 for c in codes.values())):
        return None
    local_dst = layout.owner_local == "dst"
    return KernelKeyForm(
        remote_addr=(layout.sip if local_dst else layout.dip).offset,
        local_addr=(layout.dip if local_dst else layout.sip).offset,
        remote_port=(layout.sport if local_dst else layout.dport).offset,
        local_port=(layout.dport if local_dst else layout.sport).offset,
        family=layout.family.offset, family_v4=codes[4], family_v6=codes[6],
        port_big_endian=int(layout.port_order == "big"))

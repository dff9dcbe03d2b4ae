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

"""sockguard's compiled BPF objects: where they are installed, how one is loaded, their layouts.

Every object is loaded the same way (:func:`load`): only the programs asked
for (a program the kernel refuses fails the whole object), its load-time
settings written into ``.rodata`` by name, maps shared with other objects
reused, and the object closed again on any failure.

The settings and the records the programs write are C structs; the Python
side names their fields, and both are checked against the object's own BTF
rather than by position: a setting is written at the offset BTF gives for its
name, and :class:`CStruct` copies of records list their C field names so that
a test (``tests/test_bpf_layouts.py``) can compare each offset and size.
"""

from __future__ import annotations

import errno
import re
import struct
import sys
from collections.abc import Collection, Mapping
from pathlib import Path

import sockguard
from sockguard.core.errors import LibbpfMissingError, NotRootError
from sockguard.kernel import libbpf
from sockguard.kernel.libbpf import BpfError, BpfObject, Btf

__all__ = ["BPF_DIR", "BpfObjectMissingError", "CStruct", "load", "object_path",
           "rodata_image", "struct_fields"]

#: Where the package's build (setup.py, bpf/build.py) installs the ``*.bpf.o`` files.
BPF_DIR = Path(sockguard.__file__).parent / "bpf"

_INTEGER_KINDS = (libbpf.BTF_KIND_INT, libbpf.BTF_KIND_ENUM, libbpf.BTF_KIND_ENUM64)


class BpfObjectMissingError(LibbpfMissingError):
    """A compiled BPF object is not installed (libbpf itself may well be)."""


def object_path(name: str, bpf_dir: Path = BPF_DIR) -> Path:
    """The installed object ``name`` (``sockmap_iter`` -> ``.../bpf/sockmap_iter.bpf.o``)."""
    return bpf_dir / f"{name}.bpf.o"


def load(path: Path, *, programs: Collection[str] | None = None,
         settings: Mapping[str, int] | None = None, reuse: Mapping[str, int] | None = None,
         refused: str | None = None) -> BpfObject:
    """Open, set up and load the object at ``path``; the caller closes it.

    ``programs``: the only programs loaded (None: all of them).  ``settings``:
    ``.rodata`` fields by name (``"cfg.dedup"``), the others keep their
    compiled-in values.  ``reuse``: map name -> fd of an existing map to use
    instead of creating one.  ``refused``: what is being loaded, for callers
    that report EPERM as :class:`NotRootError` ("loading <refused>: ...").
    """
    if not path.is_file():
        raise BpfObjectMissingError(
            f"{path} is missing: reinstall sockguard (pip install .) to build BPF objects")
    try:
        obj = BpfObject(path)
        try:
            _set_up(obj, programs, settings or {}, reuse or {})
            obj.load()
        except BaseException:
            obj.close()
            raise
    except BpfError as exc:
        if refused is not None and exc.errno == errno.EPERM:
            raise NotRootError(f"loading {refused}: {exc.strerror}") from None
        raise
    return obj


def _set_up(obj: BpfObject, programs: Collection[str] | None, settings: Mapping[str, int],
            reuse: Mapping[str, int]) -> None:
    if programs is not None:
        unknown = set(programs) - set(obj.program_names())
        if unknown:
            raise LibbpfMissingError(
                f"{obj.path} has no program {', '.join(sorted(unknown))}: rebuild sockguard")
        for name in obj.program_names():
            obj.program(name).set_autoload(name in programs)
    if settings:
        obj.set_rodata(rodata_image(obj, settings))
    for name, fd in reuse.items():
        obj.reuse_map(name, fd)


def rodata_image(obj: BpfObject, settings: Mapping[str, int]) -> bytes:
    """The object's ``.rodata`` with each named setting written where its BTF puts it.

    A name is a ``.rodata`` variable, then member names: ``"sg_config.key_size"``.
    An unknown name, a field that is not an integer or a value that does not fit
    means Python and the object disagree: LibbpfMissingError ("rebuild sockguard").
    """
    btf = obj.btf()
    image = bytearray(obj.rodata())
    for name, value in settings.items():
        offset, size, type_id = _place(btf, name)
        kind = btf.type(btf.resolve_type(type_id)).kind
        if kind not in _INTEGER_KINDS or offset + size > len(image):
            raise LibbpfMissingError(
                f"{obj.path}: .rodata field {name} is not an integer of the section; "
                "rebuild sockguard")
        try:
            image[offset : offset + size] = int(value).to_bytes(size, sys.byteorder)
        except OverflowError:
            raise LibbpfMissingError(
                f"{obj.path}: {value} does not fit .rodata field {name} ({size} bytes); "
                "rebuild sockguard") from None
    return bytes(image)


def _place(btf: Btf, name: str) -> tuple[int, int, int]:
    """(byte offset in .rodata, size, type id) of the dotted field ``name``."""
    datasec = btf.find(".rodata", libbpf.BTF_KIND_DATASEC)
    if datasec is None:
        raise LibbpfMissingError(f"{btf.path} has no .rodata: rebuild sockguard")
    first, *rest = name.split(".")
    fields = {m.name: m for m in btf.type(datasec).members}
    if first not in fields:
        raise LibbpfMissingError(f"{btf.path}: no .rodata setting {name}; rebuild sockguard")
    offset, type_id = fields[first].bit_offset // 8, btf.type(fields[first].type_id).ref
    for part in rest:
        members = {m.name: m for m in btf.type(btf.resolve_type(type_id)).members}
        if part not in members:
            raise LibbpfMissingError(f"{btf.path}: no .rodata setting {name}; rebuild sockguard")
        offset += members[part].bit_offset // 8
        type_id = members[part].type_id
    return offset, btf.resolve_size(type_id), type_id


def struct_fields(btf: Btf, name: str) -> list[tuple[str, int, int]]:
    """(field name, byte offset, size) of each member of the C struct ``name`` in ``btf``."""
    type_id = btf.find(name, libbpf.BTF_KIND_STRUCT)
    if type_id is None:
        raise LibbpfMissingError(f"{btf.path} has no struct {name}: rebuild sockguard")
    return [(m.name, m.bit_offset // 8, btf.resolve_size(m.type_id))
            for m in btf.type(type_id).members]


_ITEM = re.compile(r"(\d*)([xcbB?hHiIlLqQnNefdspP])")


class CStruct(struct.Struct):
    """A Python copy of a C struct: a ``struct`` format and the C name of each field.

    One name per format item, padding (``x``) left out; an item with a count
    (``16s``, ``8Q``) is one C array.  :meth:`fields` gives each field's
    offset and size for comparison with the object's BTF.
    """

    def __init__(self, c_name: str, fmt: str, names: str) -> None:
        if fmt[:1] not in ("=", "<"):
            raise ValueError(f"{c_name}: {fmt!r} needs = or <: padding is spelled out")
        super().__init__(fmt)
        self.c_name = c_name
        self.names = tuple(names.split())
        items = [(count, code) for count, code in _ITEM.findall(fmt) if code != "x"]
        if len(items) != len(self.names):
            raise ValueError(f"{c_name}: {len(self.names)} names for {len(items)} fields")

    def fields(self) -> list[tuple[str, int, int]]:
        """(C field name, byte offset, size) of each named field."""
        out: list[tuple[str, int, int]] = []
        order, at, names = self.format[0], 0, iter(self.names)
        for count, code in _ITEM.findall(self.format):
            size = struct.calcsize(f"{order}{count}{code}")
            if code != "x":
                out.append((next(names), at, size))
            at += size
        return out

    def offset(self, name: str) -> int:
        """The byte offset of the field ``name``."""
        return next(at for field, at, _size in self.fields() if field == name)

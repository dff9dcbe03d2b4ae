"""Every Python copy of a BPF object's C struct, and every load-time setting, against its BTF.

The objects' BTF is read from the built files (open, no load: no root), so
editing a C struct without its Python copy fails here, not on a node.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sockguard.core.errors import LibbpfMissingError
from sockguard.core.layout import CILIUM, kernel_form
from sockguard.kernel import bpf_object, libbpf, recvsyms, sockmap_iter, task_owners, tcp_iter
from sockguard.kernel.bpf_object import BpfObjectMissingError, CStruct
from sockguard.kernel.libbpf import BpfObject
from sockguard.trace import events, tracer, watched

TRACE_OBJECTS = ("trace_sockhash", "trace_recvpath", "trace_lifecycle", "trace_reset")

#: Each Python layout and the objects whose BTF holds its C struct.
LAYOUTS: list[tuple[CStruct, tuple[str, ...]]] = [
    (sockmap_iter.RECORD, ("sockmap_iter", "sockhash_lookup")),
    (tcp_iter.RECORD, ("tcp_iter",)),
    (task_owners.RECORD, ("task_owners",)),
    (recvsyms.CONFIG, ("sockmap_iter", "sockhash_lookup", "tcp_iter")),
    (events.EVENT, TRACE_OBJECTS),
    (watched.PARKED, TRACE_OBJECTS),
    (watched._KEY_WORDS, TRACE_OBJECTS),
]


@contextmanager
def _opened(name: str) -> Iterator[BpfObject]:
    path = bpf_object.object_path(name)
    if not path.is_file():
        pytest.skip(f"{path} not built (pip install -e .)")
    with BpfObject(path) as obj:
        yield obj


@pytest.mark.parametrize(("layout", "obj_name"),
                         [(layout, name) for layout, names in LAYOUTS for name in names],
                         ids=lambda v: v.c_name if isinstance(v, CStruct) else v)
def test_python_layout_matches_the_objects_btf_field_by_field(layout: CStruct,
                                                              obj_name: str) -> None:
    with _opened(obj_name) as obj:
        btf = obj.btf()
        c_fields = bpf_object.struct_fields(btf, layout.c_name)
        struct_id = btf.find(layout.c_name, libbpf.BTF_KIND_STRUCT)
        assert struct_id is not None
        assert btf.resolve_size(struct_id) == layout.size
        py = {name: (offset, size) for name, offset, size in layout.fields()}
        c = {name: (offset, size) for name, offset, size in c_fields}
        for name, place in py.items():
            assert c.get(name) == place, f"{layout.c_name}.{name}: Python {place}, C {c.get(name)}"
        unread = [name for name in c if name not in py and not name.lstrip("_").startswith("pad")]
        assert not unread, f"{layout.c_name}: C fields the Python copy lacks: {unread}"


@pytest.mark.parametrize("obj_name", TRACE_OBJECTS)
@pytest.mark.parametrize("options", [tracer.TracerOptions(), tracer.daemon_options(),
                                     tracer.TracerOptions(all_states=True, every_recv=True)])
def test_every_tracer_setting_is_a_field_of_its_object(obj_name: str,
                                                       options: tracer.TracerOptions) -> None:
    settings = tracer.Tracer(lambda _event: None, options)._settings(obj_name)
    with _opened(obj_name) as obj:
        assert len(bpf_object.rodata_image(obj, settings)) == len(obj.rodata())


@pytest.mark.parametrize("obj_name", ["sockmap_iter", "sockhash_lookup", "tcp_iter"])
def test_config_settings_land_where_struct_sg_config_has_them(obj_name: str) -> None:
    with _opened(obj_name) as obj:
        settings = dict.fromkeys(recvsyms.config(44, kernel_form(CILIUM)), 0)
        settings.update({"sg_config.tcp_bpf_recvmsg": 0x1122, "sg_config.key_size": 44,
                         "sg_config.judge": 1})
        image = bpf_object.rodata_image(obj, settings)
        assert image == recvsyms.CONFIG.pack(0, 0x1122, 0, 44, 1, bytes(8))


def test_recvpath_settings_by_name_are_where_the_struct_had_them() -> None:
    with _opened("trace_recvpath") as obj:
        image = bpf_object.rodata_image(obj, {"cfg.only_fn": 0xFFFFFFFF81000800, "cfg.dedup": 0,
                                              "cfg.filter_watched": 1})
        assert image == (0xFFFFFFFF81000800).to_bytes(8, "little") + bytes([0, 1]) + bytes(6)


@pytest.mark.parametrize(("settings", "why"), [
    ({"cfg.no_such_field": 1}, "no .rodata setting cfg.no_such_field"),
    ({"nothing": 1}, "no .rodata setting nothing"),
    ({"cfg.dedup": 256}, "does not fit .rodata field cfg.dedup (1 bytes)"),
    ({"cfg._pad": 1}, "is not an integer"),
])
def test_a_setting_the_object_does_not_have_asks_for_a_rebuild(settings: dict[str, int],
                                                               why: str) -> None:
    with _opened("trace_recvpath") as obj:
        with pytest.raises(LibbpfMissingError) as exc:
            bpf_object.rodata_image(obj, settings)
        assert why in str(exc.value) and "rebuild sockguard" in str(exc.value)


def test_a_missing_object_says_how_to_build_it(tmp_path: Path) -> None:
    path = tmp_path / "gone.bpf.o"
    with pytest.raises(BpfObjectMissingError) as exc:
        bpf_object.load(path)
    assert str(exc.value) == (f"{path} is missing: reinstall sockguard (pip install .) "
                              "to build BPF objects")


def test_an_unknown_program_asks_for_a_rebuild() -> None:
    path = bpf_object.object_path("probe_caps")
    if not path.is_file():
        pytest.skip(f"{path} not built (pip install -e .)")
    with pytest.raises(LibbpfMissingError, match="no program nope: rebuild sockguard"):
        bpf_object.load(path, programs=("nope",))


def test_a_layout_names_every_field_of_its_format() -> None:
    with pytest.raises(ValueError, match="2 names for 3 fields"):
        CStruct("x", "=BHI", "a b")
    with pytest.raises(ValueError, match="padding is spelled out"):
        CStruct("x", "BHI", "a b c")
    assert CStruct("x", "=B3xI8Q", "a b c").fields() == [("a", 0, 1), ("b", 4, 4), ("c", 8, 64)]

"""The one cleaning loop (``remediation.clean_each_map``) over several maps, without root.

Why: ``sockguard clean`` and the daemon drive the same loop, so its promises
are checked once here with stand-ins for the maps and sock_diag: one delete
budget across maps, a failing map contained and named in its result, the stop
flag obeyed, the heartbeat called per map.  tests/test_fail_closed.py runs it
on a real map unloaded mid-way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import ip_address
from types import TracebackType

import pytest

from sockguard.core.audit import AuditResult
from sockguard.core.errors import MapGoneError
from sockguard.core.layout import CILIUM, decode, key_for_socket
from sockguard.core.model import Endpoint, Finding, Kind, LiveSocket, MapEntry, MapInfo, Tuple4
from sockguard.kernel import remediation
from sockguard.kernel.remediation import Refusal, clean_each_map, deletions

MAPS = [MapInfo(i, f"sg_loop{i}", "sockhash", 44, 4, 64) for i in (1, 2, 3)]


def _finding(info: MapInfo, n: int) -> Finding:
    t = Tuple4(4, Endpoint(ip_address("10.0.1.2"), 8080),
               Endpoint(ip_address(f"10.0.{info.id}.3"), 40000 + n))
    raw = key_for_socket(CILIUM, t)
    return Finding(Kind.STALE, info, MapEntry(raw.hex(), decode(CILIUM, raw)), "why",
                   confirmed=True)


@dataclass
class Handle:
    info: MapInfo
    deleted: list[bytes] = field(default_factory=list)

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None

    def contains(self, raw: bytes) -> bool:
        return True

    def lookup_cookie(self, raw: bytes) -> int | None:
        return None

    def entry_socket(self, raw: bytes) -> None:
        raise MapGoneError("no entry source in this stand-in")

    def delete(self, raw: bytes) -> bool:
        self.deleted.append(raw)
        return True


class Probe:
    complete = True
    unreadable: tuple[str, ...] = ()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def owner(self, t: Tuple4) -> LiveSocket | None:
        return None


@pytest.fixture
def handles(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[int, Handle]]:
    """Map 2 cannot be opened (unloaded since the audit); the others can."""
    opened: dict[int, Handle] = {}

    def open_map(info: MapInfo) -> Handle:
        if info.id == 2:
            raise MapGoneError(f"map {info.name} (id {info.id}) no longer exists")
        return opened.setdefault(info.id, Handle(info))

    monkeypatch.setattr(remediation, "open_map", open_map)
    monkeypatch.setattr(remediation, "OwnerProbe", Probe)
    yield opened


def _audit(per_map: int = 2) -> list[AuditResult]:
    return [AuditResult(m, per_map, [_finding(m, n) for n in range(per_map)]) for m in MAPS]


def test_a_failing_map_is_contained_and_named_in_its_result(handles: dict[int, Handle]) -> None:
    beats: list[int] = []
    cleaned = clean_each_map(_audit(), apply=True, progress=lambda: beats.append(1))
    assert [(c.map.id, c.error) for c in cleaned] == [
        (1, None), (2, "map sg_loop2 (id 2) no longer exists"), (3, None)]
    assert [d.outcome for d in cleaned[1].deletions] == ["error", "error"]
    assert all(d.refusal is Refusal.ERROR for d in cleaned[1].deletions)
    assert [len(h.deleted) for h in handles.values()] == [2, 2]
    assert len(beats) == 3  # the daemon's heartbeat, once per map
    assert len(deletions(cleaned)) == 6


def test_one_budget_spans_every_map(handles: dict[int, Handle]) -> None:
    cleaned = clean_each_map(_audit(), apply=True, max_deletes=3)
    assert [[d.outcome for d in c.deletions] for c in cleaned] == [
        ["deleted", "deleted"], ["error", "error"], ["deleted", "skipped-cap"]]
    assert [c.spent for c in cleaned] == [2, 0, 1]


def test_a_dry_run_spends_the_budget_as_the_real_one_would(handles: dict[int, Handle]) -> None:
    cleaned = clean_each_map(_audit(), apply=False, max_deletes=3)
    assert [d.outcome for d in deletions(cleaned)] == [
        "would-delete", "would-delete", "error", "error", "would-delete", "skipped-cap"]
    assert all(not h.deleted for h in handles.values())


def test_stopping_ends_the_deletes_in_every_map(handles: dict[int, Handle]) -> None:
    calls: list[int] = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 1  # SIGTERM after the first delete

    cleaned = clean_each_map(_audit(), apply=True, stop=stop)
    assert [d.outcome for d in deletions(cleaned)] == [
        "deleted", "skipped-stop", "error", "error", "skipped-stop", "skipped-stop"]
    assert sum(len(h.deleted) for h in handles.values()) == 1
    assert all(c.error is None for c in cleaned if c.map.id != 2)


def test_nothing_bad_opens_nothing(handles: dict[int, Handle]) -> None:
    assert clean_each_map(_audit(per_map=0), apply=True) == []
    assert handles == {}

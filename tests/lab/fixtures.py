"""pytest fixtures for the lab (imported by tests/conftest.py).

``lab_object`` compiles ``cilium_lab.bpf.c`` once per session (clang takes
most of a second); ``lab`` then builds a fresh world per test, which is cheap
(tens of milliseconds: a cgroup, three netns, one object load), so tests
never share map entries, counters or sockets.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .world import Lab, build_lab_object, lab_unavailable_reason


@pytest.fixture(scope="session")
def lab_object(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The compiled lab BPF object; skips (with the reason) when the lab cannot run."""
    reason = lab_unavailable_reason()
    if reason is not None:
        pytest.skip(f"kernel lab unavailable: {reason}")
    return build_lab_object(tmp_path_factory.mktemp("lab-bpf"))


@pytest.fixture
def lab(lab_object: Path) -> Iterator[Lab]:
    """A fresh lab (child cgroup, node + 2 pods, sockops + sk_msg linked), torn down after."""
    with Lab(pods=2, obj_path=lab_object) as world:
        yield world


@pytest.fixture
def lab3(lab_object: Path) -> Iterator[Lab]:
    """Like ``lab`` with three pods."""
    with Lab(pods=3, obj_path=lab_object) as world:
        yield world

"""A short fault-injection run (benchmarks/fault_injection.py) as a test.

`sockguard run` with remediation on, while namespaces vanish, a pod's netns name
is deleted under its live sockets, the daemon runs out of fds, the map is unpinned
and re-pinned, broken configs are reloaded and SIGTERM lands at random moments:
no live entry may be deleted, and every injected stale entry must be gone once
the faults stop.  The long run and its figures: benchmarks/README.md.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import bpf_skip_reason

pytestmark = pytest.mark.kernel

HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "fault_injection.py"


def _harness():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("sockguard_fault_injection", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("seed", [7, 2026])
def test_faults_with_remediation_on_delete_no_live_entry(seed: int) -> None:
    reason = bpf_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    if shutil.which("clang") is None:
        pytest.skip("clang not installed: cannot build the lab's sockops program")
    report = _harness().run(duration=15, seed=seed)
    assert report.live_entries_deleted == 0, report
    assert report.live_entry_missing_checks == 0, report
    assert report.connections_still_flowing == report.live_connections, report
    assert sum(report.faults.values()) >= 10, report
    assert report.stale_deleted > 0, report  # remediation really worked under the faults
    assert report.stale_left_after_quiet == 0, report
    # Every SIGTERM is a clean stop: exit 0, or the default action while the
    # interpreter was still starting (before sockguard's handlers could exist).
    assert not report.sigterm_unclean, "\n\n".join(report.sigterm_unclean)

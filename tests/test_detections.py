"""The tracer's detections are one registry: each consumer derives its list from it, and a
detection is decided by its entry alone (first variant the probe allows, else why not)."""

from __future__ import annotations

from sockguard.kernel.capabilities import FEATURE_ORDER, Capabilities, Feature
from sockguard.service import metrics
from sockguard.trace import detections
from sockguard.trace.detections import (
    PROGRAMS,
    REGISTRY,
    TRACER_DETECTIONS,
    Spec,
    Variant,
    plan,
    variant_feature,
)


def caps(**available: bool) -> Capabilities:
    return Capabilities({n: Feature(n, available.get(n, True), f"{n} said so")
                         for n in FEATURE_ORDER})


def test_every_consumer_lists_the_registrys_detections() -> None:
    names = tuple(spec.name for spec in REGISTRY)
    assert names == TRACER_DETECTIONS
    assert names == metrics.DETECTIONS  # sockguard_detection_active's label values
    assert tuple(plan(caps()))[:len(names)] == names  # doctor and the tracer
    assert {v.split(":")[0] for variants in PROGRAMS.values() for v in variants} == {
        spec.name for spec in REGISTRY if spec.variants}
    for spec in REGISTRY:
        for v in spec.variants:
            assert PROGRAMS[spec.obj or ""][f"{spec.name}:{v.via}"] == v.programs
            assert variant_feature(f"{spec.name}:{v.via}") == v.needs


SPEC = Spec("example", "an example detection", "trace_example",
            (Variant("tp_btf", ("a_tp_btf",), "tp_btf/example", feature="tp_btf_sock"),
             Variant("raw_tp", ("a_raw_tp",), "raw_tp/example")))


def test_a_detection_takes_the_first_variant_the_probe_allows() -> None:
    got = detections._decide(SPEC, caps())
    assert (got.active, got.via, got.reason) == (True, "tp_btf", "tp_btf/example")
    got = detections._decide(SPEC, caps(tp_btf_sock=False))
    assert (got.active, got.via, got.reason) == (True, "raw_tp", "raw_tp/example")


def test_a_detection_no_variant_can_run_says_each_variants_reason() -> None:
    got = detections._decide(SPEC, caps(tp_btf_sock=False, raw_tp=False))
    assert not got.active and got.via is None
    assert got.reason == ("needs tp_btf/example (tp_btf_sock said so) or raw_tp/example "
                          "(raw_tp said so)")


def test_without_kallsyms_a_detection_that_needs_it_does_not_run() -> None:
    spec = Spec("example", "needs addresses", "trace_example",
                (Variant("tp_btf", ("a",), "tp_btf/example"),), kallsyms="required")
    got = detections._decide(spec, caps(kallsyms=False))
    assert not got.active and got.reason == "kallsyms said so"


def test_without_a_ring_buffer_no_tracer_detection_runs_and_the_audit_still_does() -> None:
    got = plan(caps(ringbuf=False))
    assert not any(got[name].active for name in TRACER_DETECTIONS)
    assert all(got[name].reason == "ringbuf said so" for name in TRACER_DETECTIONS)
    assert "shadowing" in got

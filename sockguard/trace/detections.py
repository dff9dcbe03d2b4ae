"""The tracer's detections, one registry entry each, and the plan of what runs here.

A detection is what sockguard can notice in the kernel as it happens: its
description (``doctor``, ``sockguard_detection_active``), the BPF object that
holds its programs, and its variants in order of preference — the program
type (``via``), the probed feature that decides it, the programs to attach
and where they attach.  :func:`plan` takes the first variant the capability
probe allows, or says why none can run.  A new detection is one :data:`REGISTRY`
entry and its ``bpf/trace_*.bpf.c`` programs (and a ``Meaning`` in
:mod:`sockguard.trace.events` if its events say something about the maps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sockguard.kernel import kallsyms
from sockguard.kernel.capabilities import Capabilities, Detection, probe, shadowing_detection


@dataclass(frozen=True)
class Variant:
    """One way to run a detection: a program type and the programs of that type."""

    via: str                    # the program type: "kprobe", "fentry", "tp_btf", "raw_tp"
    programs: tuple[str, ...]   # in the detection's object
    attaches: str               # where, in words ("kprobe on sock_hash_update_common")
    feature: str = ""           # the probed feature that decides it ("" : ``via`` itself)

    @property
    def needs(self) -> str:
        return self.feature or self.via


@dataclass(frozen=True)
class Spec:
    """A detection: what it notices, its object and variants, and what it needs besides.

    ``symbol``: a kernel function the programs attach to, which kallsyms must
    name once.  ``kallsyms``: "required" (the programs need addresses from it)
    or "names" (it runs without, but names less).  ``decide``: a detection
    with no programs of its own decides from the others (collision).
    """

    name: str
    description: str
    obj: str | None = None
    variants: tuple[Variant, ...] = ()
    symbol: str | None = None
    kallsyms: str = ""
    decide: Callable[[Capabilities, dict[str, Detection]], Detection] | None = None


def _hook(symbol: str, kprobe: tuple[str, ...], fentry: tuple[str, ...]) -> tuple[Variant, ...]:
    return (Variant("kprobe", kprobe, f"kprobe on {symbol}"),
            Variant("fentry", fentry, f"fentry/fexit on {symbol}"))


def _collision(caps: Capabilities, decided: dict[str, Detection]) -> Detection:
    """At ESTABLISHED (lifecycle), which socket the key's entry points to: tc lookup first."""
    desc, life = COLLISION.description, decided["lifecycle"]
    if not life.active:
        return Detection("collision", desc, False, None,
                         f"needs the lifecycle tracepoints: {life.reason}")
    where = f"inet_sock_set_state ESTABLISHED ({life.via})"
    if caps.ok("tc_lookup"):
        return Detection("collision", desc, True, "tc lookup",
                         f"{where}; the entry's socket by the tc lookup (BPF_PROG_TEST_RUN)")
    if caps.ok("iter_sockmap"):
        return Detection("collision", desc, True, "iter/sockmap",
                         f"{where}; the entry's socket by the sockmap iterator (tc lookup: "
                         f"{caps['tc_lookup'].reason})")
    return Detection("collision", desc, False, None,
                     "cannot tell which socket an entry points to: tc lookup: "
                     f"{caps['tc_lookup'].reason}; iter/sockmap: {caps['iter_sockmap'].reason}")


COLLISION = Spec(
    "collision",
    "a connection whose key's entry points to another socket when it becomes established "
    "(a stale key: its payload goes there), before any payload",
    decide=_collision)

#: Every tracer detection, in the order ``doctor`` and the metrics list them.
REGISTRY: tuple[Spec, ...] = (
    Spec("update_failures",
         "sockhash inserts that fail (EEXIST: a stale key collides), as they happen",
         "trace_sockhash",
         _hook("sock_hash_update_common", ("update_kprobe", "update_kretprobe"),
               ("update_fexit",)),
         symbol="sock_hash_update_common"),
    Spec("psock_drops",
         "psock drops with their caller (a failed update vs. a normal close)",
         "trace_sockhash", _hook("sk_psock_drop", ("drop_kprobe",), ("drop_fentry",)),
         symbol="sk_psock_drop", kallsyms="names"),
    Spec("recv_path",
         "per-socket receive path (tcp_recvmsg vs tcp_bpf_recvmsg); flags a socket "
         "receiving via tcp_recvmsg while its key is in a map",
         "trace_recvpath",
         (Variant("tp_btf", ("recv_tp_btf",), "tp_btf/sock_recv_length"),
          Variant("kprobe", ("recv_kprobe_inet", "recv_kprobe_inet6"),
                  "kprobes on inet_recvmsg/inet6_recvmsg")),
         kallsyms="required"),
    Spec("lifecycle",
         "TCP sockets closing/destroyed: an early audit finds a key left behind within "
         "about a second",
         "trace_lifecycle",
         (Variant("tp_btf", ("state_tp_btf", "destroy_tp_btf"),
                  "tp_btf/inet_sock_set_state and tp_btf/tcp_destroy_sock",
                  feature="tp_btf_sock"),
          Variant("raw_tp", ("state_raw_tp", "destroy_raw_tp"),
                  "raw_tp/inet_sock_set_state and raw_tp/tcp_destroy_sock"))),
    Spec("reset",
         "TCP sockets reset or timed out while their process still holds them (the entry "
         "stays until the fd is closed): the collision check listens again",
         "trace_reset",
         (Variant("tp_btf", ("reset_tp_btf",), "tp_btf/inet_sk_error_report",
                  feature="tp_btf_sock"),
          Variant("raw_tp", ("reset_raw_tp",), "raw_tp/inet_sk_error_report")),
         # the tracepoint's own function: absent where the tracepoint is (before 5.12)
         symbol="__traceiter_inet_sk_error_report"),
    COLLISION,
)

#: The label values of ``sockguard_detection_active``.
TRACER_DETECTIONS = tuple(spec.name for spec in REGISTRY)
#: object -> "detection:via" -> its programs: what the tracer loads and attaches.
PROGRAMS: dict[str, dict[str, tuple[str, ...]]] = {}
for _spec in REGISTRY:
    for _v in _spec.variants:
        assert _spec.obj is not None
        PROGRAMS.setdefault(_spec.obj, {})[f"{_spec.name}:{_v.via}"] = _v.programs
#: "detection:via" -> the probed feature that decides it.
_FEATURES = {f"{s.name}:{v.via}": v.needs for s in REGISTRY for v in s.variants}


def variant_feature(variant: str) -> str:
    """The probed feature that decides whether the tracer uses ``variant``."""
    return _FEATURES.get(variant, variant.split(":")[1])


def _decide(spec: Spec, caps: Capabilities) -> Detection:
    """The first variant of ``spec`` this kernel allows, or why none."""
    if spec.symbol is not None:
        syms = kallsyms.load()
        if syms.usable and syms.address(spec.symbol) is None:
            why = ("is ambiguous in this kernel's kallsyms (two functions of that name)"
                   if spec.symbol in syms.ambiguous else
                   "is not in this kernel's kallsyms (absent, inlined or renamed)")
            return Detection(spec.name, spec.description, False, None, f"{spec.symbol} {why}")
    if spec.kallsyms == "required" and not caps.ok("kallsyms"):
        return Detection(spec.name, spec.description, False, None, caps["kallsyms"].reason)
    for v in spec.variants:
        if caps.ok(v.needs):
            reason = v.attaches
            if spec.kallsyms == "names" and not caps.ok("kallsyms"):
                reason += "; callers unnamed: " + caps["kallsyms"].reason
            return Detection(spec.name, spec.description, True, v.via, reason)
    return Detection(spec.name, spec.description, False, None, "needs " + " or ".join(
        f"{v.attaches} ({caps[v.needs].reason})" for v in spec.variants))


def plan(caps: Capabilities | None = None) -> dict[str, Detection]:
    """Which detections can run here and through which program type, or why not: the
    tracer's (every :data:`REGISTRY` entry) and the audit's ``shadowing``."""
    caps = caps or probe()
    out: dict[str, Detection] = {}
    for spec in REGISTRY:
        out[spec.name] = (spec.decide(caps, out) if spec.decide is not None
                          else _decide(spec, caps))
    if not (caps.ok("ringbuf") and caps.ok("btf")):
        why = caps["ringbuf"].reason if not caps.ok("ringbuf") else caps["btf"].reason
        out = {k: Detection(k, d.description, False, None, why) for k, d in out.items()}
    out["shadowing"] = shadowing_detection(caps)
    return out

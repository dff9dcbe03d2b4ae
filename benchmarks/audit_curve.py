"""The cost curve of `sockguard audit` over map size, socket count and namespaces.

Reuses ``audit_scale.py``'s world and measuring functions. For every ``--netns`` x
``--sockets`` pair it builds one world (a Cilium-shaped sockhash pinned under
``/sys/fs/bpf``, that many established loopback sockets over that many namespaces, one
``ok`` entry per socket up to 65,425, ``--shadowing`` sockets left without one), then for
each ``--entries`` level at most the sockets it holds (largest first; the map is cut down
by deleting the surplus keys, whose sockets stay open) measures in the same run,
``--repeat`` times each:

- ``sockguard audit --map <pin> --json`` end to end as a subprocess (wall time, peak RSS
  from GNU time), on the clean map;
- the same with ``--stale`` (100) stale entries and ``--shadowing`` (10) shadowing
  entries added (two looks + the 0.2 s confirm delay), which are then removed again;
- ``bpftool -j map dump pinned <pin>`` on the clean map, as the baseline beside it.

Each audit document is checked: exactly the ok entries, exactly the injected stale and
shadowing keys.
Everything is torn down on exit, error or Ctrl-C.

    sudo .venv/bin/python benchmarks/audit_curve.py [--netns 1,50] [--sockets 10000,50000,100000]
        [--entries 1000,10000,65435] [--repeat 2] [--json]
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from audit_scale import (
    KEY_SIZE,
    MAX_ENTRIES,
    World,
    check_audit_doc,
    exact_source_missing,
    measure_cmd,
    measure_e2e,
    sockguard_argv,
    stale_keys,
)

from sockguard.kernel import libbpf


def ints(text: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x.strip()]


def cut_map(pin: str, keep: int) -> int:
    """Delete entries until ``keep`` are left; return how many are left."""
    fd = libbpf.obj_get(pin)
    try:
        keys: list[bytes] = []
        key = libbpf.map_get_next_key(fd, None, KEY_SIZE)
        while key is not None:
            keys.append(key)
            key = libbpf.map_get_next_key(fd, key, KEY_SIZE)
        for k in keys[keep:]:
            libbpf.map_delete(fd, k)
        return min(keep, len(keys))
    finally:
        os.close(fd)


def measure_world(world: World, netns: int, levels: list[int], stale_n: int, shadow_n: int,
                  repeat: int, log: Callable[..., None]
                  ) -> tuple[list[dict[str, Any]], list[str]]:
    sg = [*sockguard_argv(), "audit", "--map", world.pin, "--json"]
    stale = stale_keys(stale_n, netns)
    stale_hex = {k.hex() for k in stale}
    points: list[dict[str, Any]] = []
    problems: list[str] = []
    have = world.entries
    for level in levels:
        ok = cut_map(world.pin, level) if level < have else have
        have = ok
        label = f"{netns} netns, {world.sockets} sockets, {ok} entries"
        log(f"  {label} ...")
        clean, doc = measure_e2e("clean", sg, repeat, 0)
        problems.extend(f"{label}, clean: {p}" for p in check_audit_doc(doc, ok, set()))
        src_clean = doc.get("socket_source")
        bt, _ = measure_cmd("bpftool -j", [["bpftool", "-j", "map", "dump", "pinned",
                                             world.pin]], repeat)
        world.command("stale", stale)
        shadow = world.shadow(shadow_n)
        try:
            bad, doc = measure_e2e("stale", sg, repeat, 1)
            problems.extend(f"{label}, stale: {p}" for p in check_audit_doc(
                doc, ok, stale_hex, frozenset(k.hex() for k in shadow)))
            src_stale = doc.get("socket_source")
        finally:
            world.command("unstale", stale)
            world.command("unshadow", shadow)
        points.append({
            "netns": netns, "sockets": world.sockets, "entries": ok,
            "clean": clean.as_dict(), "stale": bad.as_dict(), "bpftool_json": bt.as_dict(),
            "socket_source": {"clean": src_clean, "stale": src_stale},
            "entry_source": (doc.get("entry_source") or {}).get("name"),
            "ratio_clean_to_bpftool": round(clean.median / bt.median, 2),
        })
    return points, problems


def fmt_table(points: list[dict[str, Any]], stale_n: int, shadow_n: int) -> str:
    head = (f"{'netns':>5} {'sockets':>8} {'entries':>8}  {'clean':>8} {'RSS':>5}  "
            f"{f'{stale_n}+{shadow_n} bad':>9} {'RSS':>5}  {'bpftool -j':>10}  "
            f"{'clean/bpftool':>13}  sockets read (stale), entry source")
    lines = [head, "-" * len(head)]
    for p in points:
        c, s, b = p["clean"], p["stale"], p["bpftool_json"]
        lines.append(
            f"{p['netns']:>5} {p['sockets']:>8} {p['entries']:>8}  "
            f"{c['median_s'] * 1e3:>6.0f}ms {c.get('peak_rss_mib', 0):>4.0f}M  "
            f"{s['median_s'] * 1e3:>7.0f}ms {s.get('peak_rss_mib', 0):>4.0f}M  "
            f"{b['median_s'] * 1e3:>8.0f}ms  {p['ratio_clean_to_bpftool']:>12.2f}x  "
            f"{p['socket_source']['stale']}, {p['entry_source']}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--netns", type=ints, default=[1, 50], help="namespace counts (1,50)")
    p.add_argument("--sockets", type=ints, default=[10_000, 50_000, 100_000],
                   help="socket counts (10000,50000,100000)")
    p.add_argument("--entries", type=ints, default=[1000, 10_000, MAX_ENTRIES - 110],
                   help="ok entries (1000,10000,65425); levels above a world's sockets "
                        "become one point with an entry per socket")
    p.add_argument("--stale", type=int, default=100, help="stale entries for the second row")
    p.add_argument("--shadowing", type=int, default=10,
                   help="shadowing entries for the second row (each the key of a socket "
                        "without an entry of its own, pointing at another socket)")
    p.add_argument("--repeat", type=int, default=2, help="runs of each measurement")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    if (min(args.netns) < 1 or min(args.sockets) < 2 or min(args.entries) < 1
            or max(args.entries) + args.stale + args.shadowing > MAX_ENTRIES
            or args.repeat < 1 or args.stale < 1 or args.shadowing < 0):
        p.error(f"netns >= 1, sockets >= 2, entries >= 1, entries + stale + shadowing <= "
                f"{MAX_ENTRIES}, stale >= 1, shadowing >= 0, repeat >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (bpf, netns)", file=sys.stderr)
        return 2
    for tool in ("bpftool", "ip"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 2
    why_not = exact_source_missing()
    if why_not:
        print(why_not, file=sys.stderr)
        return 2
    log: Callable[..., None] = (
        (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json
        else (lambda *a: print(*a, flush=True)))
    worlds: list[World] = []

    def teardown() -> None:
        for w in worlds:
            w.teardown()

    atexit.register(teardown)

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    points: list[dict[str, Any]] = []
    problems: list[str] = []
    builds: list[dict[str, Any]] = []
    try:
        for netns in args.netns:
            for sockets in args.sockets:
                world = World()
                worlds.append(world)
                t0 = time.perf_counter()
                world.build(MAX_ENTRIES, sockets, netns, args.stale + args.shadowing,
                            spare=args.shadowing)
                took = time.perf_counter() - t0
                builds.append({"netns": netns, "sockets": world.sockets,
                               "build_s": round(took, 1)})
                log(f"world: {world.sockets} sockets in {len(world.procs)} workers over "
                    f"{netns} netns, {world.entries} entries ({took:.1f}s to build)")
                levels = sorted({min(e, world.entries) for e in args.entries}, reverse=True)
                pts, probs = measure_world(world, netns, levels, args.stale, args.shadowing,
                                           args.repeat, log)
                points += pts
                problems += probs
                t0 = time.perf_counter()
                world.teardown()
                builds[-1]["teardown_s"] = round(time.perf_counter() - t0, 1)
    except KeyboardInterrupt:
        log("interrupted; tearing down")
        return 130
    finally:
        teardown()
    points.sort(key=lambda p: (p["netns"], p["sockets"], p["entries"]))
    doc = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "repeat": args.repeat, "stale": args.stale, "shadowing": args.shadowing,
        "worlds": builds,
        "points": points, "correct": not problems, "problems": problems,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print()
        print(f"{doc['date']}  kernel {platform.release()}, {os.cpu_count()} cpus; medians of "
              f"{args.repeat} runs; `sockguard audit --json` end to end, wall time and peak RSS")
        print(fmt_table(points, args.stale, args.shadowing))
        print()
        print("correctness: " + ("every audit reported exactly the ok entries and the "
                                 "injected stale and shadowing keys" if not problems
                                 else "; ".join(problems)))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())

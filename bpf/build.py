"""Compile sockguard's CO-RE BPF programs and its one host C file, the native key walk
(stdlib only, used by setup.py and the test lab).

The objects are built once, at package build time, against the running
machine's BTF (``vmlinux.h``).  CO-RE relocations make them portable to other
BTF-enabled kernels, so nodes need neither clang nor kernel headers.

Usage: ``python bpf/build.py [OUT_DIR]`` (default ``bpf/.output``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / ".output"
VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
ARCH_INCLUDE = Path("/usr/include/x86_64-linux-gnu")


class BuildError(RuntimeError):
    """A BPF object could not be built; the message says what to install or fix."""


def _tool(*names: str) -> str:
    """The first of ``names`` found on PATH (clang-14 etc. are accepted as fallbacks)."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise BuildError(f"{names[0]} not found on PATH: install it to build the BPF objects")


def _run(cmd: list[str], what: str) -> bytes:
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise BuildError(f"{what} failed ({' '.join(cmd)}):\n{err}")
    return proc.stdout


def vmlinux_h(output_dir: Path = OUTPUT) -> Path:
    """Generate ``vmlinux.h`` from the running kernel's BTF, once per output dir."""
    header = output_dir / "vmlinux.h"
    if header.is_file() and header.stat().st_size > 0:
        return header
    if not VMLINUX_BTF.exists():
        raise BuildError(f"{VMLINUX_BTF} missing: the kernel has no BTF (CONFIG_DEBUG_INFO_BTF)")
    bpftool = _tool("bpftool")
    data = _run(
        [bpftool, "btf", "dump", "file", str(VMLINUX_BTF), "format", "c"], "bpftool btf dump"
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = header.with_name(f"vmlinux.h.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(header)  # atomic: concurrent builds never see a half-written header
    return header


def compile_one(src: Path | str, out: Path | str, include_dir: Path = OUTPUT) -> Path:
    """Compile one ``*.bpf.c`` into ``out`` and strip DWARF (BTF is kept for CO-RE)."""
    src, out = Path(src), Path(out)
    vmlinux_h(include_dir)
    clang = _tool("clang", "clang-14")
    strip = _tool("llvm-strip", "llvm-strip-14")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    cmd = [
        clang, "-g", "-O2", "-target", "bpf", "-D__TARGET_ARCH_x86",
        "-I", str(include_dir), "-I", str(ARCH_INCLUDE), "-I", str(src.parent),
        "-c", str(src), "-o", str(tmp),
    ]  # fmt: skip
    try:
        _run(cmd, f"clang {src.name}")
        _run([strip, "-g", str(tmp)], f"llvm-strip {tmp.name}")
        tmp.replace(out)  # atomic: a loader never sees a half-written object
    finally:
        tmp.unlink(missing_ok=True)
    return out


def compile_library(src: Path | str, out: Path | str) -> Path:
    """Compile one host C file (``sockguard/kernel/keywalk.c``) into a shared object that
    Python loads with ctypes: no Python headers, so no ABI tag on the wheel."""
    src, out = Path(src), Path(out)
    clang = _tool("clang", "clang-14")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    try:
        _run([clang, "-O2", "-Wall", "-shared", "-fPIC", str(src), "-o", str(tmp)],
             f"clang {src.name}")
        tmp.replace(out)  # atomic: a running process never loads a half-written library
    finally:
        tmp.unlink(missing_ok=True)
    return out


def compile_all(src_dir: Path | str = HERE, out_dir: Path | str = OUTPUT) -> list[Path]:
    """Compile every ``*.bpf.c`` directly in ``src_dir`` (not subdirectories) into ``out_dir``."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    built = []
    for src in sorted(src_dir.glob("*.bpf.c")):
        name = src.name[: -len(".c")]  # foo.bpf.c -> foo.bpf
        built.append(compile_one(src, out_dir / f"{name}.o"))
    return built


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else OUTPUT
    try:
        for path in compile_all(HERE, out):
            print(path)
    except BuildError as exc:
        print(f"build.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

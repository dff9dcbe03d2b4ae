"""Build hook: compile the CO-RE BPF objects in ``bpf/`` and the native key walk
(``sockguard/kernel/keywalk.c``) into the package.

Metadata lives in pyproject.toml; this file only extends ``build_py`` so that
``sockguard/bpf/*.bpf.o`` and ``sockguard/kernel/_keywalk.so`` ship in wheels and
exist in editable installs.  Set SOCKGUARD_SKIP_BPF=1 to build without clang (the
iterator is then reported unavailable at run time, and keys are walked from Python).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

from setuptools import setup  # type: ignore[import-untyped]
from setuptools.command.build_py import build_py  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent


def _bpf_build() -> ModuleType:
    # bpf/build.py is loaded by path: a plain "import build" would find PyPA's build package.
    spec = importlib.util.spec_from_file_location("sockguard_bpf_build", ROOT / "bpf" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithBpf(build_py):  # type: ignore[misc]
    """build_py that also compiles ``bpf/*.bpf.c`` into ``sockguard/bpf/`` and the key walk."""

    def run(self) -> None:
        super().run()
        if os.environ.get("SOCKGUARD_SKIP_BPF"):
            self.announce("SOCKGUARD_SKIP_BPF set: not building BPF objects", level=3)
            return
        bpf = _bpf_build()
        targets = [Path(self.build_lib) / "sockguard" / "bpf"]
        if getattr(self, "editable_mode", False):
            targets.append(ROOT / "sockguard" / "bpf")
        for target in targets:
            try:
                built = bpf.compile_all(ROOT / "bpf", target)
                built.append(bpf.compile_library(ROOT / "sockguard" / "kernel" / "keywalk.c",
                                                 target.parent / "kernel" / "_keywalk.so"))
            except bpf.BuildError as exc:
                raise SystemExit(f"sockguard: building BPF objects failed: {exc}") from None
            for path in built:
                self.announce(f"built {path}", level=3)


setup(cmdclass={"build_py": BuildPyWithBpf})

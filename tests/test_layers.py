"""The floor plan holds: each layer imports only the layers below it (no root needed).

core <- kernel <- trace <- service <- cli.  An import upward (a kernel adapter
reaching into the daemon, the core into libbpf) fails here, lazy ones included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sockguard"
LAYERS = ["core", "kernel", "trace", "service", "cli"]


def _imports(path: Path) -> set[str]:
    """The sockguard layers (or top-level modules) a module imports, at any depth."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "sockguard" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_module_sits_in_a_layer() -> None:
    loose = sorted(p.name for p in PACKAGE.glob("*.py")
                   if p.name not in ("__init__.py", "__main__.py"))
    assert loose == [], f"modules outside the layers: {loose}"
    assert sorted(p.name for p in PACKAGE.iterdir()
                  if p.is_dir() and (p / "__init__.py").exists()) == sorted(LAYERS)


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_only_the_layers_below(layer: str) -> None:
    allowed = set(LAYERS[: LAYERS.index(layer) + 1]) | {"__version__", "bpf"}
    for path in sorted((PACKAGE / layer).glob("*.py")):
        upward = _imports(path) - allowed
        assert not upward, f"{layer}/{path.name} imports {sorted(upward)}"


def test_no_relative_imports() -> None:
    """Absolute imports name the layer, so the rule above can see every one."""
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path.relative_to(PACKAGE)}: relative import"

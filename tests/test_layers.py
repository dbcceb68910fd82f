"""The layers import downwards only: blocks -> tasks -> flows -> deployments."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ABOVE = {"blocks": {"tasks", "flows", "deployments"}, "tasks": {"flows", "deployments"}}


def imported_packages(path: Path) -> set[tuple[int, str]]:
    """(line, top-level package) of every import in the file, those inside functions included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {(node.lineno, alias.name.split(".")[0]) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.lineno, node.module.split(".")[0]))
    return found


def test_the_import_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from tasks.errors import X\n    import flows.backup\n")
    assert imported_packages(module) == {(1, "os"), (4, "tasks"), (5, "flows")}


@pytest.mark.parametrize("layer", sorted(ABOVE))
def test_a_layer_imports_nothing_above_it(layer: str) -> None:
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"no modules under {layer}/"
    upward = [f"{path.relative_to(ROOT)}:{line} imports {package}"
              for path in files for line, package in sorted(imported_packages(path)) if package in ABOVE[layer]]
    assert not upward, "\n".join(upward)

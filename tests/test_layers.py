"""The layers point one way: flen_assets -> flen_io_managers -> flen_resources, and resources is framework-free."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folder -> (its import name, the import names it must never use).
LAYERS = {
    "resources": ("flen_resources", ("flen_assets", "flen_io_managers", "dagster", "dagster_webserver")),
    "io_managers": ("flen_io_managers", ("flen_assets",)),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, including imports inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_no_import_points_up(folder: str):
    _, forbidden = LAYERS[folder]
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {module}"
             for path in sorted((ROOT / folder).rglob("*.py"))
             for line, module in imported_modules(path)
             if module.split(".")[0] in forbidden]
    assert not wrong, "imports that climb a layer:\n" + "\n".join(wrong)


def test_the_walk_sees_function_level_imports(tmp_path: Path):
    sample = tmp_path / "m.py"
    sample.write_text("import os\n\ndef f():\n    from flen_resources.project import Project\n")
    assert (4, "flen_resources.project") in imported_modules(sample)

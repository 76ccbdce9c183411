"""The shape of the package a newcomer relies on: sizes within bounds, every module described
in docs/architecture.md's module table, one door for external commands."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cvmfs_syncd"
MAX_MODULE_LINES = 562
MAX_CLASS_LINES = 437


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_classes_stay_small_enough_to_read_at_once(path: Path) -> None:
    """No module over 562 lines, no class over 437."""
    source = path.read_text(encoding="utf-8")
    assert len(source.splitlines()) <= MAX_MODULE_LINES
    oversized = [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ClassDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES
    ]
    assert not oversized


def _module_table() -> set[str]:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("\n## Modules", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for cell in re.findall(r"^\| ([^|]+) \|", section, re.MULTILINE):
        names.update(re.findall(r"`([^`]+\.py)`", cell))
    return names


def test_every_module_has_a_row_in_the_module_table() -> None:
    """docs/architecture.md names every module of the package, and only existing ones."""
    listed = _module_table()
    present = {str(path.relative_to(PACKAGE)) for path in _modules()}
    assert sorted(present - listed) == []
    assert sorted(listed - present) == []


@pytest.mark.parametrize(
    "path",
    [p for p in _modules() if p.name == "__init__.py"],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_every_folder_says_what_it_owns(path: Path) -> None:
    """Each package's ``__init__`` opens with a docstring naming what the folder owns."""
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert docstring, f"{path.relative_to(ROOT)} has no docstring"

"""Rules of shape that a review would otherwise have to re-check by eye:
small modules, no private attribute read across objects, argparse only in
the command line."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "relay"
MAX_LINES = 600
# The stdlib's own type for a sub-command registry has no public name.
ALLOWED_PRIVATE = {"argparse._SubParsersAction"}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def foreign_private_reads(source: str) -> list[str]:
    """``obj._name`` where ``obj`` is not ``self`` or ``cls``: reading another
    object's private state ties two classes together behind their backs."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            text = ast.unparse(node)
            if text not in ALLOWED_PRIVATE:
                found.append(f"line {node.lineno}: {text}")
    return found


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_shape(path: Path) -> None:
    source = path.read_text()
    assert source.count("\n") <= MAX_LINES, f"{path.name}: split it (over {MAX_LINES} lines)"
    assert not foreign_private_reads(source), foreign_private_reads(source)
    if path.relative_to(PACKAGE).parts[0] != "cli":
        assert "import argparse" not in source, "argparse belongs to relay/cli"


def test_the_private_read_check_has_teeth() -> None:
    source = "class A:\n    def f(self, other):\n        return self._x + other._y + self.hub._z\n"
    assert sorted(foreign_private_reads(source)) == ["line 3: other._y", "line 3: self.hub._z"]

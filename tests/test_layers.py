"""The layers of `relay/` and the one direction imports may run in.

docs/architecture.md draws the same picture; this test is what keeps the
two honest.  Every import of every module is read with `ast` (function-level
imports included), so a shortcut taken in a hurry fails here rather than in
a reviewer's head.
"""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "relay"

# What each layer may import, besides itself and `relay` (the version).
ALLOWED = {
    "core": set(),
    "pki": {"core"},
    "config": {"core"},
    "net": {"core", "pki", "config"},
    "store": {"core", "config"},
    "appliance": {"core", "pki", "config", "net", "store"},
    "hub": {"core", "pki", "config", "net", "store"},
    "runtime": {"core", "pki", "config", "net", "store", "appliance", "hub"},
    "cli": {"core", "pki", "config", "net", "store", "appliance", "hub", "runtime"},
}
# The sans-I/O core is driven by the shells above it: it never does I/O itself.
CORE_FORBIDDEN = {"trio", "sqlite3", "socket", "ssl", "asyncio", "selectors", "subprocess"}


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE)


def layer_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0]


def imports_of(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a module of ``package``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0]
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            if name == "relay":  # `from relay import x` names a sub-package
                found += [(node.lineno, f"relay.{alias.name}") for alias in node.names if alias.name != "__version__"]
    return sorted(found)


def violations(layer: str, imports: list[tuple[int, str]]) -> list[str]:
    wrong = []
    for line, name in imports:
        parts = name.split(".")
        if parts[0] == "relay" and len(parts) > 1:
            target = parts[1]
            if target != layer and target not in ALLOWED[layer]:
                wrong.append(f"line {line}: {name} ({layer} may import {sorted(ALLOWED[layer]) or 'nothing'})")
        elif layer == "core" and parts[0] in CORE_FORBIDDEN:
            wrong.append(f"line {line}: {name} (the core does no I/O)")
    return wrong


def test_every_module_sits_in_a_known_layer() -> None:
    assert {p.name for p in PACKAGE.glob("*.py")} == {"__init__.py", "__main__.py"}
    assert {layer_of(p) for p in modules()} == set(ALLOWED)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_down_the_layers(path: Path) -> None:
    package = ".".join(("relay", *path.relative_to(PACKAGE).parent.parts))
    wrong = violations(layer_of(path), imports_of(path.read_text(), package))
    assert not wrong, f"{path.relative_to(PACKAGE.parent)} imports against the layers:\n" + "\n".join(wrong)


def test_the_checker_sees_imports_against_the_direction() -> None:
    source = ("import trio\nfrom relay.appliance import uplink\nfrom . import wire\n\n"
              "def f():\n    from ..hub import server\n")
    found = imports_of(source, "relay.core")
    assert found == [(1, "trio"), (2, "relay.appliance"), (3, "relay.core"), (6, "relay.hub")]
    assert [w.split(":")[0] for w in violations("core", found)] == ["line 1", "line 2", "line 6"]
    assert violations("hub", [(1, "relay.appliance.uplink")]) and not violations("cli", [(1, "relay.hub.server")])


def test_docs_architecture_names_every_module_and_only_those() -> None:
    """docs/architecture.md names each module as ``floor/`` then ``module.py``
    within that floor's paragraph: the picture a newcomer reads is the tree."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    floors = text.split("## The floors, one by one", 1)[1].split("\n## ", 1)[0]
    named = set()
    for paragraph in floors.split("\n- **`")[1:]:
        floor = paragraph.split("/`", 1)[0]
        named |= {f"{elsewhere or floor}/{name}"
                  for elsewhere, name in re.findall(r"`(?:([a-z]+)/)?([a-z_0-9]+\.py)`", paragraph)}
    on_disk = {str(p.relative_to(PACKAGE)) for p in modules() if p.name != "__init__.py"}
    assert on_disk - named == set(), "modules docs/architecture.md does not name"
    assert named - on_disk == set(), "modules docs/architecture.md names that do not exist"

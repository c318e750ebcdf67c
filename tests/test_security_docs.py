"""docs/security.md names the code and the tests behind each control: every
such citation must still exist in the tree, or the page has stopped being
true.  Code spans are read from the page and resolved with `ast` (nothing is
imported): paths must exist, ``module.name`` / ``Class.method`` must be
defined in relay/, and tests must be defined in tests/."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "security.md"
# Module names of the flat tree before docs/architecture.md's layers: a
# citation still using one points at code that moved.
OLD_MODULES = {"hub_store", "relay_store", "relay_events", "http_server", "http2", "hub", "cli", "uplink",
               "ops_cli", "store", "admin", "config", "sealing_keys"}
# Spans that look dotted but are file names, settings or table columns.
NOT_CODE = re.compile(r"\.(db|py|toml|service|keys|pem|key|md|json|sh)\b|^\[|[\s=/*<>@-]")
SPAN = re.compile(r"`([^`\n]+)`")
TEST_REF = re.compile(r"^(?:(test_\w+)\.py::)?(test_\w+)(?:\[.*\])?$")
DOTTED = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\(.*\))?$")


@cache
def definitions() -> dict[str, dict[str, set[str]]]:
    """For each module (by its file's stem and its package's name) and each
    class of relay/: the names defined at its top level."""
    names: dict[str, dict[str, set[str]]] = {"module": {}, "class": {}}
    for path in sorted((ROOT / "relay").rglob("*.py")):
        tree = ast.parse(path.read_text())
        stem = path.parent.name if path.name == "__init__.py" else path.stem
        top = names["module"].setdefault(stem, set())
        for node in tree.body:
            top |= _bound(node)
            if isinstance(node, ast.ClassDef):
                members = names["class"].setdefault(node.name, set())
                for inner in node.body:
                    members |= _bound(inner)
    return names


def _bound(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return {node.target.id}
    return set()


@cache
def defined_tests() -> dict[str, set[str]]:
    found = {}
    for path in (ROOT / "tests").rglob("test_*.py"):
        tree = ast.parse(path.read_text())
        found[path.stem] = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return found


def resolve(dotted: str) -> str | None:
    """None if ``dotted`` names something defined in relay/ (or is not a
    code citation at all); otherwise why it does not."""
    first, *rest = dotted.split(".")
    names = definitions()
    if first in names["class"]:
        scope = names["class"][first]
    elif first in names["module"]:
        scope = names["module"][first]
        if len(rest) > 1 and rest[0] in names["class"] and rest[0] in scope:
            first, *rest = rest
            scope = names["class"][first]
    elif first in OLD_MODULES:
        return f"{first} is a module name of the old flat tree"
    else:
        return None  # a table column, a field, a setting: not code
    if not rest or rest[0] not in scope:
        return f"{first} defines no {'.'.join(rest) or '(nothing named)'}"
    return None


def _bound_names(path: Path) -> set[str]:
    """Every function, class and method name defined in a file."""
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def citations() -> list[str]:
    return SPAN.findall(DOC.read_text())


def test_every_code_citation_exists() -> None:
    wrong = {}
    for span in citations():
        if span.startswith(("relay/", "systemd/", "tests/", "docs/", "fuzz/")):
            path, _, name = span.split()[0].partition(":")  # `relay/x.py:function` names a definition in it
            if not list(ROOT.glob(path)):
                wrong[span] = "no such file"
            elif name and name not in _bound_names(ROOT / path):
                wrong[span] = f"{path} defines no {name}"
        elif ((match := DOTTED.match(span)) and not NOT_CODE.search(match.group(1))
              and (why := resolve(match.group(1))) is not None):
            wrong[span] = why
    assert wrong == {}


def test_every_test_citation_exists() -> None:
    wrong = []
    for span in citations():
        if re.fullmatch(r"test_\w+\.py", span) and not (ROOT / "tests" / span).exists():
            wrong.append(span)
        if match := TEST_REF.match(span):
            module, name = match.groups()
            where = [module] if module else list(defined_tests())
            if not any(name in defined_tests().get(m, set()) for m in where):
                wrong.append(span)
    assert wrong == []


def test_the_checker_finds_stale_citations() -> None:
    """The resolver itself: a renamed function and an old module name are
    reported, real ones and non-code spans are not."""
    assert resolve("hub_queue.apply_ack") is None
    assert resolve("LocalApi._validate") is None
    assert resolve("server.HubConnection._transaction") is None
    assert resolve("hub_queue.no_such_unit") is not None
    assert resolve("hub_store._accept_one") is not None
    assert resolve("envelope.dest") is None
    assert resolve("routes.InboxDecoder") is None
    assert "cleartext_problems" in _bound_names(ROOT / "relay/config/model.py")
    assert "no_such_function" not in _bound_names(ROOT / "relay/config/model.py")

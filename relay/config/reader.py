"""Reading a TOML configuration file and its fragments, one checked key at a time.

Loading checks everything up front and reports every problem at once, each
naming the file and the key, so that a sysadmin fixes a file in one pass
rather than restarting the daemon once per typo. Unknown keys are errors
too: a misspelt optional key would otherwise be silently ignored. What the
keys are, and what they become, is for the loaders in `relay.config.model`; this
module knows only files, tables and the value types any of them may use.

Fragments: besides ``X.toml`` the reader reads every ``X.d/*.toml`` (in
sorted order of names, dotfiles skipped) and merges them onto it: tables
key by key, a later file's scalar or array replacing an earlier one, arrays
of tables (``[[local_system]]``) put end to end. The Debian package relies
on it: it ships ``/etc/eimis-relay/relay.toml`` with comments only and never
changes it, and the admin's settings live in ``relay.d/``, which the package
does not own, so an upgrade never meets an edited conffile (and never stops
on dpkg's question about it). Each value remembers the file it came from: a
problem names that file, and a relative path in it is relative to its
directory. With no setting anywhere, reading fails with `NotConfigured`.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeGuard, TypeVar


class ConfigError(Exception):
    """A configuration file is unusable; `problems` has one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class NotConfigured(ConfigError):
    """Neither the file nor its fragments hold a single setting: a fresh install.

    Its one problem is a whole sentence saying what to do, meant to be
    printed on its own rather than as one more problem of a file.
    """

    def __init__(self, path: Path, example: str) -> None:
        shipped = Path("/usr/share/doc/eimis-relay") / example  # where the Debian package puts it
        fragments = path.with_suffix(".d")
        super().__init__([
            f"eimis-relay is not configured yet: put your settings in {fragments}/NAME.toml "
            f"(see {shipped if shipped.exists() else example}), "
            f"then run: eimis-relay check-config --config {path}"
        ])


def defines_table(path: str | os.PathLike, name: str) -> bool:
    """Whether the file or one of its fragments has a [name] table; False when
    they cannot be read (loading them then says why)."""
    try:
        return name in ConfigFile(path).root
    except ConfigError:
        return False


class ConfigFile:
    """A configuration file and its fragments being read: where they are, and
    the problems found so far."""

    def __init__(self, path: str | os.PathLike, example: str = "config.example.toml") -> None:
        self.path = Path(path).absolute()
        self.problems: list[str] = []
        self.tables: list[Table] = []
        self.reading = self.path  # the file of the value being parsed: `resolve` is relative to it
        data = _Merged(None)
        unreadable = []
        for file in [self.path, *self._fragments()]:
            try:
                _merge(data, self._parse(file), file)
            except ConfigError as error:
                unreadable += error.problems
        if unreadable:
            raise ConfigError(unreadable)
        if not data:
            raise NotConfigured(self.path, example)
        self.root = Table(self, "", data)

    def _fragments(self) -> list[Path]:
        """X.d/*.toml for X.toml, sorted by name; none when there is no such directory."""
        directory = self.path.with_suffix(".d")
        try:
            names = sorted(entry.name for entry in os.scandir(directory) if entry.is_file())
        except FileNotFoundError:
            return []
        except OSError as error:
            raise ConfigError([f"{directory.name}: cannot read {directory}: {error.strerror or error}"]) from None
        return [directory / name for name in names if name.endswith(".toml") and not name.startswith(".")]

    def _parse(self, path: Path) -> dict[str, Any]:
        name = self.name_of(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            reason = error.strerror or error
            raise ConfigError([f"{name}: cannot read {path}: {reason}"]) from None
        except UnicodeDecodeError:
            raise ConfigError([f"{name}: not UTF-8 text"]) from None
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError([f"{name}: invalid TOML: {error}"]) from None

    def name_of(self, path: Path) -> str:
        """How problems name a file: "relay.toml", or "relay.d/10-site.toml" for a fragment."""
        return path.name if path == self.path else f"{path.parent.name}/{path.name}"

    def problem(self, where: str, message: str, origin: Path | None = None) -> None:
        self.problems.append(f"{self.name_of(origin or self.path)}: {where}: {message}")

    def resolve(self, value: object) -> Path:
        """Parse a path; a relative one is relative to the file it is written in,
        so that a config moves with its files."""
        if isinstance(value, str) and value:
            return self.reading.parent / value
        raise expected("a path", value)

    def finish(self) -> None:
        """Report the keys nobody read, then raise ConfigError if anything was wrong."""
        for table in self.tables:
            for key, value in table.unread():
                table.problem(key, "unknown table" if isinstance(value, dict) else "unknown key")
        if self.problems:
            raise ConfigError(self.problems)


_REQUIRED: Any = object()  # the default of a key that must be present
# What get() returns for a key it reported a problem about: typed as the
# value, since no loader builds anything from a table with problems
# (`table.valid`, `file.finish()` raises ConfigError first).
_REPORTED: Any = None


class Table:
    """Reads the keys of one TOML table, reporting problems under its label, e.g. "[uplink]".

    Keys read are remembered, so that the others can be reported as unknown.
    `valid` turns false once a problem is found in the table: readers then
    skip building an object from it, as the load is going to fail anyway.
    """

    def __init__(self, file: ConfigFile, label: str, data: dict[str, Any], *, present: bool = True) -> None:
        self.file = file
        self.label = label
        self.valid = present
        self._present = present
        self._data = data
        self._read: set[str] = set()
        # Which file each key came from; an absent table's problems go to the first file.
        self.origin: Path = getattr(data, "origin", None) or file.path
        self._origins: dict[str, Path] = getattr(data, "origins", {})
        file.tables.append(self)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def where(self, key: str) -> str:
        return f"{self.label}.{key}" if self.label else f"[{key}]"

    def problem(self, key: str, message: str) -> None:
        """Report a problem with `key` (or "key[2]"), naming the file it came
        from, or for a missing key the file that holds the table."""
        self.file.problem(self.where(key), message, self._origins.get(key.partition("[")[0], self.origin))
        self.valid = False

    def get(self, key: str, parse: Parser[_T], default: _T = _REQUIRED) -> _T:
        """The parsed value of `key`, `default` when absent, or None after reporting a problem."""
        self._read.add(key)
        if key not in self._data:
            # The keys of a missing table are not reported: the table was.
            if default is _REQUIRED and self._present:
                self.problem(key, "missing required key")
            return _REPORTED if default is _REQUIRED else default
        self.file.reading = self._origins.get(key, self.origin)
        try:
            return parse(self._data[key])
        except Invalid as invalid:
            self.problem(key, str(invalid))
            return _REPORTED

    def get_list(
        self, key: str, parse_item: Parser[_T], default: tuple[_T, ...] = _REQUIRED
    ) -> tuple[_T, ...]:
        """Like get, for an array; each bad item is a problem of its own, e.g. "users[2]"."""
        items: list | tuple = self.get(key, _array, default)
        if items is None:
            return _REPORTED
        values = []
        for index, item in enumerate(items):
            try:
                values.append(parse_item(item))
            except Invalid as invalid:
                self.problem(f"{key}[{index}]", str(invalid))
        return tuple(values) if len(values) == len(items) else _REPORTED

    def table(self, key: str, *, required: bool = True) -> Table:
        """A sub-table; an absent optional one reads as empty, so its keys take their defaults."""
        data = self.get(key, _table, _REQUIRED if required else {})
        return Table(self.file, self.where(key), data or {}, present=data is not None)

    def tables(self, key: str) -> list[Table]:
        """The tables of an optional array of tables ([[key]] in TOML)."""
        items: list[dict] = self.get(key, _array_of_tables, []) or []
        # Numbered within their own file, which is the one their problems name.
        return [Table(self.file, f"{self.where(key)}[{_index_in_file(data, index)}]", data)
                for index, data in enumerate(items)]

    def unread(self) -> list[tuple[str, Any]]:
        return [(key, value) for key, value in self._data.items() if key not in self._read]


class _Merged(dict):
    """A table merged from several files: `origins` names the file each key's
    value came from, `origin` the first file that gave the table anything, and
    `index` the position of an item of an array of tables in its own file."""

    def __init__(self, origin: Path | None, index: int | None = None) -> None:
        super().__init__()
        self.origin = origin
        self.origins: dict[str, Path] = {}
        self.index = index


def _merge(into: _Merged, data: dict[str, Any], origin: Path) -> None:
    """Merge one file's `data` onto what the files before it gave."""
    if into.origin is None and data:
        into.origin = origin
    for key, value in data.items():
        old = into.get(key)
        if isinstance(old, _Merged) and isinstance(value, dict):
            _merge(old, value, origin)
        elif _is_tables(old) and _is_tables(value):
            old.extend(_merged(item, origin, index) for index, item in enumerate(value))
        else:
            into[key] = _tagged(value, origin)
            into.origins[key] = origin


def _index_in_file(data: dict[str, Any], index: int) -> int:
    own = getattr(data, "index", None)
    return index if own is None else own


def _is_tables(value: object) -> TypeGuard[list[dict]]:
    return isinstance(value, list) and all(isinstance(item, dict) for item in value)


def _tagged(value: Any, origin: Path) -> Any:
    """`value` with its tables turned into _Merged ones that know `origin`."""
    if isinstance(value, dict):
        return _merged(value, origin)
    if _is_tables(value):
        return [_merged(item, origin, index) for index, item in enumerate(value)]
    return value


def _merged(data: dict[str, Any], origin: Path, index: int | None = None) -> _Merged:
    table = _Merged(origin, index)
    _merge(table, data, origin)
    return table


# Value parsers: each turns a TOML value into a typed one, or raises Invalid
# saying what was expected. The parsers of the relay's own vocabulary
# (domains, addresses, URLs) are in relay.config.

_T = TypeVar("_T")
Parser = Callable[[Any], _T]


class Invalid(Exception):
    """A value is not what its key needs; the message says what was expected."""


def expected(what: str, value: object) -> Invalid:
    return Invalid(f"expected {what}, got {value!r}")


def string(what: str, accept: Callable[[str], object], *, fold_case: bool = False) -> Parser[str]:
    """A parser of strings that `accept` approves; `fold_case` for case-insensitive names."""

    def parse(value: object) -> str:
        if isinstance(value, str):
            text = value.lower() if fold_case else value
            if accept(text):
                return text
        raise expected(what, value)

    return parse


def integer(low: int, high: int | None = None) -> Parser[int]:
    what = f"an integer {low}..{high}" if high is not None else f"an integer >= {low}"

    def parse(value: object) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and low <= value and (high is None or value <= high):
            return value
        raise expected(what, value)

    return parse


def boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise expected("true or false", value)


def seconds(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf:
        return float(value)
    raise expected("seconds > 0", value)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZES = {"": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def duration(value: object) -> float:
    """Seconds, or a string such as "90s", "15m", "12h", "7d"."""
    if isinstance(value, str) and (match := re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", value.strip())):
        total = float(match.group(1)) * _UNITS[match.group(2)]
        if total > 0:
            return total
    elif isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf:
        return float(value)
    raise expected('a duration > 0 (seconds, or a string like "15m", "12h", "7d")', value)


def size(value: object) -> int:
    """Bytes, or a string such as "500MiB", "2GiB", "10GB"."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and (match := re.fullmatch(r"(\d+)\s*([kmg]i?b)?", value.strip().lower())):
        total = int(match.group(1)) * _SIZES[match.group(2) or ""]
        if total > 0:
            return total
    raise expected('a size > 0 (bytes, or a string like "500MiB", "2GiB")', value)


def non_negative(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < math.inf:
        return float(value)
    raise expected("a number >= 0", value)


def fraction(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1:
        return float(value)
    raise expected("a fraction > 0 and <= 1", value)


def _array(value: object) -> Any:  # a list; Any, so that get() takes get_list's tuple default
    if isinstance(value, list):
        return value
    raise expected("an array", value)


def _table(value: object) -> dict:
    if isinstance(value, dict):
        return value
    raise expected("a table", value)


def _array_of_tables(value: object) -> list[dict]:
    if _is_tables(value):
        return value
    raise expected("an array of tables", value)

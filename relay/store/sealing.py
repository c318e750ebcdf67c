"""Encryption at rest: message bodies sealed with AES-256-GCM in the stores.

Theory of operation
-------------------
The key ring is a small file in the state directory (mode 0600, created on
first start): one line per key, ``<id> <base64 key>``, the last line being
the key that seals new data.  Rotation appends a key; older keys stay so
that everything sealed before remains readable.

Writing is done by SQL: `install` registers ``seal(value, context)`` on
the store's connection, so the units of work write ``seal(?, ?)`` and never
handle keys.  Reading is done in Python, row by row: a unit selects the
sealed column and calls `unseal(conn, value, context)`, which returns the
clear value or raises `Unreadable`.  There is deliberately no SQL
``unseal()``: a SQL function cannot fail one row without failing the whole
statement (and the store's group of units with it), and one that returned
NULL instead let a damaged row reach code that never expected NULL (a
``len(None)`` that crash-looped the daemon).  `Unreadable` is one row's
problem, which the caller must handle for that row: fail that message,
drop that queue item, show that the body is unreadable.

The context (a message id, a domain) is the AEAD's associated data: a
sealed body moved to another row no longer opens.  Values written before
encryption existed (plain TEXT) are read as they are.

What this protects: a copied database file or a backup of the store
alone.  It does not protect against whoever can read the key file too
(root, the service account, a copy of the whole state directory or disk):
keep backups of the store apart from the key ring (docs/security.md).
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import secrets
import sqlite3
import struct
from pathlib import Path
from typing import Any, TypeVar, overload

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger(__name__)

MAGIC = b"EIMIS-SEALED-1"
_HEADER = struct.Struct(">HB12s")  # key id, kind (0 text, 1 bytes), nonce
KEY_FILE = "sealing.keys"


class KeyRingError(Exception):
    """The key file is missing, unreadable, exposed or malformed."""


class Unreadable(Exception):
    """A sealed value that cannot be opened: damaged, moved to another row,
    sealed with a key the ring has not got (or with no key ring at all), or
    not of the kind expected.  The message names the row's context and why,
    never the value."""

    def __init__(self, context: str, why: str) -> None:
        super().__init__(f"the sealed value of {context} cannot be opened: {why}")
        self.context = context
        self.why = why


class SealedConnection(sqlite3.Connection):
    """A connection that knows the key ring of its store (`install`), for
    `unseal`.  ``sqlite3.connect(..., factory=SealedConnection)``."""

    ring: KeyRing | None = None


class KeyRing:
    def __init__(self, keys: dict[int, bytes], current: int) -> None:
        self._aead = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self.current = current

    @classmethod
    def load_or_create(cls, path: Path) -> KeyRing:
        """The ring in ``path``, made with one fresh key if there is none yet."""
        if not path.exists():
            _append_key(path, 1)
        return cls.load(path)

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        try:
            mode = path.stat().st_mode
            lines = path.read_text().split()
        except OSError as exc:
            raise KeyRingError(f"{path}: {exc.strerror or exc}") from None
        if mode & 0o077:
            raise KeyRingError(f"{path} is readable by group or others (mode {mode & 0o777:o}): chmod 600 {path}")
        keys: dict[int, bytes] = {}
        try:
            for key_id, encoded in zip(lines[::2], lines[1::2], strict=True):
                key = base64.b64decode(encoded, validate=True)
                if len(key) != 32:
                    raise ValueError
                keys[int(key_id)] = key
        except ValueError:
            raise KeyRingError(f"{path}: not a key ring (lines of '<id> <base64 of 32 bytes>')") from None
        if not keys:
            raise KeyRingError(f"{path}: no key")
        return cls(keys, int(lines[-2]))

    def seal(self, value: str | bytes | None, context: str) -> str | bytes | None:
        if value is None or value == "":
            return value
        kind, data = (0, value.encode()) if isinstance(value, str) else (1, bytes(value))
        nonce = secrets.token_bytes(12)
        sealed = self._aead[self.current].encrypt(nonce, data, context.encode())
        return MAGIC + _HEADER.pack(self.current, kind, nonce) + sealed

    def unseal(self, value: str | bytes, context: str) -> str | bytes:
        """The clear value of a sealed one (a value written before
        encryption at rest is returned as it is); raises `Unreadable`."""
        if not isinstance(value, bytes) or not value.startswith(MAGIC):
            return value
        try:
            key_id, kind, nonce = _HEADER.unpack_from(value, len(MAGIC))
        except struct.error:
            raise Unreadable(context, "truncated header") from None
        aead = self._aead.get(key_id)
        if aead is None:
            raise Unreadable(context, f"sealed with key {key_id}, which this key ring has not got")
        try:
            data = aead.decrypt(nonce, value[len(MAGIC) + _HEADER.size:], context.encode())
        except InvalidTag:
            raise Unreadable(context, "authentication failed (damaged, moved or tampered with)") from None
        if kind == 0:
            try:
                return data.decode()
            except UnicodeDecodeError:
                raise Unreadable(context, "not text") from None
        return data


# What `unseal` opens a value as: bodies are text, the hub's payloads bytes.
Clear = TypeVar("Clear", str, bytes)


def is_sealed(value: object) -> bool:
    return isinstance(value, bytes) and value.startswith(MAGIC)


@overload
def unseal(conn: sqlite3.Connection, value: object, context: str) -> str: ...
@overload
def unseal(conn: sqlite3.Connection, value: object, context: str, kind: type[Clear]) -> Clear: ...
def unseal(conn: sqlite3.Connection, value: object, context: str, kind: type[Any] = str) -> Any:
    """The clear value of a column read on ``conn`` (its store's key ring,
    see `install`): a ``kind`` (``str`` for bodies, ``bytes`` for the hub's
    payloads).  Raises `Unreadable` when it cannot be opened, when it is
    sealed and the connection has no key ring, or when it is not of that
    kind (a damaged row); the error is logged once here, without the value."""
    try:
        if is_sealed(value):
            ring = getattr(conn, "ring", None)
            if ring is None:
                raise Unreadable(context, "sealed, and there is no key ring")
            value = ring.unseal(value, context)
        if not isinstance(value, kind):
            raise Unreadable(context, f"expected {kind.__name__}, found {type(value).__name__}")
    except Unreadable as exc:
        log.error("sealing: %s", exc)
        raise
    return value


def install(conn: sqlite3.Connection, ring: KeyRing | None) -> None:
    """Make ``seal()`` available to SQL on ``conn``, and ``ring`` to
    `unseal` (``conn`` a `SealedConnection`; on another one only values
    that are not sealed can be read).

    Without a ring (tests of the SQL alone) ``seal()`` returns the value as is."""
    if isinstance(conn, SealedConnection):
        conn.ring = ring
    if ring is None:
        conn.create_function("seal", 2, lambda value, context: value, deterministic=True)
    else:
        conn.create_function("seal", 2, ring.seal)


def rotate(path: Path) -> int:
    """Add a new key that seals from now on (after a restart); return its id."""
    ring = KeyRing.load(path)
    _append_key(path, ring.current + 1)
    return ring.current + 1


def _append_key(path: Path, key_id: int) -> None:
    """Append a key and make it durable before anything can be sealed with
    it: the line (fsync of the file) and, for a new ring, its name (fsync of
    the directory).  A key lost in a power cut would leave every body sealed
    with it unreadable."""
    line = f"{key_id} {base64.b64encode(secrets.token_bytes(32)).decode()}\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    sync_directory(path.parent)


def sync_directory(path: Path) -> None:
    """fsync a directory, so that the names just created in it survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("rotate-key", help="add a new key for encryption at rest (old data stays readable)")
    parser.add_argument("--state-dir", type=Path, required=True, metavar="DIR",
                        help=f"the relay's or hub's state directory, holding {KEY_FILE}")
    parser.set_defaults(func=_rotate_command)


def _rotate_command(args: argparse.Namespace) -> int:
    path = args.state_dir / KEY_FILE
    try:
        key_id = rotate(path)
    except KeyRingError as exc:
        print(f"eimis-relay rotate-key: {exc}")
        return 1
    print(f"{path}: key {key_id} added; restart the daemon to seal new data with it")
    return 0

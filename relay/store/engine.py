"""The durable store: one SQLite file, one writer thread, group commit.

Theory of operation
-------------------
Every database operation is a named *unit of work*: a plain function that
takes the `sqlite3.Connection` and returns a value.  Trio tasks hand units to
`Store.run`, which queues them for a single writer thread and waits for the
result.  The thread takes everything queued at that moment, runs the units
in one transaction (each inside its own SAVEPOINT, so one unit's error does
not undo its neighbours) and commits once: units that arrive together share
one fsync.  That is what makes a durable ``202`` cheap.

Reads that need no transaction of their own (the next batch to send, a
page of events) go to `Store.read` instead: read-only connections that see
everything committed and never wait for a group's fsync.

Nothing touches SQLite on the trio thread, and there is one writer, so there
is no lock contention and no ``SQLITE_BUSY`` to retry.  A unit, once queued,
runs to commit or rollback even if the task that queued it is cancelled: a
cancel can lose the *answer*, never half a transaction.

Durability: WAL journal with ``synchronous=FULL`` (every commit is fsynced
before `run` returns).  When SQLite cannot commit (disk full, I/O error,
read-only file) every unit of the group fails with `StoreUnavailable` and the
transaction is rolled back: callers answer 503 and nothing previously
committed is touched.

The schema is versioned with ``PRAGMA user_version``; each migration runs in
its own transaction, so a failed one leaves the database as it was.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from relay.store import sealing
from relay.store.sealing import KeyRing

log = logging.getLogger(__name__)

T = TypeVar("T")
Unit = Callable[[sqlite3.Connection], T]

# Enough units per transaction to amortise the fsync, few enough that one
# group's latency stays in the low milliseconds.
MAX_GROUP = 512


# SQLite's page cache per connection, in KiB (its default is 2,000): the
# writer's is larger, as a backlog draining at thousands a second touches
# more pages than that between two commits; the readers' smaller, as they
# mostly read pages just written (in the OS's cache anyway).  A cache only
# grows as far as it is used; these bound what the store adds to the RSS.
CACHE_KIB = 4 * 1024
READER_CACHE_KIB = 1024

# Read-only connections: two, so that a small read (an urgent message's
# batch, a page of events) need not wait for a large one (500 envelopes).
READERS = 2

# How long a background duty waits before trying a failed unit again.
PATIENCE = 1.0

# TEST ONLY.  The power-cut suite (tests/powercut) sets this variable to "1"
# in a daemon's environment for its negative control: the store then runs
# with synchronous=OFF, never fsyncs, and a power cut loses acknowledged
# messages, which the suite must detect.  Never set it anywhere else.
UNSAFE_NO_FSYNC_FOR_TESTS = "EIMIS_RELAY_TEST_ONLY_UNSAFE_NO_FSYNC"


class StoreUnavailable(Exception):
    """The store could not commit; nothing of the failed group was written."""


class MigrationError(Exception):
    """The schema could not be brought up to date; the failed migration left
    the database as it was (earlier ones of the same call stay applied)."""


@dataclass
class _Job:
    name: str
    fn: Unit[Any]
    urgent: bool = False
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None


_STOP = object()


def connect(path: Path, ring: KeyRing | None = None) -> sqlite3.Connection:
    """Open the database with the durability settings the guarantees rely on,
    and SQL's ``seal()`` and `sealing.unseal` bound to ``ring`` (see `relay.store.sealing`)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        sealing.sync_directory(path.parent)  # SQLite syncs its WAL's name, not the database's
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, factory=sealing.SealedConnection)
    conn.execute("PRAGMA journal_mode=WAL")
    unsafe = os.environ.get(UNSAFE_NO_FSYNC_FOR_TESTS) == "1"
    conn.execute("PRAGMA synchronous=OFF" if unsafe else "PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    sealing.install(conn, ring)
    return conn


def migrate(conn: sqlite3.Connection, migrations: Sequence[Sequence[str]], label: str) -> int:
    """Apply the migrations the database has not seen yet; return the version."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(migrations):
        raise MigrationError(
            f"{label}: database schema version {version} is newer than this software "
            f"understands ({len(migrations)}); refusing to touch it"
        )
    for target, statements in enumerate(migrations[version:], start=version + 1):
        try:
            conn.execute("BEGIN IMMEDIATE")
            for statement in statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={target}")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise MigrationError(f"{label}: migration to schema version {target} failed: {exc}") from exc
        log.info("%s: schema migrated to version %d", label, target)
    return len(migrations)


class Store:
    """A SQLite database served by one writer thread; see the module docstring.

    Use as ``async with Store.open(path, migrations) as store:``.  Leaving the
    block finishes every queued unit, then closes the database.  ``on_commit``
    is called on the writer thread with each group's commit time in seconds
    (metrics): it must be quick and thread-safe.
    """

    def __init__(self, conn: sqlite3.Connection, readers: list[sqlite3.Connection], path: Path,
                 on_commit: Callable[[float], None] | None = None) -> None:
        self.path = path
        self._conn = conn
        self._readers = readers  # the idle ones; each serves one read at a time
        self._reading = trio.CapacityLimiter(len(readers))
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._serve, name=f"store:{path.name}", daemon=True)
        self.commits = 0
        self.commit_seconds = 0.0
        self._on_commit = on_commit
        # Bytes in use (pages not on the free list), refreshed after each
        # commit: what the size ceiling is compared with.
        self.used_bytes = _used_bytes(conn)

    @classmethod
    def open(cls, path: Path, migrations: Sequence[Sequence[str]], ring: KeyRing | None = None, *,
             on_commit: Callable[[float], None] | None = None) -> _StoreContext:
        return _StoreContext(cls, path, migrations, ring, on_commit)

    @property
    def is_open(self) -> bool:
        """Whether the writer thread is there to take units (readiness)."""
        return self._thread.is_alive()

    def start(self) -> None:
        """Start the writer thread (`Store.open` does, once the database is ready)."""
        self._thread.start()

    async def close(self) -> None:
        """Finish every queued unit and close the database (`Store.open`'s
        exit does, shielded: a cancel must not leave the writer running)."""
        # Readers first: the last connection to close checkpoints the WAL
        # into the database, and only the writer can.
        for _ in range(READERS):  # every read finished; none may start
            await self._reading.acquire_on_behalf_of(object())
        for reader in self._readers:
            reader.close()
        self._queue.put(_STOP)
        await trio.to_thread.run_sync(self._thread.join)

    async def run(self, name: str, fn: Unit[T], *, urgent: bool = False) -> T:
        """Run ``fn(conn)`` in the next group transaction and return its result.

        An ``urgent`` unit (one carrying an urgent message) does not share
        its group with the others queued with it: they are committed as a
        group of their own, right after, so that the urgent one waits for
        at most the unit running when it arrived, not for hundreds queued.

        Raises whatever ``fn`` raised (its savepoint rolled back), or
        `StoreUnavailable` when the group could not be committed.
        """
        job = _Job(name, fn, urgent)
        self._queue.put(job)
        await job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    async def read(self, name: str, fn: Unit[T]) -> T:
        """Run a read-only ``fn(conn)`` on one of the store's reading
        connections and return its result.

        It sees everything committed, in one snapshot, and does not queue
        behind the writer's group and its fsync: a message's trip through
        three stores has a read at each of them, and each used to wait for
        a group of submissions to commit.  ``fn`` cannot write (the
        connection is read-only).
        Raises what ``fn`` raised, or `StoreUnavailable` when SQLite cannot
        read.
        """
        async with self._reading:
            reader = self._readers.pop()
            try:
                return await trio.to_thread.run_sync(self._read, reader, name, fn)
            finally:
                self._readers.append(reader)

    @staticmethod
    def _read(reader: sqlite3.Connection, name: str, fn: Unit[T]) -> T:
        try:
            reader.execute("BEGIN")
            try:
                return fn(reader)
            finally:
                reader.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            log.error("store: could not read (%s): %s", name, exc)
            raise StoreUnavailable(f"store cannot read: {exc}") from None

    async def run_patiently(self, name: str, fn: Unit[T]) -> T:
        """`run`, waiting out `StoreUnavailable`: for background duties,
        which have no client to answer 503 to and must not die of a full disk."""
        return await _patiently(self.run, name, fn)

    async def read_patiently(self, name: str, fn: Unit[T]) -> T:
        """`read`, waiting out `StoreUnavailable` (see `run_patiently`)."""
        return await _patiently(self.read, name, fn)

    # -- the writer thread ------------------------------------------------------

    def _serve(self) -> None:
        stopping = False
        while not stopping:
            group: list[_Job] = []
            item = self._queue.get()
            while True:
                if item is _STOP:
                    stopping = True
                    break
                assert isinstance(item, _Job)  # the queue holds jobs and _STOP
                group.append(item)
                if len(group) >= MAX_GROUP:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            urgent = [job for job in group if job.urgent]
            if urgent and len(urgent) < len(group):
                self._commit_group(urgent)
                group = [job for job in group if not job.urgent]
            if group:
                self._commit_group(group)
        self._conn.close()

    def _commit_group(self, group: list[_Job]) -> None:
        conn = self._conn
        started = time.perf_counter()
        try:
            if conn.in_transaction:  # left open by a failed ROLLBACK, below
                conn.execute("ROLLBACK")
            conn.execute("BEGIN IMMEDIATE")
            for job in group:
                conn.execute("SAVEPOINT unit")
                try:
                    job.result = job.fn(conn)
                except sqlite3.OperationalError:
                    raise  # disk full, I/O error...: the whole group fails
                except Exception as exc:  # noqa: BLE001 -- the unit's own failure, e.g. a constraint
                    job.error = exc
                    conn.execute("ROLLBACK TO unit")
                conn.execute("RELEASE unit")
            conn.execute("COMMIT")
            self.used_bytes = _used_bytes(conn)
        except sqlite3.Error as exc:
            log.error("store: could not commit %d unit(s) (%s): %s", len(group), group[0].name, exc)
            for job in group:  # one exception each: every caller raises its own
                job.result, job.error = None, StoreUnavailable(f"store cannot commit: {exc}")
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error as rollback_exc:
                    # Must not kill the thread (every caller would wait forever);
                    # the next group retries the rollback before it begins.
                    log.error("store: rollback failed: %s", rollback_exc)
        elapsed = time.perf_counter() - started
        self.commits += 1
        self.commit_seconds += elapsed
        if self._on_commit is not None:
            self._on_commit(elapsed)
        try:
            self._token.run_sync_soon(_wake, group)
        except trio.RunFinishedError:
            pass


def backup(source: Path, dest: Path) -> int:
    """Copy the database at ``source`` to a new file ``dest``, consistently,
    even while a daemon writes to it; return the copy's size in bytes.

    SQLite's online backup API from a separate read-only connection: in WAL
    mode a reader sees one committed snapshot and never blocks the writer,
    and copying every page in a single step keeps that one snapshot.  The
    copy is written beside ``dest``, checked (``PRAGMA integrity_check``),
    fsynced, then renamed into place, so ``dest`` is never half a backup.
    Raises `FileExistsError` rather than replace an existing ``dest``, and
    `sqlite3.Error` when the source cannot be read or the copy is damaged.
    """
    if dest.exists():
        raise FileExistsError(f"{dest} already exists; choose a new name")
    partial = dest.with_name(dest.name + ".partial")
    partial.unlink(missing_ok=True)
    os.close(os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    try:
        reader = sqlite3.connect(f"{source.absolute().as_uri()}?mode=ro", uri=True)
        try:
            copy = sqlite3.connect(partial)
            try:
                reader.backup(copy)
                # The copy leaves WAL mode: a backup is one self-contained file.
                copy.execute("PRAGMA journal_mode=DELETE")
                verdict = copy.execute("PRAGMA integrity_check").fetchone()[0]
            finally:
                copy.close()
        finally:
            reader.close()
        if verdict != "ok":
            raise sqlite3.DatabaseError(f"the copy failed its integrity check: {verdict}")
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(partial, dest)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return dest.stat().st_size


def _used_bytes(conn: sqlite3.Connection) -> int:
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
    return pages * page_size


async def _patiently(attempt: Callable[[str, Unit[T]], Awaitable[T]], name: str, fn: Unit[T]) -> T:
    while True:
        try:
            return await attempt(name, fn)
        except StoreUnavailable:
            await trio.sleep(PATIENCE)


def _wake(group: list[_Job]) -> None:
    for job in group:
        job.done.set()


class _StoreContext:
    def __init__(self, cls: type[Store], path: Path, migrations: Sequence[Sequence[str]],
                 ring: KeyRing | None, on_commit: Callable[[float], None] | None) -> None:
        self._cls, self._path, self._migrations, self._ring = cls, path, migrations, ring
        self._on_commit = on_commit
        self._store: Store | None = None

    async def __aenter__(self) -> Store:
        def open_and_migrate() -> sqlite3.Connection:
            conn = connect(self._path, self._ring)
            try:
                migrate(conn, self._migrations, str(self._path))
            except BaseException:
                conn.close()
                raise
            return conn

        def open_reader() -> sqlite3.Connection:
            reader = sqlite3.connect(f"{self._path.absolute().as_uri()}?mode=ro", uri=True, isolation_level=None,
                                     check_same_thread=False, factory=sealing.SealedConnection)
            sealing.install(reader, self._ring)
            reader.execute(f"PRAGMA cache_size=-{READER_CACHE_KIB}")
            return reader

        conn = await trio.to_thread.run_sync(open_and_migrate)
        readers: list[sqlite3.Connection] = []
        try:
            for _ in range(READERS):
                readers.append(await trio.to_thread.run_sync(open_reader))  # noqa: PERF401 -- kept as opened, to close
        except BaseException:
            for connection in [conn, *readers]:
                connection.close()
            raise
        self._store = self._cls(conn, readers, self._path, self._on_commit)
        self._store.start()
        return self._store

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._store is not None
        with trio.CancelScope(shield=True):
            await self._store.close()

"""The store on real SQLite files: migrations, durability settings, group
commit, failure isolation, cancellation and file permissions.

Tests that need several units in *one* group hold the writer thread inside a
first unit (`Gate`) while the others queue up, then let it go: the queued
units are then taken together, which makes `Store.commits` exact.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sqlite3
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from relay.store import engine as store_module
from relay.store.engine import MigrationError, Store, StoreUnavailable, connect, migrate

# Generous bound for what should take milliseconds; every test runs under it.
STEP = 15.0

MIGRATIONS = [
    ["CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)"],
    [
        "CREATE TABLE note (id INTEGER PRIMARY KEY, text TEXT NOT NULL)",
        "INSERT INTO note (text) VALUES ('added by migration 2')",
    ],
]


def bounded(test):
    """Run an async test under `fail_after(STEP)`: a lost wake-up fails, never hangs."""

    @functools.wraps(test)
    async def wrapper(*args: Any, **kwargs: Any) -> None:
        with trio.fail_after(STEP):
            await test(*args, **kwargs)

    return wrapper


def insert(name: str) -> Callable[[sqlite3.Connection], int]:
    def unit(conn: sqlite3.Connection) -> int:
        return conn.execute("INSERT INTO item (name) VALUES (?)", (name,)).lastrowid

    return unit


def names(path: Path) -> list[str]:
    """What is durably in the file, read by a fresh connection."""
    conn = sqlite3.connect(path)
    try:
        return [row[0] for row in conn.execute("SELECT name FROM item ORDER BY id")]
    finally:
        conn.close()


def user_version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


def tables(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
    finally:
        conn.close()


class Gate:
    """A unit that holds the writer thread until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()

    def unit(self, conn: sqlite3.Connection) -> str:
        self.entered.set()
        assert self.released.wait(STEP)
        return "gate"

    async def close(self, store: Store, nursery: trio.Nursery) -> None:
        """Start the gate unit and wait until the writer thread is inside it."""
        nursery.start_soon(store.run, "gate", self.unit)
        assert await trio.to_thread.run_sync(self.entered.wait, STEP)

    async def open(self) -> None:
        """Let the writer go once every task has queued its unit."""
        await trio.testing.wait_all_tasks_blocked()
        self.released.set()


async def collect(store: Store, name: str, fn: Callable[[sqlite3.Connection], Any], into: dict) -> None:
    try:
        into[name] = await store.run(name, fn)
    except Exception as exc:  # noqa: BLE001 -- the test compares each unit's outcome
        into[name] = exc


async def run_in_one_group(store: Store, units: dict[str, Callable[[sqlite3.Connection], Any]]) -> dict:
    """Run ``units`` as one group transaction; return each one's result or exception."""
    results: dict = {}
    gate = Gate()
    before = store.commits
    async with trio.open_nursery() as nursery:
        await gate.close(store, nursery)
        for name, fn in units.items():
            nursery.start_soon(collect, store, name, fn, results)
        await gate.open()
    assert store.commits == before + 2, "the units were not committed as one group"
    return results


# -- migrations ---------------------------------------------------------------------------


@bounded
async def test_migrations_are_applied_once_and_set_user_version(tmp_path: Path) -> None:
    path = tmp_path / "db" / "state.db"
    async with Store.open(path, MIGRATIONS) as store:
        assert await store.run("version", lambda c: c.execute("PRAGMA user_version").fetchone()[0]) == 2
    assert user_version(path) == 2
    assert {"item", "note"} <= tables(path)
    # Opening again applies nothing: migration 2's INSERT (and CREATE) ran once.
    async with Store.open(path, MIGRATIONS) as store:
        notes = await store.run("notes", lambda c: c.execute("SELECT text FROM note").fetchall())
    assert notes == [("added by migration 2",)]
    assert user_version(path) == 2


@bounded
async def test_a_new_migration_is_applied_on_top_of_an_older_database(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    async with Store.open(path, MIGRATIONS[:1]) as store:
        await store.run("insert", insert("kept"))
    assert user_version(path) == 1
    async with Store.open(path, MIGRATIONS):
        pass
    assert user_version(path) == 2
    assert names(path) == ["kept"]


def test_migrate_returns_the_version(tmp_path: Path) -> None:
    conn = connect(tmp_path / "state.db")
    try:
        assert migrate(conn, MIGRATIONS, "test") == 2
        assert migrate(conn, MIGRATIONS, "test") == 2
    finally:
        conn.close()


@bounded
async def test_a_newer_database_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    async with Store.open(path, MIGRATIONS) as store:
        await store.run("insert", insert("from the future"))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    with pytest.raises(MigrationError, match="version 2 is newer than this software understands \\(1\\)"):
        async with Store.open(path, MIGRATIONS[:1]):
            pytest.fail("a database of a newer schema was opened")

    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert user_version(path) == 2
    assert names(path) == ["from the future"]


@bounded
async def test_a_failing_migration_leaves_the_database_at_its_version(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    async with Store.open(path, MIGRATIONS[:1]) as store:
        await store.run("insert", insert("before"))
    broken = MIGRATIONS[:1] + [
        ["CREATE TABLE note (id INTEGER PRIMARY KEY)", "INSERT INTO item (name) VALUES ('half')", "NOT SQL AT ALL"],
    ]
    with pytest.raises(MigrationError, match="migration to schema version 2 failed"):
        async with Store.open(path, broken):
            pytest.fail("opened with a failed migration")
    assert user_version(path) == 1
    assert "note" not in tables(path)
    assert names(path) == ["before"]
    # Once fixed, the migration applies.
    async with Store.open(path, MIGRATIONS):
        pass
    assert user_version(path) == 2


@bounded
async def test_each_migration_is_its_own_transaction(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with pytest.raises(MigrationError, match="version 2"):
        async with Store.open(path, MIGRATIONS[:1] + [["CREATE TABLE item (x)"]]):
            pytest.fail("opened with a failed migration")
    # Migration 1 succeeded before migration 2 failed: it stays.
    assert user_version(path) == 1
    assert tables(path) == {"item"}


# -- durability settings and files -------------------------------------------------------------


@bounded
async def test_wal_and_synchronous_full_are_in_force(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "state.db", MIGRATIONS) as store:
        pragmas = await store.run(
            "pragmas",
            lambda c: tuple(c.execute(f"PRAGMA {name}").fetchone()[0]
                            for name in ("journal_mode", "synchronous", "foreign_keys")),
        )
    assert pragmas == ("wal", 2, 1)  # synchronous 2 is FULL


@pytest.fixture
def no_umask():
    """Permissions must come from the code, not from a strict umask."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.usefixtures("no_umask")
@bounded
async def test_the_database_is_private_to_its_owner(tmp_path: Path) -> None:
    path = tmp_path / "var" / "state.db"
    async with Store.open(path, MIGRATIONS) as store:
        await store.run("insert", insert("x"))
        # The WAL and shared-memory files exist while the store is open, and
        # SQLite gives them the database file's permissions.
        files = [path, path.with_name("state.db-wal"), path.with_name("state.db-shm")]
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    assert modes == {"state.db": 0o600, "state.db-wal": 0o600, "state.db-shm": 0o600}
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


# -- group commit ----------------------------------------------------------------------------


@bounded
async def test_concurrent_units_share_few_commits_and_all_are_durable(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    count = 200
    ids: dict[int, int] = {}

    async def one(i: int) -> None:
        ids[i] = await store.run("insert", insert(f"n{i:03d}"))

    async with Store.open(path, MIGRATIONS) as store:
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, i)
        assert 1 <= store.commits < count // 4
        assert store.commit_seconds > 0
    assert len(set(ids.values())) == count
    assert sorted(names(path)) == [f"n{i:03d}" for i in range(count)]


@bounded
async def test_a_group_holds_at_most_max_group_units(tmp_path: Path) -> None:
    count = store_module.MAX_GROUP + 10
    async with Store.open(tmp_path / "state.db", MIGRATIONS) as store:
        results: dict = {}
        gate = Gate()
        async with trio.open_nursery() as nursery:
            await gate.close(store, nursery)
            for i in range(count):
                nursery.start_soon(collect, store, f"n{i}", insert(f"n{i}"), results)
            await gate.open()
        assert store.commits == 3  # the gate, then MAX_GROUP units, then 10
    assert len(names(tmp_path / "state.db")) == count


@bounded
async def test_a_failing_unit_gets_its_exception_and_its_neighbours_commit(tmp_path: Path) -> None:
    path = tmp_path / "state.db"

    def half_then_value_error(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO item (name) VALUES ('half of a unit')")
        raise ValueError("the unit changed its mind")

    def duplicate(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO item (name) VALUES ('other half')")
        conn.execute("INSERT INTO item (name) VALUES ('existing')")  # UNIQUE

    async with Store.open(path, MIGRATIONS) as store:
        await store.run("insert", insert("existing"))
        results = await run_in_one_group(
            store,
            {
                "first": insert("first"),
                "value_error": half_then_value_error,
                "duplicate": duplicate,
                "last": insert("last"),
            },
        )
    assert isinstance(results["first"], int) and isinstance(results["last"], int)
    assert isinstance(results["value_error"], ValueError)
    assert str(results["value_error"]) == "the unit changed its mind"
    assert isinstance(results["duplicate"], sqlite3.IntegrityError)
    # Nothing of the failed units (in any order), everything of the others.
    assert sorted(names(path)) == ["existing", "first", "last"]


@bounded
async def test_an_operational_error_fails_the_whole_group(tmp_path: Path) -> None:
    path = tmp_path / "state.db"

    def disk_trouble(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO item (name) VALUES ('doomed too')")
        raise sqlite3.OperationalError("database or disk is full")

    async with Store.open(path, MIGRATIONS) as store:
        results = await run_in_one_group(
            store, {"before": insert("before"), "disk": disk_trouble, "after": insert("after")}
        )
        for name in ("before", "disk", "after"):
            assert isinstance(results[name], StoreUnavailable), results[name]
            assert "database or disk is full" in str(results[name])
        # Each caller raises its own exception object (their tracebacks must not mix).
        assert len({id(exc) for exc in results.values()}) == 3
        # The store still works afterwards.
        await store.run("insert", insert("later"))
    assert names(path) == ["later"]


@bounded
async def test_a_commit_that_fails_fails_the_group_and_writes_nothing(tmp_path: Path) -> None:
    """COMMIT itself refused: a deferred foreign key is only checked then."""
    path = tmp_path / "state.db"
    migrations = MIGRATIONS + [[
        "CREATE TABLE link (item INTEGER NOT NULL REFERENCES item (id) DEFERRABLE INITIALLY DEFERRED)",
    ]]

    def dangling(conn: sqlite3.Connection) -> str:
        conn.execute("INSERT INTO link (item) VALUES (424242)")
        return "the unit itself succeeded"

    async with Store.open(path, migrations) as store:
        results = await run_in_one_group(store, {"a": insert("a"), "dangling": dangling, "b": insert("b")})
        assert all(isinstance(r, StoreUnavailable) for r in results.values()), results
        assert "FOREIGN KEY" in str(results["a"])
        assert await store.run("insert", insert("c")) > 0
    assert names(path) == ["c"]


class RollbackFailsOnce:
    """A connection whose first ROLLBACK fails, as on a failing disk."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.failed = False

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "ROLLBACK" and not self.failed:
            self.failed = True
            raise sqlite3.OperationalError("disk I/O error (simulated, on ROLLBACK)")
        return self._conn.execute(sql, *args)

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction

    def close(self) -> None:
        self._conn.close()


@bounded
async def test_a_failed_rollback_does_not_stop_the_store(tmp_path: Path, caplog) -> None:
    path = tmp_path / "state.db"

    def disk_trouble(conn: Any) -> None:
        conn.execute("INSERT INTO item (name) VALUES ('doomed')")
        raise sqlite3.OperationalError("disk I/O error")

    async with Store.open(path, MIGRATIONS) as store:
        flaky = RollbackFailsOnce(store._conn)
        store._conn = flaky  # before the first unit: the writer thread reads it per group
        with pytest.raises(StoreUnavailable):
            await store.run("disk", disk_trouble)
        assert flaky.failed
        # The writer thread survived, and the next group starts clean.
        await store.run("insert", insert("next"))
    assert names(path) == ["next"]
    assert "rollback failed" in caplog.text


# -- cancellation and closing ------------------------------------------------------------------


@bounded
async def test_a_cancelled_caller_does_not_stop_its_unit_from_committing(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    waiter_scope = trio.CancelScope()
    returned = []

    async def waiter() -> None:
        with waiter_scope:
            returned.append(await store.run("insert", insert("cancelled caller")))

    async with Store.open(path, MIGRATIONS) as store:
        gate = Gate()
        async with trio.open_nursery() as nursery:
            await gate.close(store, nursery)
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            waiter_scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            # The caller is gone while its unit still waits behind the gate.
            assert waiter_scope.cancelled_caught and returned == []
            gate.released.set()
    assert names(path) == ["cancelled caller"]


@bounded
async def test_leaving_the_store_finishes_queued_units(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    gate = Gate()
    async with trio.open_nursery() as nursery:  # noqa: SIM117 -- nested: the store is left while the nursery runs
        async with Store.open(path, MIGRATIONS) as store:
            await gate.close(store, nursery)
            for i in range(5):
                nursery.start_soon(store.run, "insert", insert(f"n{i}"))
            await trio.testing.wait_all_tasks_blocked()
            # Leave the block with five units queued behind the gate.
            nursery.start_soon(trio.to_thread.run_sync, gate.released.set)
    assert sorted(names(path)) == [f"n{i}" for i in range(5)]


# -- the reading connection ---------------------------------------------------------------------


@bounded
async def test_a_read_sees_what_is_committed_without_waiting_for_the_writer(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "state.db", MIGRATIONS) as store:
        await store.run("insert", insert("committed"))
        gate = Gate()
        async with trio.open_nursery() as nursery:
            await gate.close(store, nursery)  # the writer is busy inside a group...
            nursery.start_soon(store.run, "insert", insert("not yet"))
            seen = await store.read("names", lambda c: [r[0] for r in c.execute("SELECT name FROM item")])
            assert seen == ["committed"]  # ...and the read answered all the same
            await gate.open()
        assert await store.read("count", lambda c: c.execute("SELECT count(*) FROM item").fetchone()[0]) == 2


@bounded
async def test_a_read_cannot_write(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "state.db", MIGRATIONS) as store:
        with pytest.raises(StoreUnavailable, match="readonly"):
            await store.read("sneaky", insert("x"))
        assert await store.read("names", lambda c: c.execute("SELECT count(*) FROM item").fetchone()[0]) == 0


@bounded
async def test_an_urgent_unit_is_committed_before_the_group_it_arrived_with(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "state.db", MIGRATIONS) as store:
        gate = Gate()
        results: dict[str, Any] = {}
        async with trio.open_nursery() as nursery:
            await gate.close(store, nursery)
            for name in ("normal-1", "normal-2"):
                nursery.start_soon(collect, store, name, insert(name), results)
            await trio.testing.wait_all_tasks_blocked()

            async def urgent() -> None:
                results["urgent"] = await store.run("urgent", insert("urgent"), urgent=True)

            nursery.start_soon(urgent)
            before = store.commits
            await gate.open()
        assert store.commits - before == 3  # the gate's group, the urgent one, then the others
        assert results["urgent"] < min(results["normal-1"], results["normal-2"])  # rowids: commit order


@bounded
async def test_closing_after_reads_leaves_the_whole_database_in_its_file(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    async with Store.open(path, MIGRATIONS) as store:
        await store.run("insert", insert("kept"))
        assert await store.read("count", lambda c: c.execute("SELECT count(*) FROM item").fetchone()[0]) == 1
    assert not path.with_name("state.db-wal").exists()  # checkpointed by the writer, the last to close
    assert names(path) == ["kept"]

"""LossyFS itself: after ``clear-cache`` a file shows what was fsynced and
nothing else, as LazyFS did in ../shared/notes/power-cuts.md (its table,
row by row), and SQLite's durability settings make the difference they
should.  The power-cut scenarios (test_power_cuts.py) rest on this."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from lossy_mount import LossyMount, requires_fuse

pytestmark = requires_fuse


@pytest.fixture(scope="module")
def fs(tmp_path_factory) -> LossyMount:
    base = tmp_path_factory.mktemp("lossyfs")
    mount = LossyMount(base / "backing", base / "mnt", base / "lossyfs.log").start()
    yield mount
    mount.stop()


def write(path: Path, data: bytes, *, sync: str | None = None, flags: int = os.O_CREAT | os.O_WRONLY) -> None:
    fd = os.open(path, flags, 0o600)
    try:
        os.write(fd, data)
        if sync == "fsync":
            os.fsync(fd)
        elif sync == "fdatasync":
            os.fdatasync(fd)
    finally:
        os.close(fd)


def test_written_without_fsync_is_empty_after_the_cut(fs: LossyMount) -> None:
    path = fs.mountpoint / "unsynced"
    write(path, os.urandom(10_000))
    assert path.stat().st_size == 10_000  # visible to everyone until the cut
    assert (fs.backing / "unsynced").stat().st_size == 0  # but not on the backing disk
    fs.clear_cache()
    assert path.exists() and path.read_bytes() == b""


@pytest.mark.parametrize("sync", ["fsync", "fdatasync"])
def test_fsynced_data_survives(fs: LossyMount, sync: str) -> None:
    data = os.urandom(10_000)
    write(fs.mountpoint / sync, data, sync=sync)
    fs.clear_cache()
    assert (fs.mountpoint / sync).read_bytes() == data


def test_an_unsynced_append_is_cut_off(fs: LossyMount) -> None:
    path = fs.mountpoint / "append"
    head = os.urandom(4096)
    write(path, head, sync="fsync")
    write(path, os.urandom(5904), flags=os.O_WRONLY | os.O_APPEND)
    assert path.stat().st_size == 10_000
    fs.clear_cache()
    assert path.read_bytes() == head


def test_an_unsynced_overwrite_gives_back_the_old_data(fs: LossyMount) -> None:
    path = fs.mountpoint / "overwrite"
    write(path, b"A" * 4096, sync="fsync")
    write(path, b"B" * 4096, flags=os.O_WRONLY)
    assert path.read_bytes() == b"B" * 4096
    fs.clear_cache()
    assert path.read_bytes() == b"A" * 4096


def test_a_rename_is_kept_without_a_directory_fsync(fs: LossyMount) -> None:
    """The limit of this model (and LazyFS's): directory entries are never lost."""
    write(fs.mountpoint / "new.partial", b"whole", sync="fsync")
    os.rename(fs.mountpoint / "new.partial", fs.mountpoint / "new")
    fs.clear_cache()
    assert (fs.mountpoint / "new").read_bytes() == b"whole"
    assert not (fs.mountpoint / "new.partial").exists()


def test_a_descriptor_kept_open_across_the_cut_sees_the_cut(fs: LossyMount) -> None:
    fd = os.open(fs.mountpoint / "kept-open", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"x" * 8192)
        assert os.pread(fd, 8192, 0) == b"x" * 8192
        fs.clear_cache()
        assert os.fstat(fd).st_size == 0
        assert os.pread(fd, 8192, 0) == b""
    finally:
        os.close(fd)


def test_a_new_file_in_place_of_an_unlinked_one_starts_clean(fs: LossyMount) -> None:
    path = fs.mountpoint / "replaced"
    write(path, b"old" * 2000)
    path.unlink()
    write(path, b"new", sync="fsync")
    assert path.read_bytes() == b"new"
    fs.clear_cache()
    assert path.read_bytes() == b"new"


def test_truncate_goes_straight_to_the_backing_file(fs: LossyMount) -> None:
    path = fs.mountpoint / "truncated"
    write(path, b"k" * 10_000, sync="fsync")
    os.truncate(path, 3000)
    assert path.read_bytes() == b"k" * 3000
    fs.clear_cache()
    assert path.read_bytes() == b"k" * 3000


WRITER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
conn.execute("PRAGMA synchronous=" + sys.argv[2])
conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, data BLOB)")
for n in range(200):
    conn.execute("INSERT INTO t VALUES (?, randomblob(1024))", (n,))
print("committed", flush=True)
sys.stdin.read()  # until killed: no checkpoint, no clean close
"""


@pytest.mark.parametrize(("synchronous", "survives"), [("FULL", True), ("OFF", False)])
def test_sqlite_commits_survive_only_when_fsynced(fs: LossyMount, synchronous: str, survives: bool) -> None:
    path = fs.mountpoint / f"sqlite-{synchronous}.db"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), synchronous],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert writer.stdout.readline() == b"committed\n"
    finally:
        writer.kill()  # the power cut takes the process first
        writer.wait()
        writer.stdin.close()
        writer.stdout.close()
    fs.clear_cache()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 't'").fetchone()[0]
        rows = conn.execute("SELECT count(*) FROM t").fetchone()[0] if tables else 0
    finally:
        conn.close()
    assert rows == (200 if survives else 0)

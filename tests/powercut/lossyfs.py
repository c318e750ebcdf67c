"""LossyFS: a FUSE passthrough file system that forgets what was not fsynced.

Test-only.  It stands in for LazyFS (../shared/notes/power-cuts.md), which
CI can neither fetch nor build, with the semantics that note measured:

* file data written goes to an in-memory cache of the file's dirty pages,
  not to the backing file; reads see that cache over the backing file;
* ``fsync``/``fdatasync`` write the file's dirty pages to the backing file
  and cut it to the size the writer sees (the backing file itself is not
  fsynced: the simulated power cut is the ``clear-cache`` below, not the
  real disk's);
* metadata operations (create, mkdir, rename, unlink, rmdir, truncate,
  chmod, chown, utimes) go straight to the backing directory, as in LazyFS:
  directory entries are never lost, and ``fsyncdir`` is a no-op;
* the ``clear-cache`` command drops every cached page of every file: the
  files then show only what was fsynced, with their sizes as of the last
  fsync (or of the last truncate).  That is a power cut, provided every
  writer was killed first.

Run as its own process::

    python lossyfs.py BACKING MOUNTPOINT CONTROL_SOCKET

It prints ``ready`` on stdout once mounted and listening on CONTROL_SOCKET
(a Unix stream socket; one command per connection: ``clear-cache`` or
``dirty``, each answered with one line), and unmounts on SIGTERM, SIGINT or
the end of its standard input (the test that started it died).
Files are owned by whoever runs it; it needs /dev/fuse and the right to
mount (root).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from os import fsdecode

import pyfuse3
import trio
from pyfuse3 import EntryAttributes, FileInfo, FUSEError, StatvfsData

PAGE = 4096


class DirtyFile:
    """What a file holds beyond its backing file since its last fsync."""

    def __init__(self, size: int) -> None:
        self.size = size  # the size the writer sees
        self.pages: dict[int, bytearray] = {}

    def truncate(self, size: int) -> None:
        for index in [i for i in self.pages if i * PAGE >= size]:
            del self.pages[index]
        tail = self.pages.get(size // PAGE)
        if tail is not None:
            tail[size % PAGE:] = bytes(PAGE - size % PAGE)
        self.size = size

    def unsynced_bytes(self) -> int:
        return len(self.pages) * PAGE


def _fail(exc: OSError) -> FUSEError:
    return FUSEError(exc.errno or errno.EIO)


class LossyOperations(pyfuse3.Operations):
    """The passthrough.  A FUSE inode is the backing file's st_ino + 1, so
    that no backing file can take the root's number (1)."""

    def __init__(self, backing: str) -> None:
        super().__init__()
        self._paths: dict[int, str] = {pyfuse3.ROOT_INODE: backing}
        self._fds: dict[int, int] = {}  # inode -> backing fd, while open
        self._opens: dict[int, int] = {}  # inode -> open handles
        self._handles: dict[int, tuple[int, bool]] = {}  # fh -> (inode, O_APPEND)
        self._next_fh = 1
        self._dirty: dict[int, DirtyFile] = {}
        self._unlinked: set[int] = set()

    # -- the control commands ------------------------------------------------------

    def clear_cache(self) -> str:
        files, unsynced = len(self._dirty), sum(d.unsynced_bytes() for d in self._dirty.values())
        self._dirty.clear()
        return f"cleared {files} files {unsynced} bytes"

    def dirty_report(self) -> str:
        return f"dirty {len(self._dirty)} files {sum(d.unsynced_bytes() for d in self._dirty.values())} bytes"

    def known_inodes(self) -> list[int]:
        return list(self._paths)

    # -- names ----------------------------------------------------------------------

    def _path(self, inode: int) -> str:
        try:
            return self._paths[inode]
        except KeyError:
            raise FUSEError(errno.ENOENT) from None

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), fsdecode(name))

    def _attributes(self, path: str) -> EntryAttributes:
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise _fail(exc) from None
        inode = pyfuse3.ROOT_INODE if path == self._paths[pyfuse3.ROOT_INODE] else st.st_ino + 1
        self._paths[inode] = path
        return self._entry(inode, st)

    def _entry(self, inode: int, st: os.stat_result) -> EntryAttributes:
        entry = EntryAttributes()
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_atime_ns",
                     "st_mtime_ns", "st_ctime_ns"):
            setattr(entry, name, getattr(st, name))
        entry.st_ino = inode
        if inode in self._dirty:
            entry.st_size = self._dirty[inode].size
        # No kernel caching of names or attributes: sizes change at clear-cache.
        entry.entry_timeout = entry.attr_timeout = 0
        entry.st_blksize = PAGE
        entry.st_blocks = (entry.st_size + 511) // 512
        return entry

    def _forget_file(self, path: str) -> None:
        """Before ``path`` is unlinked or replaced: if it is a file's last
        name, its cached pages go with it (at its last close if still open)."""
        try:
            st = os.lstat(path)
        except OSError:
            return
        if st.st_nlink == 1:
            inode = st.st_ino + 1
            if self._opens.get(inode):
                self._unlinked.add(inode)
            else:
                self._dirty.pop(inode, None)

    async def lookup(self, parent_inode, name, ctx):
        return self._attributes(self._child(parent_inode, name))

    async def getattr(self, inode, ctx):
        try:
            st = os.fstat(self._fds[inode]) if inode in self._fds else os.lstat(self._path(inode))
        except OSError as exc:
            raise _fail(exc) from None
        return self._entry(inode, st)

    async def setattr(self, inode, attr, fields, fh, ctx):
        target = self._fds.get(inode, self._path(inode))
        try:
            if fields.update_size:
                os.truncate(target, attr.st_size)
                if inode in self._dirty:
                    self._dirty[inode].truncate(attr.st_size)
            if fields.update_mode:
                os.chmod(target, attr.st_mode & 0o7777)
            if fields.update_uid or fields.update_gid:
                os.chown(target, attr.st_uid if fields.update_uid else -1, attr.st_gid if fields.update_gid else -1)
            if fields.update_atime or fields.update_mtime:
                st = os.stat(target)
                os.utime(target, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                                     attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
        except OSError as exc:
            raise _fail(exc) from None
        return await self.getattr(inode, ctx)

    async def mkdir(self, parent_inode, name, mode, ctx):
        path = self._child(parent_inode, name)
        try:
            os.mkdir(path, mode & ~ctx.umask)
        except OSError as exc:
            raise _fail(exc) from None
        return self._attributes(path)

    async def rmdir(self, parent_inode, name, ctx):
        try:
            os.rmdir(self._child(parent_inode, name))
        except OSError as exc:
            raise _fail(exc) from None

    async def unlink(self, parent_inode, name, ctx):
        path = self._child(parent_inode, name)
        self._forget_file(path)
        try:
            os.unlink(path)
        except OSError as exc:
            raise _fail(exc) from None

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags:
            raise FUSEError(errno.EINVAL)
        old, new = self._child(parent_inode_old, name_old), self._child(parent_inode_new, name_new)
        self._forget_file(new)
        try:
            os.rename(old, new)
        except OSError as exc:
            raise _fail(exc) from None
        for inode, path in list(self._paths.items()):  # the renamed entry, and all below it
            if path == old or path.startswith(old + os.sep):
                self._paths[inode] = new + path[len(old):]

    async def opendir(self, inode, ctx):
        self._path(inode)
        return inode

    async def readdir(self, fh, start_id, token):
        path = self._path(fh)
        try:
            names = sorted(os.listdir(path))
        except OSError as exc:
            raise _fail(exc) from None
        for index, name in enumerate(names[start_id:], start=start_id + 1):
            try:
                attributes = self._attributes(os.path.join(path, name))
            except FUSEError:
                continue  # gone meanwhile
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attributes, index):
                break

    async def fsyncdir(self, fh, datasync):
        pass  # as in LazyFS: directory entries are on the backing disk already

    async def statfs(self, ctx):
        st = os.statvfs(self._paths[pyfuse3.ROOT_INODE])
        result = StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                     "f_favail", "f_namemax"):
            setattr(result, name, getattr(st, name))
        return result

    # -- files --------------------------------------------------------------------

    def _handle(self, inode: int, flags: int) -> FileInfo:
        if inode not in self._fds:
            try:
                self._fds[inode] = os.open(self._path(inode), os.O_RDWR)
            except OSError as exc:
                raise _fail(exc) from None
        self._opens[inode] = self._opens.get(inode, 0) + 1
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        self._handles[fh] = (inode, bool(flags & os.O_APPEND))
        # keep_cache=False: the kernel drops its copy of the pages at each open,
        # so a process started after clear-cache reads what is left.
        return FileInfo(fh=fh, keep_cache=False)

    async def open(self, inode, flags, ctx):
        info = self._handle(inode, flags)
        if flags & os.O_TRUNC:
            os.ftruncate(self._fds[inode], 0)
            self._dirty.pop(inode, None)
        return info

    async def create(self, parent_inode, name, mode, flags, ctx):
        path = self._child(parent_inode, name)
        existed = os.path.lexists(path)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | (flags & (os.O_EXCL | os.O_TRUNC)), mode & ~ctx.umask))
        except OSError as exc:
            raise _fail(exc) from None
        attributes = self._attributes(path)
        if not existed or flags & os.O_TRUNC:
            self._dirty.pop(attributes.st_ino, None)
            self._unlinked.discard(attributes.st_ino)
        return self._handle(attributes.st_ino, flags), attributes

    def _backing_page(self, fd: int, index: int) -> bytearray:
        data = os.pread(fd, PAGE, index * PAGE)
        return bytearray(data.ljust(PAGE, b"\0"))

    async def read(self, fh, off, size):
        inode, _ = self._handles[fh]
        fd = self._fds[inode]
        dirty = self._dirty.get(inode)
        if dirty is None:
            return os.pread(fd, size, off)
        end = min(off + size, dirty.size)
        if end <= off:
            return b""
        chunks = []
        for index in range(off // PAGE, (end - 1) // PAGE + 1):
            page = dirty.pages.get(index)
            chunks.append(page if page is not None else self._backing_page(fd, index))
        first = off - (off // PAGE) * PAGE
        return bytes(b"".join(chunks)[first:first + end - off])

    async def write(self, fh, off, buf):
        inode, append = self._handles[fh]
        fd = self._fds[inode]
        dirty = self._dirty.get(inode)
        if dirty is None:
            dirty = self._dirty[inode] = DirtyFile(os.fstat(fd).st_size)
        if append:
            off = dirty.size
        done = 0
        while done < len(buf):
            index, start = divmod(off + done, PAGE)
            page = dirty.pages.get(index)
            if page is None:
                page = dirty.pages[index] = self._backing_page(fd, index)
            count = min(PAGE - start, len(buf) - done)
            page[start:start + count] = buf[done:done + count]
            done += count
        dirty.size = max(dirty.size, off + len(buf))
        return len(buf)

    async def fsync(self, fh, datasync):
        inode, _ = self._handles[fh]
        dirty = self._dirty.pop(inode, None)
        if dirty is None:
            return
        fd = self._fds[inode]
        try:
            for index, page in sorted(dirty.pages.items()):
                os.pwrite(fd, page[:max(0, min(PAGE, dirty.size - index * PAGE))], index * PAGE)
            os.ftruncate(fd, dirty.size)
        except OSError as exc:
            self._dirty[inode] = dirty
            raise _fail(exc) from None

    async def flush(self, fh):
        pass

    async def release(self, fh):
        inode, _ = self._handles.pop(fh)
        self._opens[inode] -= 1
        if not self._opens[inode]:
            del self._opens[inode]
            os.close(self._fds.pop(inode))
            if inode in self._unlinked:
                self._unlinked.discard(inode)
                self._dirty.pop(inode, None)


async def _control(operations: LossyOperations, path: str, task_status=trio.TASK_STATUS_IGNORED) -> None:
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen()
    task_status.started()
    while True:
        conn, _ = await listener.accept()
        with conn:
            command = (await conn.recv(256)).decode().strip()
            if command == "clear-cache":
                # The kernel forgets its copies first (a process that kept a
                # file open must not read dropped data from them); from a
                # thread, since it may write back mmap'd pages through us.
                for inode in operations.known_inodes():
                    try:
                        await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode)
                    except OSError:
                        pass  # the kernel does not know that inode (any more)
                answer = operations.clear_cache()
            elif command == "dirty":
                answer = operations.dirty_report()
            else:
                answer = f"unknown command {command!r}"
            data = answer.encode() + b"\n"
            while data:
                data = data[await conn.send(data):]


async def _until_stdin_closes(done: trio.CancelScope) -> None:
    """The test that started us holds our stdin: if it dies, unmount."""
    while True:
        await trio.lowlevel.wait_readable(sys.stdin.fileno())
        if not os.read(sys.stdin.fileno(), 4096):
            done.cancel()
            return


async def _serve(operations: LossyOperations, control: str) -> None:
    async with trio.open_nursery(strict_exception_groups=True) as nursery:
        nursery.start_soon(pyfuse3.main)
        await nursery.start(_control, operations, control)
        nursery.start_soon(_until_stdin_closes, nursery.cancel_scope)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            print("ready", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str]) -> int:
    backing, mountpoint, control = (os.path.abspath(a) for a in argv)
    operations = LossyOperations(backing)
    pyfuse3.init(operations, mountpoint, {"fsname=lossyfs", "default_permissions"})
    try:
        trio.run(_serve, operations, control)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

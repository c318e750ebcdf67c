"""The admin channel: how ``eimis-relay status`` and ``queue`` reach a running relay.

Theory of operation
-------------------
Two things on disk tell a command about the daemon of a configuration:

* ``relay.lock`` (the hub's: ``hub.lock``) in the state directory.  The daemon holds an exclusive
  ``flock`` on it for as long as it has the store open, and writes its pid
  and its admin socket's path into it.  The kernel drops the lock when the
  process dies, however it dies, so the lock is the reliable answer to "is a
  daemon using this store?" (a pid file is not: pids are reused).  A command
  that must write to the store with no daemon running takes the same lock,
  so that a daemon started meanwhile refuses to open the store rather than
  become its second writer.
* The admin socket, a Unix stream socket: ``$RUNTIME_DIRECTORY`` under
  systemd, else the state directory.  Mode 0600: only the relay's user (and
  root) may connect, which is the whole of its access control.  It is bound
  under a temporary name, chmod-ed, then renamed into place, so it is never
  reachable with wider permissions.  Commands find it through the lock file,
  since they do not run with the daemon's environment.

The protocol is one JSON line each way per connection: ``{"op", "args"}``
in, ``{"ok": true, "result"}`` or ``{"ok": false, "error"}`` out.  Every
write the tools ask for is a unit of work of the daemon's own store (one
writer, always).

Error handling: a handler's `AdminError` goes back to the command as its
message; anything else is logged here and reported as an internal error.
A client that is slow or sends too much is disconnected.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger(__name__)

LOCK_NAME = "relay.lock"
SOCKET_NAME = "admin.sock"
# The hub's: a hub and a relay left to the same default state directory
# must not take each other's lock or socket.
HUB_LOCK_NAME = "hub.lock"
HUB_SOCKET_NAME = "hub.sock"
# A request is a small JSON document; anything larger is not from our tools.
MAX_REQUEST = 64 * 1024
# Server side: a connection has this long to send its request.  Client side:
# how long a command waits for the answer (a unit of work queued behind a
# busy store, at worst).
REQUEST_TIMEOUT = 10.0
CLIENT_TIMEOUT = 30.0
# `holder` probes the lock by taking it shared for an instant; a daemon
# starting at that very instant tries again for this long before it
# concludes that another process really holds the store.
PROBE_GRACE = 1.0
# sockaddr_un.sun_path on Linux, with its terminating NUL.
MAX_SOCKET_PATH = 107

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class AdminError(Exception):
    """A request the daemon refuses; the message is shown to the operator."""


class StoreBusy(Exception):
    """Another process holds the state directory's lock; ``holder`` is what it
    wrote there (pid, command, admin socket), as far as it could be read."""

    def __init__(self, directory: Path, holder: dict[str, Any]) -> None:
        who = holder.get("command", "a process")
        pid = holder.get("pid", "?")
        super().__init__(f"the store in {directory} is in use by {who} (pid {pid})")
        self.holder = holder


class DaemonUnreachable(Exception):
    """No daemon answers for this configuration; the message says why."""


class StateLock:
    """The exclusive lock on ``relay.lock``: see the module docstring.

    Resource handling: `acquire` opens the file and keeps it open; `release`
    (or the process's death) closes it, which drops the lock."""

    def __init__(self, directory: Path, name: str = LOCK_NAME) -> None:
        self.directory = directory
        self.path = directory / name
        self._fd: int | None = None

    def acquire(self, command: str, admin_socket: Path | None = None) -> None:
        """Take the lock and say who holds it, or raise `StoreBusy`."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + PROBE_GRACE
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise StoreBusy(self.directory, read_holder(self.path)) from None
                time.sleep(0.01)  # before the loop runs anything: blocking is fine
        info = {"pid": os.getpid(), "command": command, "since": time.time(),
                "admin_socket": str(admin_socket) if admin_socket else None}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode() + b"\n", 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def holder(directory: Path, name: str = LOCK_NAME) -> dict[str, Any] | None:
    """Who holds the lock ``name`` of ``directory`` right now; None when nobody does."""
    path = directory / name
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_holder(path)
    finally:
        os.close(fd)  # also drops the shared lock, if we got it
    return None


def read_holder(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def socket_path(domain: str, state: Path, name: str = SOCKET_NAME) -> Path:
    """Where the daemon of ``domain`` puts its admin socket (module docstring)."""
    if directory := os.environ.get("RUNTIME_DIRECTORY"):
        return Path(directory.split(":")[0]) / f"{domain}.{name}"
    return state / name


class AdminServer:
    """Serves the admin socket at ``path`` with ``handlers`` (op -> handler)."""

    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers

    async def serve(
        self, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            raise OSError(errno.ENAMETOOLONG, f"admin socket path longer than {MAX_SOCKET_PATH} bytes", str(self.path))
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            staging.unlink(missing_ok=True)
            await sock.bind(str(staging))
            os.chmod(staging, 0o600)
            os.rename(staging, self.path)  # replaces a stale socket of a dead daemon
            sock.listen(16)
        except BaseException:
            sock.close()
            staging.unlink(missing_ok=True)
            raise
        listener = trio.SocketListener(sock)
        try:
            async with listener:
                await trio.serve_listeners(self._handle, [listener], task_status=task_status)
        finally:
            self.path.unlink(missing_ok=True)

    async def _handle(self, stream: trio.SocketStream) -> None:
        """One command's connection; whatever fails in it ends it, never
        the daemon (this runs in the daemon's own nursery)."""
        async with stream:
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    request = await _read_line(stream)
            except (trio.TooSlowError, trio.BrokenResourceError, ValueError):
                return
            answer = await self.answer(request)
            try:
                data = json.dumps(answer, ensure_ascii=False).encode() + b"\n"
            except (TypeError, ValueError):
                log.exception("admin answer to %r cannot be encoded", request[:80])
                data = b'{"ok": false, "error": "the daemon could not encode its answer; its log says why"}\n'
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the command gave up waiting

    async def answer(self, request: bytes) -> dict[str, Any]:
        try:
            document = json.loads(request)
            op, args = document["op"], document.get("args", {})
            handler = self.handlers[op]
            if not isinstance(args, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": "malformed admin request (is the command the daemon's version?)"}
        try:
            return {"ok": True, "result": await handler(args)}
        except AdminError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception:
            log.exception("admin request %s failed", op)
            return {"ok": False, "error": f"the daemon failed to answer {op!r}; its log says why"}


async def _read_line(stream: trio.SocketStream) -> bytes:
    data = bytearray()
    while b"\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError("admin request too large")
    return bytes(data)


def call(path: Path, op: str, args: dict[str, Any] | None = None, *, timeout: float = CLIENT_TIMEOUT) -> Any:
    """Ask the daemon listening at ``path``; return its result.

    Blocking (the commands are plain programs).  Raises `DaemonUnreachable`
    when nothing answers there, `AdminError` when the daemon refused."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps({"op": op, "args": args or {}}).encode() + b"\n")
            data = bytearray()
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise DaemonUnreachable(f"the daemon did not answer within {timeout:g} s on {path}") from None
        except OSError as exc:
            raise DaemonUnreachable(f"cannot reach the daemon's admin socket {path}: {exc.strerror or exc}") from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise DaemonUnreachable(f"the daemon closed {path} without an answer") from None
    if not answer.get("ok"):
        raise AdminError(answer.get("error", "refused"))
    return answer.get("result")


def find_daemon(state: Path, lock: str = LOCK_NAME) -> Path:
    """The admin socket of the daemon that holds ``state``'s store (its
    lock file ``lock``: the relay's, or `HUB_LOCK_NAME`).

    Raises `DaemonUnreachable` when no daemon holds it, or when the holder
    is not a daemon with an admin channel (a command working on the store,
    or a daemon whose socket could not be bound)."""
    found = holder(state, lock)
    if found is None:
        raise DaemonUnreachable(f"no eimis-relay daemon is running on the store in {state}")
    if not found.get("admin_socket"):
        who = found.get("command", "another process")
        raise DaemonUnreachable(f"the store in {state} is held by {who} (pid {found.get('pid', '?')}),"
                                " which has no admin channel")
    return Path(found["admin_socket"])

"""Driving LossyFS (lossyfs.py) from a test: mount it as its own process,
simulate a power cut with ``clear-cache``, unmount.

The power-cut tests need /dev/fuse, root (to mount) and pyfuse3 (the
``powercut`` extra).  Without them they skip, saying why, so that the
README's command works for anyone; `.ci/run` installs them and sets
``EIMIS_POWERCUT_REQUIRED``, which turns a missing pyfuse3 into a failure:
in CI the suite must run, never skip.
"""

from __future__ import annotations

import importlib.util
import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

LOSSYFS = Path(__file__).with_name("lossyfs.py")
READY_TIMEOUT = 20.0
# Set by .ci/run: there a missing pyfuse3 fails the suite instead of skipping it.
REQUIRED = "EIMIS_POWERCUT_REQUIRED"


def skip_reason() -> str | None:
    """Why the power-cut tests cannot run here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse (the power-cut suite mounts a FUSE file system)"
    if os.geteuid() != 0:
        return "needs root to mount a FUSE file system (CI runs as root)"
    if importlib.util.find_spec("pyfuse3") is None and not os.environ.get(REQUIRED):
        return "needs pyfuse3: pip install -e '.[test,powercut]' (after apt install fuse3 libfuse3-dev pkg-config)"
    return None


requires_fuse = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


def mounted(mountpoint: Path) -> bool:
    with open("/proc/mounts") as mounts:
        return any(line.split()[1] == str(mountpoint) for line in mounts)


class LossyMount:
    """``mountpoint`` shows ``backing`` through LossyFS while the object lives."""

    def __init__(self, backing: Path, mountpoint: Path, log: Path) -> None:
        self.backing, self.mountpoint, self.log = backing, mountpoint, log
        self.control = backing.parent / f".{mountpoint.name}.lossyfs"
        self.popen: subprocess.Popen | None = None

    def start(self) -> LossyMount:
        try:
            import pyfuse3  # noqa: F401, PLC0415  (the check only: the file system runs in its own process)
        except ImportError:
            pytest.fail(f"pyfuse3 is missing and {REQUIRED} is set: pip install -e '.[test,powercut]'")
        self.backing.mkdir(mode=0o700, exist_ok=True)
        self.mountpoint.mkdir(mode=0o700, exist_ok=True)
        self.control.unlink(missing_ok=True)
        with self.log.open("ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, str(LOSSYFS), str(self.backing), str(self.mountpoint), str(self.control)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        ready, _, _ = select.select([self.popen.stdout], [], [], READY_TIMEOUT)
        line = self.popen.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self.stop()
            pytest.fail(f"lossyfs did not start (see {self.log}): {self.log.read_text()[-2000:]}")
        return self

    def command(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(READY_TIMEOUT)
            sock.connect(str(self.control))
            sock.sendall(command.encode() + b"\n")
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = sock.recv(256)
                assert chunk, f"lossyfs closed the control socket (see {self.log})"
                answer += chunk
        return answer.decode().strip()

    def clear_cache(self) -> str:
        """The power cut: every byte not fsynced is gone.  Kill every
        process writing below the mount point first, and reap it."""
        answer = self.command("clear-cache")
        assert answer.startswith("cleared"), answer
        return answer

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=READY_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=READY_TIMEOUT)
        if self.popen is not None:
            self.popen.stdin.close()
            self.popen.stdout.close()
        if mounted(self.mountpoint):  # the file system died: do not leave a dead mount behind
            subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)
        self.control.unlink(missing_ok=True)

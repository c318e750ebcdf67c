"""systemd's notify protocol, spoken directly over ``$NOTIFY_SOCKET``.

A datagram per state change (``READY=1``, ``STATUS=...``, ``STOPPING=1``);
without the variable (not run by systemd) every call is a no-op.  The
watchdog ping comes from a task of the main trio loop, so a loop that is
stuck stops pinging and systemd restarts the service.
"""

from __future__ import annotations

import os
import socket

import trio


def notify(*fields: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto("\n".join(fields).encode(), address)
        except OSError:
            pass  # systemd gone or socket unusable: nothing to tell


async def watchdog() -> None:
    """Send ``WATCHDOG=1`` at half the unit's ``WatchdogSec``, if it has one."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec.isdigit() or (pid is not None and pid != str(os.getpid())):
        return
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(int(usec) / 2_000_000)

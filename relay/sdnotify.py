"""systemd's notify protocol, spoken directly over ``$NOTIFY_SOCKET``.

A datagram per state change (``READY=1``, ``STATUS=...``, ``STOPPING=1``);
without the variable (not run by systemd) every call is a no-op.
"""

from __future__ import annotations

import os
import socket


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

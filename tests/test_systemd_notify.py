"""The daemon speaks systemd's notify protocol: this test plays systemd's
side with a datagram socket, as in `Type=notify` with `WatchdogSec=`."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio
from processes import DemoSpace

pytestmark = pytest.mark.e2e


async def test_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    space = DemoSpace(tmp_path)
    await space.start_hub()  # which writes its port into relay A's config
    space.hub.kill()
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
    address = str(tmp_path / "notify.sock")
    await sock.bind(address)
    space.a.process.start({**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"})
    process = space.a.process.popen
    messages: list[str] = []
    try:
        with trio.fail_after(20):
            while messages.count("WATCHDOG=1") < 3:
                messages.append((await sock.recv(4096)).decode())
            process.send_signal(signal.SIGTERM)
            while "STOPPING=1" not in messages:
                messages.append((await sock.recv(4096)).decode())
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        sock.close()
    ready = next(m for m in messages if m.startswith("READY=1"))
    assert "STATUS=relay chu-nord.test serving; connecting to the hub" in ready.split("\n")
    assert messages.index(ready) < messages.index("WATCHDOG=1")


async def test_status_lines_follow_the_uplink_and_the_queue(tmp_path: Path) -> None:
    """``STATUS=`` says whether the hub is reachable and how deep the
    outbound queue is, each time that changes."""
    space = DemoSpace(tmp_path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
    address = str(tmp_path / "notify.sock")
    await sock.bind(address)
    statuses: list[str] = []

    async def until(predicate) -> None:
        with trio.fail_after(20):
            while not statuses or not predicate(statuses[-1]):
                message = (await sock.recv(4096)).decode()
                statuses.extend(line[7:] for line in message.split("\n") if line.startswith("STATUS="))

    try:
        await space.start_hub()  # which writes its port into relay A's config
        space.hub.kill()
        await space.start_relay(space.a, env={**os.environ, "NOTIFY_SOCKET": address})
        await until(lambda s: s.startswith("hub ") and "outbound queue 0 " in s)  # no hub yet
        await space.a.send("bob@clinique-sud.test", "waits for the hub")
        await until(lambda s: s.startswith("hub ") and "outbound queue 1 (0 urgent)" in s)
        space.hub.start()
        await until(lambda s: s == "connected to hub.eimis.test; outbound queue 0 (0 urgent)")
    finally:
        space.close()
        sock.close()

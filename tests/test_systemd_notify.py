"""The daemon speaks systemd's notify protocol: this test plays systemd's
side with a datagram socket, as in `Type=notify` with `WatchdogSec=`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from processes import DemoSpace

pytestmark = pytest.mark.e2e


async def test_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "relay", "demo", "--dir", str(tmp_path), "--init-only"],
                   check=True, capture_output=True)
    relay_config = json.loads((tmp_path / "demo.json").read_text())["relays"][0]["config"]
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
    address = str(tmp_path / "notify.sock")
    await sock.bind(address)
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}
    process = subprocess.Popen([sys.executable, "-m", "relay", "run", "--config", relay_config], env=env,
                               stderr=subprocess.DEVNULL)
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
    relay = space.a.process
    relay.popen = subprocess.Popen([sys.executable, "-m", "relay", *relay.argv], env={**os.environ,
                                   "NOTIFY_SOCKET": address}, stderr=subprocess.DEVNULL)
    statuses: list[str] = []

    async def until(predicate) -> None:
        with trio.fail_after(20):
            while not statuses or not predicate(statuses[-1]):
                message = (await sock.recv(4096)).decode()
                statuses.extend(line[7:] for line in message.split("\n") if line.startswith("STATUS="))

    try:
        await until(lambda s: s.startswith("hub ") and "outbound queue 0 " in s)  # no hub yet
        await space.a.send("bob@clinique-sud.test", "waits for the hub")
        await until(lambda s: s.startswith("hub ") and "outbound queue 1 (0 urgent)" in s)
        space.hub.start()
        await until(lambda s: s == "connected to hub.eimis.test; outbound queue 0 (0 urgent)")
    finally:
        space.close()
        sock.close()

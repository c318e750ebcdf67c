"""End to end with real processes: `eimis-relay demo --init-only`, then a
hub and two relays started from those files exactly as an admin would,
driven over their local APIs, killed with SIGKILL and restarted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
from processes import STEP, DemoSpace

pytestmark = pytest.mark.e2e


@pytest.fixture
async def space(tmp_path: Path):
    demo = DemoSpace(tmp_path)
    try:
        await demo.start()
        yield demo.hub, demo.a, demo.b
    finally:
        demo.close()


async def test_messages_cross_both_ways_with_receipts(space) -> None:
    _hub, a, b = space
    to_b = [await a.send("bob@clinique-sud.test", f"a->b {n}") for n in range(5)]
    to_a = [await b.send("alice@chu-nord.test", f"b->a {n}") for n in range(5)]
    await a.settled()  # all acknowledged: the events below are all there will be
    await b.settled()
    assert [e["message"]["id"] for e in await b.events(5)] == to_b
    assert [e["message"]["id"] for e in await a.events(5)] == to_a
    await a.wait_delivered(to_b)
    await b.wait_delivered(to_a)


async def test_sigkill_right_after_202_loses_nothing(space) -> None:
    hub, a, b = space
    hub.kill()  # nothing can leave relay A: the message lives only in its store
    await a.uplink("down")
    ident = await a.send("bob@clinique-sud.test", "survives kill -9")
    a.process.kill()
    a.process.start()
    hub.start()
    await a.uplink("connected")
    await a.settled()
    [event] = await b.events(1)
    assert event["message"]["id"] == ident
    assert event["message"]["body"] == "survives kill -9"
    await a.wait_delivered([ident])


async def test_sigkill_during_a_stream_of_messages(space) -> None:
    """Kill relay A while messages pour in; every one that got its 202 is
    delivered, exactly once and in order, after the restart."""
    _hub, a, b = space
    accepted: list[str] = []

    async def submit_until_refused() -> None:
        async with a.client() as client:
            for n in range(10_000):
                try:
                    response = await client.post("/v1/messages", json={
                        "from": a.users[0], "to": ["bob@clinique-sud.test"], "body": f"stream {n}"})
                except httpx.TransportError:
                    return  # killed mid-request: that one was never acknowledged
                assert response.status_code == 202
                accepted.append(response.json()["id"])

    async with trio.open_nursery(strict_exception_groups=True) as nursery:
        nursery.start_soon(submit_until_refused)
        with trio.fail_after(STEP):
            while len(accepted) < 100:
                await trio.sleep(0.01)
        a.process.kill()
    a.process.start()
    await a.uplink("connected")
    await a.settled()
    events = await b.events(len(accepted))
    received = [e["message"]["id"] for e in events]
    # The request in flight at the kill may have been committed without its
    # 202 reaching us: it may arrive too, but only after all the others.
    assert received[: len(accepted)] == accepted
    assert len(received) - len(accepted) in (0, 1)
    assert len(set(received)) == len(received)
    await a.wait_delivered(accepted)


async def test_sigterm_is_a_clean_stop_and_logs_keep_secrets(space, tmp_path: Path) -> None:
    hub, a, b = space
    secret_body = "Patient Dupont, Jean: INR 4.2"
    ident = await a.send("bob@clinique-sud.test", secret_body)
    await b.events(1)
    await a.wait_delivered([ident])
    for process in (a.process, b.process, hub):
        assert process.terminate() == 0, process.log.read_text()
    logs = "".join(p.log.read_text() for p in (hub, a.process, b.process))
    assert "relay chu-nord.test stopped" in logs and "hub hub.eimis.test stopped" in logs
    assert secret_body not in logs and "Dupont" not in logs
    assert a.token not in logs and b.token not in logs
    assert "PRIVATE KEY" not in logs
    assert "Traceback" not in logs


async def test_unconfigured_relay_says_what_to_do(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "relay", "run", "--config", str(tmp_path / "relay.toml")],
        capture_output=True, check=False, text=True, timeout=STEP,
        env={**os.environ, "CONFIGURATION_DIRECTORY": str(tmp_path)},
    )
    assert result.returncode == 78  # EX_CONFIG: systemd does not restart it in a loop
    assert "relay.toml" in result.stderr and "check-config" in result.stderr


async def test_a_private_key_others_can_read_stops_the_start(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "relay", "demo", "--dir", str(tmp_path), "--init-only"],
                   check=True, capture_output=True)
    key = tmp_path / "pki" / "chu-nord.test.key"
    key.chmod(0o640)
    result = subprocess.run([sys.executable, "-m", "relay", "run", "--config", str(tmp_path / "relay-a.toml")],
                            capture_output=True, check=False, text=True, timeout=STEP)
    assert result.returncode == 78
    assert f"{key} is readable by group or others (mode 640): chmod 600 {key}" in result.stderr
    assert "PRIVATE KEY" not in result.stderr


async def test_a_fresh_install_says_it_is_not_configured_yet(tmp_path: Path) -> None:
    shipped = tmp_path / "relay.toml"
    shipped.write_text("# Settings go in relay.d/*.toml.\n")
    result = subprocess.run([sys.executable, "-m", "relay", "run", "--config", str(shipped)],
                            capture_output=True, check=False, text=True, timeout=STEP)
    assert result.returncode == 78
    [line] = result.stderr.splitlines()
    assert line.startswith("eimis-relay is not configured yet: put your settings in") and "relay.d" in line

"""A hub that keeps the connection alive (it answers PINGs) but leaves a
request unanswered: the relay gives the connection up after ``[uplink]
request_timeout``, replays the same request on a new one, and says
"degraded" with the reason (``status``, ``/readyz``, ``/healthz``,
systemd's STATUS=, a metric) until the hub answers again.

Relay A runs as a process with a one-second deadline; the hub is played
by `peers.StallingHub` in the test (real TLS on loopback, real HTTP/2),
which leaves requests unanswered until the test lets it answer.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest
import trio
from peers import StallingHub
from processes import STEP, DemoSpace
from prometheus_client.parser import text_string_to_metric_families

from relay.core import routes

pytestmark = pytest.mark.e2e

BOB = "bob@clinique-sud.test"
METRICS_LISTENING = re.compile(r"metrics on 127\.0\.0\.1:(\d+)")


class StallSpace(DemoSpace):
    """Relay A of a demo space, pointed at a `StallingHub`, with a short
    request deadline, fast redials, metrics and a systemd notify socket."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.edit("relay-a.toml", "[uplink]\n",
                  "[uplink]\nrequest_timeout = 1.0\nbackoff_initial = 0.1\nbackoff_max = 0.5\n")
        with (directory / "relay-a.toml").open("a") as config:
            config.write('\n[metrics]\nlisten = "127.0.0.1:0"\n')
        self.metrics = ""
        self.notify_address = str(directory / "notify.sock")
        self.statuses: list[str] = []

    async def start_stalled(self, nursery: trio.Nursery, hub: StallingHub) -> None:
        self.edit("relay-a.toml", 'hub_url = "https://127.0.0.1:0"', f'hub_url = "https://127.0.0.1:{hub.port}"')
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
        await sock.bind(self.notify_address)
        nursery.start_soon(self._listen, sock)
        line = await self.start_relay(self.a, env={**os.environ, "NOTIFY_SOCKET": self.notify_address})
        self.metrics = f"http://127.0.0.1:{METRICS_LISTENING.search(line.string, line.end()).group(1)}"

    async def _listen(self, sock) -> None:
        with sock:
            while True:
                message = (await sock.recv(4096)).decode()
                self.statuses += [line[7:] for line in message.split("\n") if line.startswith("STATUS=")]

    async def probes(self) -> tuple[httpx.Response, httpx.Response, dict]:
        async with httpx.AsyncClient(base_url=self.metrics, timeout=STEP) as scraper:
            ready, alive = await scraper.get("/readyz"), await scraper.get("/healthz")
            text = (await scraper.get("/metrics")).text
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        return ready, alive, samples


@pytest.fixture
async def stalling(tmp_path: Path, nursery: trio.Nursery, request: pytest.FixtureRequest):
    space = StallSpace(tmp_path)
    hub = StallingHub(tmp_path / "pki", stall=request.param)
    await nursery.start(hub.serve)
    try:
        await space.start_stalled(nursery, hub)
        yield space, hub
    finally:
        space.close()


async def _until(predicate, what: str) -> None:
    with trio.fail_after(STEP):
        while not predicate():
            await trio.sleep(0.05)


@pytest.mark.parametrize("stalling", ["transaction"], indirect=True)
async def test_an_unanswered_transaction_is_replayed_on_a_new_connection_and_reported(stalling) -> None:
    space, hub = stalling
    await space.a.uplink("connected")
    ident = await space.a.send(BOB, "held by the hub")
    # The hub takes the transaction and never answers, while answering PINGs:
    # after 1 s the relay gives the connection up and sends it again.
    await _until(lambda: len(hub.requests) >= 2, "a replay")
    first, second = hub.requests[:2]
    assert first[1] == second[1] and first[1].startswith(routes.PATH_TRANSACTION)  # the same transaction id
    assert first[2] == second[2] == [ident]
    assert first[0] < second[0]  # on a new connection

    status = await space.a.daemon_status()
    assert status["health"] == "degraded" and not status["healthy"], status
    [problem] = [p for p in status["problems"] if p.startswith("degraded:")]
    assert "the normal lane got no answer from the hub" in problem and first[1] in problem
    [stall] = status["uplink"]["stalls"]
    assert stall["lane"] == "normal" and stall["timeouts"] >= 1
    ready, alive, samples = await space.probes()
    assert ready.status_code == 503 and ready.json()["status"] in ("degraded", "not ready")
    assert any("the normal lane got no answer" in r for r in ready.json()["reasons"])
    assert alive.status_code == 200 and alive.json()["health"] == "degraded"
    assert samples[("eimis_relay_uplink_stalled", (("lane", "normal"),))] == 1
    assert samples[("eimis_relay_uplink_stalled", (("lane", "urgent"),))] == 0
    assert samples[("eimis_relay_uplink_request_timeouts_total", (("lane", "normal"),))] >= 1
    await _until(lambda: any("DEGRADED: no answer from the hub for the normal lane" in s for s in space.statuses),
                 "STATUS= says degraded")

    hub.answering.set()
    with trio.fail_after(STEP):
        while await space.a.status(ident) != "delivered":
            await trio.sleep(0.05)
    assert {path for _, path, _ in hub.requests if path.startswith(routes.PATH_TRANSACTION)} == {first[1]}
    status = await space.a.daemon_status()
    assert status["health"] == "healthy" and status["healthy"] and not status["uplink"]["stalls"], status
    ready, alive, samples = await space.probes()
    assert ready.status_code == 200 and ready.json() == {"ready": True, "status": "ready", "reasons": []}
    assert alive.json() == {"status": "alive", "health": "healthy", "reasons": []}
    assert samples[("eimis_relay_uplink_stalled", (("lane", "normal"),))] == 0
    await _until(lambda: space.statuses and "DEGRADED" not in space.statuses[-1], "STATUS= healthy again")


@pytest.mark.parametrize("stalling", ["ack"], indirect=True)
async def test_an_unanswered_ack_breaks_the_connection_and_the_items_are_acked_again(stalling) -> None:
    space, hub = stalling
    await space.a.uplink("connected")
    ident = await space.a.send(BOB, "its receipt's ack is held")
    def acks() -> list[tuple[int, str, list[str]]]:
        return [r for r in hub.requests if r[1] == routes.PATH_ACK]

    await _until(lambda: len(acks()) >= 2, "an ack sent again")
    first, second = acks()[:2]
    assert first[2] == second[2] and first[0] < second[0]  # the same items, acknowledged on a new connection
    status = await space.a.daemon_status()
    assert status["health"] == "degraded", status
    assert any("the inbox acknowledgements got no answer" in p for p in status["problems"])
    assert await space.a.status(ident) == "delivered"  # committed before it was acknowledged

    hub.answering.set()
    with trio.fail_after(STEP):
        while (await space.a.daemon_status())["health"] != "healthy":
            await trio.sleep(0.05)

"""The hub's own bounds and its operational surface, against a real hub
process as the operator of the national space runs it: connection,
handshake and per-domain limits, the state directory's lock, the shutdown
order, ``/metrics``, ``status`` and ``doctor``."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sqlite3
import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import trio
from conftest import Space
from peers import HubClient
from processes import STEP, DemoSpace
from prometheus_client.parser import text_string_to_metric_families
from test_operations import cli, wait_log

from relay.core import routes
from relay.core.h2session import ConnectionClosed
from relay.core.protocol import Envelope
from relay.net.tls import relay_client_context
from relay.pki import authority
from relay.store import hub_queue

pytestmark = pytest.mark.e2e

NORD, SUD = "chu-nord.test", "clinique-sud.test"
BOB = "bob@clinique-sud.test"
METRICS_LISTENING = re.compile(r"metrics on 127\.0\.0\.1:(\d+)")
# Well below every handshake_timeout set here: what happens within it is
# the hub's doing, not a timeout's.
PROMPTLY = 3.0


class HubSpace(DemoSpace):
    """A demo space whose hub has the given extra [hub] settings and serves metrics."""

    def __init__(self, directory: Path, settings: str = "") -> None:
        super().__init__(directory)
        self.edit("hub.toml", "[hub]\n", "[hub]\n" + settings)
        with (directory / "hub.toml").open("a") as config:
            config.write('\n[metrics]\nlisten = "127.0.0.1:0"\n')
        self.hub_toml = str(directory / "hub.toml")
        self.metrics = ""

    async def start_hub(self) -> int:
        port = await super().start_hub()
        line = await self.hub.reported(METRICS_LISTENING)
        self.metrics = f"http://127.0.0.1:{line.group(1)}"
        return port

    @property
    def url(self) -> str:
        return self.manifest["hub"]["url"]

    @property
    def port(self) -> int:
        return urlsplit(self.url).port

    def client(self, domain: str = NORD) -> HubClient:
        return HubClient(self.directory, domain, self.url)


@pytest.fixture
async def hub_space(tmp_path: Path, request):
    space = HubSpace(tmp_path, getattr(request, "param", ""))
    try:
        yield space
    finally:
        space.close()


def transaction(txn: str) -> routes.Request:
    return routes.transaction(txn, [Envelope(f"m-{txn}", f"alice@{NORD}", (BOB,), (BOB,), "bonjour", None,
                                             "normal", time.time())])


async def closed_by_peer(stream: trio.SocketStream) -> bool:
    try:
        return await stream.receive_some(1) == b""
    except trio.BrokenResourceError:  # a reset
        return True


async def scrape(url: str) -> dict:
    async with httpx.AsyncClient(timeout=STEP) as client:
        text = (await client.get(f"{url}/metrics")).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.parametrize("hub_space", ["max_handshakes = 4\nmax_connections = 12\nhandshake_timeout = 8\n"],
                         indirect=True)
async def test_a_crowd_of_silent_connections_cannot_lock_relays_out(hub_space: HubSpace) -> None:
    await hub_space.start_hub()
    crowd = [await trio.open_tcp_stream("127.0.0.1", hub_space.port) for _ in range(20)]
    with trio.fail_after(PROMPTLY):  # the oldest handshakes make room for the newer ones, at once
        for stream in crowd[:16]:
            assert await closed_by_peer(stream)
    with trio.move_on_after(0.2) as still:  # the newest max_handshakes are still given their chance
        await crowd[16].receive_some(1)
    assert still.cancelled_caught
    with trio.fail_after(PROMPTLY):  # an honest relay gets through the crowd
        async with hub_space.client() as relay:
            await relay.post(transaction("crowd-txn-0001"))
            more = [await trio.open_tcp_stream("127.0.0.1", hub_space.port) for _ in range(20)]
            for stream in crowd[16:] + more[:16]:
                assert await closed_by_peer(stream)
            await relay.post(transaction("crowd-txn-0002"))  # an authenticated connection is never evicted
    with trio.fail_after(STEP):  # and a silent one ends with handshake_timeout
        for stream in more[16:]:
            assert await closed_by_peer(stream)
    samples = await scrape(hub_space.metrics)
    assert samples[("eimis_hub_handshakes_total", (("outcome", "evicted"),))] == 36
    assert samples[("eimis_hub_handshakes_total", (("outcome", "timed_out"),))] == 4
    assert samples[("eimis_hub_handshakes_total", (("outcome", "ok"),))] == 1
    assert samples[("eimis_hub_handshakes_in_progress", ())] == 0
    for stream in crowd + more:
        await stream.aclose()


@pytest.mark.parametrize("hub_space", ["max_connections_per_domain = 2\n"], indirect=True)
async def test_a_domain_holds_at_most_its_connections_and_a_second_hub_is_refused(hub_space: HubSpace) -> None:
    await hub_space.start_hub()
    with trio.fail_after(STEP):
        async with hub_space.client() as first, hub_space.client() as second:
            await first.post(routes.ack([], []))
            await second.post(routes.ack([], []))
            async with hub_space.client() as third:
                with pytest.raises(ConnectionClosed):
                    await third.post(routes.ack([], []))
            async with hub_space.client(SUD) as other:  # other domains are not held back
                await other.post(routes.ack([], []))
        async with hub_space.client() as again:  # the places are given back
            await again.post(routes.ack([], []))
    assert "chu-nord.test has max_connections_per_domain (2) connections already" in hub_space.hub.log.read_text()
    samples = await scrape(hub_space.metrics)
    assert samples[("eimis_hub_connections_refused_total", (("reason", "domain_capacity"),))] == 1

    result = await cli("hub", "--config", hub_space.hub_toml)
    assert result.returncode == 75  # EX_TEMPFAIL: free to start once the other one stops
    assert f"in use by eimis-relay hub (pid {hub_space.hub.popen.pid})".encode() in result.stderr


async def stalled_request(space: HubSpace) -> trio.SSLStream:
    """A relay's connection with a request whose body never ends, made
    with h2 itself: unlike the relay's client, it stays open after a GOAWAY,
    as a slow peer would.  Returns once the hub has read the request's start
    (it answered a PING sent after it)."""
    pki = space.directory / "pki"
    context = relay_client_context(pki / f"{NORD}.pem", pki / f"{NORD}.key", pki / "ca.pem")
    tls = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", space.port), context,
                         server_hostname=HubClient.AUTHORITY)
    await tls.do_handshake()
    session = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    session.initiate_connection()
    session.send_headers(1, [(":method", "POST"), (":scheme", "https"), (":authority", HubClient.AUTHORITY),
                             (":path", "/v1/transactions/slow-txn-0001"), ("content-type", "application/msgpack")])
    session.send_data(1, b"\x82")  # a body begun, never finished: the hub waits for it
    session.ping(b"stalled!")
    await tls.send_all(session.data_to_send())
    with trio.fail_after(STEP):
        while not any(isinstance(event, h2.events.PingAckReceived)
                      for event in session.receive_data(await tls.receive_some(65536))):
            pass
    return tls


async def test_shutdown_stops_accepting_before_the_drain(hub_space: HubSpace) -> None:
    """SIGTERM while a request is in flight: the hub drains it (up to its
    drain time), and meanwhile takes no new connection."""
    await hub_space.start_hub()
    stalled = await stalled_request(hub_space)
    hub_space.hub.popen.send_signal(signal.SIGTERM)
    await wait_log(hub_space.hub, "shutting down")
    with trio.fail_after(PROMPTLY):
        while True:
            try:
                probe = await trio.open_tcp_stream("127.0.0.1", hub_space.port)
            except OSError:
                break  # refused: the listener is closed
            await probe.aclose()
            await trio.sleep(0.02)
    assert hub_space.hub.popen.poll() is None  # still draining the request in flight
    assert hub_space.hub.popen.wait(timeout=STEP) == 0
    log = hub_space.hub.log.read_text()
    assert log.index("no longer accepts connections") < log.index("hub hub.eimis.test stopped")
    await trio.aclose_forcefully(stalled)


async def test_metrics_status_and_doctor_of_a_running_hub(hub_space: HubSpace) -> None:
    await hub_space.start()
    sent = await hub_space.a.send(BOB, "counted by the hub")
    await hub_space.a.wait_delivered([sent])
    with trio.fail_after(STEP):  # the delivery receipt's ack may still be on its way
        while (samples := await scrape(hub_space.metrics))[("eimis_hub_acked_positions_total", ())] < 2:
            await trio.sleep(0.05)
    assert samples[("eimis_hub_transactions_total", ())] >= 1
    assert samples[("eimis_hub_envelopes_total", (("result", "accepted"),))] == 1
    assert samples[("eimis_hub_envelopes_total", (("result", "expired"),))] == 0
    assert samples[("eimis_hub_connections", ())] == 2
    assert samples[("eimis_hub_connected_domains", ())] == 2
    assert samples[("eimis_hub_inbox_backlog", (("lane", "normal"),))] == 0
    assert samples[("eimis_hub_store_commit_seconds_count", ())] > 0
    assert samples[("eimis_hub_sweeps_total", ())] >= 1
    assert ("eimis_hub_pruned_rows_total", (("table", "seen"),)) in samples
    assert ("eimis_hub_certificate_expiry_timestamp_seconds", (("certificate", "hub"),)) in samples
    async with httpx.AsyncClient(base_url=hub_space.metrics, timeout=STEP) as client:
        assert (await client.get("/readyz")).json() == {"ready": True, "reasons": []}
        assert (await client.get("/healthz")).status_code == 200

    result = await cli("status", "--json", "--config", hub_space.hub_toml)
    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout)
    assert snapshot["kind"] == "hub" and snapshot["healthy"] and snapshot["accepting"]
    assert snapshot["connections"]["domains"] == {NORD: 1, SUD: 1}
    assert snapshot["sweep"]["replay_window"] == 30 * 86400
    human = await cli("status", "--config", hub_space.hub_toml)
    assert human.returncode == 0 and b"health       ok" in human.stdout and b"2 from 2 domain(s)" in human.stdout

    report = (await cli("doctor", "--config", hub_space.hub_toml)).stdout.decode()
    for topic in ("config", "permissions", "certificate", "key size", "tls", "listen", "store", "daemon"):
        assert f"ok       {topic}" in report, report
    assert "warning  crl" in report  # the demo lists no CRL

    hub_space.hub.terminate()
    result = await cli("status", "--config", hub_space.hub_toml)
    assert result.returncode == 3 and b"no eimis-relay daemon is running" in result.stderr
    report = await cli("doctor", "--config", hub_space.hub_toml)
    assert report.returncode == 1 and b"failed   listen" in report.stdout


# -- in the test's own process: what needs the hub's insides -------------------------------


@pytest.mark.parametrize("daemon", ["hub", "relay"])
async def test_sighup_right_after_ready_is_a_reload(stopped_space: Space, monkeypatch, caplog, daemon) -> None:
    """systemd may reload a unit as soon as it said READY=1; SIGHUP's
    default action ends the process, so its handler must be in place by
    then.  A handler of the test's stands in for that default: it must
    not be called."""
    notify = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
    await notify.bind(str(stopped_space.directory / "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(stopped_space.directory / "notify.sock"))
    lost: list[int] = []
    previous = signal.signal(signal.SIGHUP, lambda signum, frame: lost.append(signum))
    try:
        with caplog.at_level(logging.INFO, logger="relay.runtime.reload"):
            if daemon == "hub":
                await stopped_space.start_hub()
            else:
                await stopped_space.start_hub()
                await stopped_space.start_relay(stopped_space.a, wait_connected=False)
            assert (await notify.recv(4096)).startswith(b"READY=1")  # sent before `started`
            if daemon == "relay":
                assert (await notify.recv(4096)).startswith(b"READY=1")
            os.kill(os.getpid(), signal.SIGHUP)  # right away: no checkpoint since READY
            with trio.fail_after(STEP):
                while not any(r.getMessage().startswith("reloaded ") for r in caplog.records):
                    await trio.sleep(0.01)
        assert lost == []
    finally:
        signal.signal(signal.SIGHUP, previous)
        notify.close()


async def test_a_store_failure_while_admitting_a_relay_does_not_end_the_hub(stopped_space: Space,
                                                                             monkeypatch) -> None:
    """Learning a new domain writes to the store; a full disk then fails
    that unit (the store reports StoreUnavailable).  Only that connection
    may end: the hub, and every other relay, go on."""
    space = stopped_space
    space.hub_config = replace(space.hub_config, learn_domains=True)
    pki = space.directory / "pki"
    authority.issue_certificate(pki / "ca.pem", pki / "ca.key", pki, dns_names=["ehpad-est.test"], role="relay",
                                org_id="1750000003")
    real = hub_queue.register_domains
    full = True

    def register(conn, names, learnt, *, now):
        if learnt and full:  # the disk is full: SQLite fails the write, and with it the group's commit
            raise sqlite3.OperationalError("database or disk is full")
        return real(conn, names, learnt, now=now)

    monkeypatch.setattr(hub_queue, "register_domains", register)
    await space.start_hub()
    url = f"https://127.0.0.1:{space.hub_config.listen.port}"
    with trio.fail_after(STEP):
        async with HubClient(space.directory, "ehpad-est.test", url) as newcomer:
            with pytest.raises(ConnectionClosed):
                await newcomer.post(routes.ack([], []))
        async with HubClient(space.directory, NORD, url) as known:  # the hub still serves
            await known.post(routes.ack([], []))
        full = False
        async with HubClient(space.directory, "ehpad-est.test", url) as newcomer:  # learnt, once the disk has room
            await newcomer.post(routes.ack([], []))

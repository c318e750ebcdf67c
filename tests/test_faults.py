"""The fault suite: the delivery promise (docs/guarantees.md) under crashes,
outages, dead links, full disks and replays, with real processes.

Each scenario runs a hub and two relays from `demo --init-only` files,
drives traffic through relay A's local API the way a careful vendor does
(an Idempotency-Key per message, retried until a 202), injects its faults,
then checks every accepted message against what relay B's systems got:
none lost, none duplicated, order per (sender, recipient) kept.  Each
prints one summary line.  Run alone with ``pytest -m faults``.

"Nothing more will come" is never guessed from a quiet moment: B's events
are read once relay A's status counts no recipient queued or sent (see
`Site.settled`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sqlite3
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import httpx
import pytest
import trio
from conftest import Space
from peers import HubClient, SilentLink, WebhookReceiver
from processes import STEP, DemoSpace, Site

from relay.core import protocol, routes
from relay.core.backoff import RetryPolicy
from relay.core.protocol import Envelope
from relay.store import engine

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

SEED = int(os.environ.get("FAULT_SEED", random.randrange(1 << 30)))
PAIRS = [
    ("alice@chu-nord.test", "bob@clinique-sud.test"),
    ("carol@chu-nord.test", "dan@clinique-sud.test"),
    ("alice@chu-nord.test", "dan@clinique-sud.test"),
]
# Relays retry fast here, so that a scenario's outages stay short.
FAST_RETRY = "[uplink]\nbackoff_initial = 0.2\nbackoff_max = 2.0\n"


@dataclass
class Traffic:
    """Messages from relay A's users, submitted one after the other."""

    site: Site
    tag: str
    accepted: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))
    refusals: int = 0  # 503s and connection failures, each retried
    unavailable: int = 0  # the 503s among them (each checked for Retry-After)
    priority: str = "normal"
    padding: int = 0  # extra body bytes, to fill a store faster

    @property
    def count(self) -> int:
        return sum(len(ids) for ids in self.accepted.values())

    async def run(self, stop: trio.Event, *, limit: int = 100_000) -> None:
        async with self.site.client() as client:
            for n in range(limit):
                if stop.is_set():
                    return
                sender, recipient = PAIRS[n % len(PAIRS)]
                body = f"{self.tag} {n} " + "x" * self.padding
                document = {"from": sender, "to": [recipient], "body": body, "priority": self.priority}
                ident = await self._submit(client, document, f"{self.tag}-{n}", stop)
                if ident is None:
                    return
                self.accepted[(sender, recipient)].append(ident)

    async def _submit(self, client: httpx.AsyncClient, document: dict, key: str, stop: trio.Event) -> str | None:
        """Retry with the same key until a 202: a request cut by a crash may
        have been committed, and the key makes the retry return its id."""
        while True:
            try:
                response = await client.post("/v1/messages", json=document, headers={"Idempotency-Key": key})
                if response.status_code == 202:
                    return response.json()["id"]
                assert response.status_code == 503, response.text
                assert response.headers["retry-after"]
                self.unavailable += 1
            except httpx.TransportError:
                pass
            self.refusals += 1
            if stop.is_set():
                return None
            await trio.sleep(0.05)


@dataclass
class Verdict:
    accepted: int
    lost: int
    duplicated: int
    out_of_order: int


def judge(traffic: Traffic, events: list[dict]) -> Verdict:
    received: dict[tuple[str, str], list[str]] = defaultdict(list)
    for event in events:
        message = event["message"]
        for recipient in message["to"]:
            received[(message["from"], recipient)].append(message["id"])
    lost = duplicated = out_of_order = 0
    for pair, expected in traffic.accepted.items():
        got = [ident for ident in received[pair] if ident in set(expected)]
        duplicated += len(got) - len(set(got))
        lost += len(set(expected) - set(got))
        position = {ident: n for n, ident in enumerate(expected)}
        seen = list(dict.fromkeys(got))
        out_of_order += sum(position[x] > position[y] for x, y in pairwise(seen))
    return Verdict(traffic.count, lost, duplicated, out_of_order)


async def collect(origin: Site, site: Site, *, token: str | None = None) -> list[dict]:
    """Every message event of ``site``, read once ``origin`` has settled:
    each of its messages was then delivered to ``site`` and acknowledged to
    the hub (or failed, which the verdict counts as lost), so no message
    and no duplicate can still be on its way."""
    await origin.settled()
    return [e for e in await site.events(0, token=token) if e["type"] == "message"]


def report(capsys: pytest.CaptureFixture, scenario: str, verdict: Verdict, faults: int, extra: str = "") -> None:
    with capsys.disabled():
        print(f"\nfault scenario {scenario}: accepted {verdict.accepted}, faults injected {faults}, "
              f"lost {verdict.lost}, duplicated {verdict.duplicated}, out of order {verdict.out_of_order}"
              f"{extra} (seed {SEED})")
    assert (verdict.lost, verdict.duplicated, verdict.out_of_order) == (0, 0, 0)


@pytest.fixture
def space(tmp_path: Path):
    demo = DemoSpace(tmp_path)
    for name in ("relay-a.toml", "relay-b.toml"):
        demo.edit(name, "[uplink]\n", FAST_RETRY)
    try:
        yield demo
    finally:
        demo.close()


async def _kill_repeatedly(space: DemoSpace, victim: str, capsys, *, kills: int = 3) -> None:
    rng = random.Random(f"{SEED}-{victim}")
    await space.start()
    process = {"origin": space.a.process, "hub": space.hub, "destination": space.b.process}[victim]
    traffic = Traffic(space.a, f"kill-{victim}")
    stop = trio.Event()
    async with trio.open_nursery(strict_exception_groups=True) as nursery:
        nursery.start_soon(traffic.run, stop)
        for _ in range(kills):
            await trio.sleep(rng.uniform(0.3, 1.5))
            process.kill()
            await trio.sleep(rng.uniform(0.0, 0.5))
            process.start()
        await trio.sleep(0.5)
        stop.set()
    await space.a.uplink("connected")
    await space.b.uplink("connected")
    events = await collect(space.a, space.b)
    name = {"origin": "1 SIGKILL origin relay", "hub": "2 SIGKILL hub", "destination": "3 SIGKILL destination relay"}
    report(capsys, name[victim], judge(traffic, events), kills)


async def test_sigkill_origin_relay_during_traffic(space: DemoSpace, capsys) -> None:
    await _kill_repeatedly(space, "origin", capsys)


async def test_sigkill_hub_during_traffic(space: DemoSpace, capsys) -> None:
    await _kill_repeatedly(space, "hub", capsys)


async def test_sigkill_destination_relay_during_traffic(space: DemoSpace, capsys) -> None:
    await _kill_repeatedly(space, "destination", capsys)


async def test_hub_down_longer_than_keepalive(space: DemoSpace, capsys) -> None:
    space.edit("relay-a.toml", "[uplink]\n", "[uplink]\nkeepalive_interval = 0.5\nkeepalive_timeout = 0.5\n")
    await space.start()
    traffic = Traffic(space.a, "hub-down")
    stop = trio.Event()
    outage = 4.0
    async with trio.open_nursery(strict_exception_groups=True) as nursery:
        nursery.start_soon(traffic.run, stop)
        await trio.sleep(0.5)
        log_before = len(space.a.process.log.read_text())
        space.hub.kill()
        await space.a.uplink("down")
        before = traffic.count
        await trio.sleep(outage)
        during = traffic.count - before
        delays = [float(d) for d in RECONNECTING.findall(space.a.process.log.read_text()[log_before:])]
        space.hub.start()
        await space.a.uplink("connected")
        await trio.sleep(0.5)
        stop.set()
    assert during > 0  # submissions are taken while the hub is away
    # Not a tight loop: each wait is within what the policy gives that
    # attempt (the log rounds to a tenth of a second).
    assert delays and all(low - 0.05 <= delay <= high + 0.05
                          for delay, (low, high) in zip(delays, reconnect_bounds(FAST_POLICY), strict=False)), delays
    events = await collect(space.a, space.b)
    report(capsys, "4 hub down", judge(traffic, events), 1, f", accepted during outage {during}, "
           f"reconnect waits {delays}")


RECONNECTING = re.compile(r"reconnecting in (\d+\.\d) s")
FAST_POLICY = RetryPolicy(initial=0.2, maximum=2.0)  # FAST_RETRY's


def reconnect_bounds(policy: RetryPolicy):
    """The range of each wait after a connection that had been up less than
    the uplink's STABLE_AFTER broke, its first dial having worked: step k
    for the k-th wait, doubling up to the maximum; equal jitter takes the
    upper half of each step."""
    class Edge:
        def __init__(self, upper: bool) -> None:
            self.upper = upper

        def uniform(self, low: float, high: float) -> float:
            return high if self.upper else low

    for attempt in range(1000):
        yield policy.delay(attempt, Edge(False)), policy.delay(attempt, Edge(True))


def test_reconnect_waits_are_exact_data() -> None:
    waits = list(zip(range(7), reconnect_bounds(FAST_POLICY), strict=False))
    assert [bounds for _, bounds in waits] == [(0.1, 0.2), (0.2, 0.4), (0.4, 0.8), (0.8, 1.6), (1.0, 2.0),
                                               (1.0, 2.0), (1.0, 2.0)]


async def test_silent_link_is_detected_by_ping(space: DemoSpace, capsys, nursery) -> None:
    hub_port = await space.start_hub()
    link = SilentLink(hub_port)
    await nursery.start(link.serve)
    space.edit("relay-a.toml", f'hub_url = "https://127.0.0.1:{hub_port}"',
               f'hub_url = "https://127.0.0.1:{link.port}"')
    space.edit("relay-a.toml", "[uplink]\n", "[uplink]\nkeepalive_interval = 1.0\nkeepalive_timeout = 1.0\n")
    await space.start_relays()
    traffic = Traffic(space.a, "silent")
    stop = trio.Event()
    async with trio.open_nursery(strict_exception_groups=True) as inner:
        inner.start_soon(traffic.run, stop)
        await trio.sleep(0.5)
        connections = link.connections
        silenced_at = trio.current_time()
        link.go_silent()
        with trio.fail_after(STEP):
            while link.connections == connections:
                await trio.sleep(0.02)
        detected_after = trio.current_time() - silenced_at
        await space.a.uplink("connected")
        await trio.sleep(0.5)
        stop.set()
    # PING every second, one second to answer; plus the first backoff.
    assert detected_after < 1.0 + 1.0 + 2.0 + 1.0, detected_after
    events = await collect(space.a, space.b)
    report(capsys, "5 silent link", judge(traffic, events), 1, f", dead peer found in {detected_after:.1f} s")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root; "
                    "test_store_cannot_write_without_root checks the same promises on a database page limit")
async def test_store_cannot_write(space: DemoSpace, capsys) -> None:
    state = space.directory / "state-relay-a"
    state.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs", str(state)], check=True)
    try:
        await space.start()
        space.hub.kill()  # messages pile up in relay A's small store
        await space.a.uplink("down")
        traffic = Traffic(space.a, "disk-full", padding=1024)
        stop = trio.Event()
        async with trio.open_nursery(strict_exception_groups=True) as nursery:
            nursery.start_soon(traffic.run, stop)
            with trio.fail_after(STEP * 3):
                while traffic.unavailable < 5:  # 503 + Retry-After, again and again: the disk is full
                    await trio.sleep(0.05)
            full_at = traffic.count
            subprocess.run(["mount", "-o", "remount,size=64m", str(state)], check=True)
            with trio.fail_after(STEP):
                while traffic.count < full_at + 20:  # taken again, by itself
                    await trio.sleep(0.05)
            stop.set()
        space.hub.start()
        events = await collect(space.a, space.b)
    finally:
        space.close()
        subprocess.run(["umount", str(state)], check=False)
    report(capsys, "6 disk full", judge(traffic, events), 1, f", 503s while full {traffic.unavailable}")


class PageLimit:
    """A test-only ceiling on one state directory's database: SQLite's
    ``max_page_count`` on the connections the store opens there, so that
    writes fail with SQLITE_FULL, as on a full disk, without root."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.connections: list[sqlite3.Connection] = []

    def connect(self, path: Path, ring=None) -> sqlite3.Connection:
        conn = REAL_CONNECT(path, ring)
        if path.parent.resolve() == self.state.resolve():
            self.connections.append(conn)
        return conn

    def set(self, extra_pages: int | None) -> None:
        """Room for ``extra_pages`` more pages (None: no limit); call it
        while the store is idle."""
        for conn in self.connections:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {1 << 30 if extra_pages is None else pages + extra_pages}")


REAL_CONNECT = engine.connect


async def test_store_cannot_write_without_root(stopped_space: Space, monkeypatch, capsys) -> None:
    """Scenario 6 for any user: the relay's database stops growing at a page
    limit instead of a full tmpfs; the same promises hold."""
    space = stopped_space
    limit = PageLimit(space.a.config.state_dir)
    monkeypatch.setattr(engine, "connect", limit.connect)
    await space.start()
    await space.stop_hub()  # messages pile up in relay A's store
    await space.wait_uplink(space.a, "down")
    limit.set(extra_pages=64)
    traffic = Traffic(space.a, "pages-full", padding=1024)
    stop = trio.Event()
    async with trio.open_nursery(strict_exception_groups=True) as nursery:
        nursery.start_soon(traffic.run, stop)
        with trio.fail_after(STEP * 3):
            while traffic.unavailable < 5:  # 503 + Retry-After, again and again: the store is full
                await trio.sleep(0.05)
        full_at = traffic.count
        limit.set(None)
        with trio.fail_after(STEP):
            while traffic.count < full_at + 20:  # taken again, by itself
                await trio.sleep(0.05)
        stop.set()
    await space.start_hub()
    await space.settled(space.a)
    events = [e for e in await space.events(space.b, 0) if e["type"] == "message"]
    report(capsys, "6b store full (page limit)", judge(traffic, events), 1,
           f", 503s while full {traffic.unavailable}")


async def test_replayed_transaction_and_ack_create_nothing_twice(space: DemoSpace, capsys) -> None:
    await space.start_hub()
    hub_url = space.manifest["hub"]["url"]
    bob = ("bob@clinique-sud.test",)

    def transaction(txn: str, ident: str) -> routes.Request:
        return routes.transaction(txn, [Envelope(ident, "alice@chu-nord.test", bob, bob, "once only", None,
                                                 "normal", time.time())])

    async with HubClient(space.directory, "chu-nord.test", hub_url) as a:
        first = await a.post(transaction("replay-txn-0001", "replayed-message-1"))
        again = await a.post(transaction("replay-txn-0001", "replayed-message-1"))
        other = await a.post(transaction("replay-txn-0002", "replayed-message-1"))
        await a.post(transaction("marker-txn-0001", "marker-1"))
    assert first == again == other
    assert protocol.decode_outcomes(first, 1)[0].accepted
    async with HubClient(space.directory, "clinique-sud.test", hub_url) as b:
        before_ack = await b.inbox_until("marker-1")
        replayed = [item.seq for item in before_ack if item.envelope.id == "replayed-message-1"]
        ack = routes.ack(replayed, [])
        await b.post(ack)
        await b.post(ack)
        await b.post(routes.ack([before_ack[-1].seq], []))
    async with HubClient(space.directory, "chu-nord.test", hub_url) as a:
        await a.post(transaction("marker-txn-0002", "marker-2"))
        receipts = [item.receipt.id for item in await a.inbox_until("marker-1")]
    async with HubClient(space.directory, "clinique-sud.test", hub_url) as b:
        after_ack = await b.inbox_until("marker-2")  # nothing acknowledged comes again
    deliveries = [item.envelope.id for item in before_ack + after_ack].count("replayed-message-1")
    told = receipts.count("replayed-message-1")  # "delivered" receipts to the origin
    verdict = Verdict(1, int(deliveries == 0), max(0, deliveries - 1) + max(0, told - 1), 0)
    assert told == 1, receipts
    report(capsys, "7 replays", verdict, 3)


async def test_webhook_fails_hangs_then_recovers(space: DemoSpace, capsys, nursery) -> None:
    receiver = WebhookReceiver()
    receiver.fail_next, receiver.hang_next = 3, 2
    await nursery.start(receiver.serve)
    secret = space.directory / "webhook.secret"
    secret.write_bytes(b"fault-suite-webhook-signing-key")
    secret.chmod(0o600)
    # Bob's system pushes by webhook; Dan's ("pager") polls: a dead webhook
    # of one must not hold back the other.
    pager_token = "pager-token-for-the-fault-suite"
    space.edit("relay-b.toml", 'users = ["bob@clinique-sud.test", "dan@clinique-sud.test"]',
               f'users = ["bob@clinique-sud.test"]\nwebhook_url = "http://127.0.0.1:{receiver.port}/hook"\n'
               f'webhook_secret_file = "webhook.secret"\nwebhook_timeout = 1\n\n'
               f'[[local_system]]\nname = "pager"\n'
               f'token_sha256 = "{hashlib.sha256(pager_token.encode()).hexdigest()}"\n'
               f'users = ["dan@clinique-sud.test"]')
    await space.start()
    traffic = Traffic(space.a, "webhook")
    stop = trio.Event()
    async with trio.open_nursery(strict_exception_groups=True) as inner:
        inner.start_soon(traffic.run, stop)
        await trio.sleep(1.0)
        stop.set()
    dan_events = await collect(space.a, space.b, token=pager_token)
    with trio.fail_after(60):  # B's pusher stores its position after each 2xx: at the end, all were pushed
        while (await space.b.daemon_status())["queues"]["webhook_backlog"].get("demo-messenger") != 0:
            await trio.sleep(0.05)
    pushed = [json.loads(body) for _, body in receiver.received]
    verdict = judge(traffic, dan_events + pushed)
    # Retries reuse the Event-Id: the first event was tried until it got through.
    first_id = receiver.attempts[0]
    assert receiver.attempts[: 3 + 2 + 1] == [first_id] * 6
    report(capsys, "8 webhook", verdict, 5)


async def test_store_at_high_water_takes_urgent_only(space: DemoSpace, capsys) -> None:
    space.edit("relay-a.toml", "[local_api]\n", '[store]\nmax_size = "400KiB"\nhigh_water = 0.6\n\n[local_api]\n')
    await space.start()
    space.hub.kill()
    await space.a.uplink("down")
    normal = Traffic(space.a, "high-water", padding=4096)
    stop = trio.Event()
    async with trio.open_nursery(strict_exception_groups=True) as nursery:
        nursery.start_soon(normal.run, stop)
        with trio.fail_after(STEP * 3):
            while normal.unavailable == 0:
                await trio.sleep(0.05)
        urgent = Traffic(space.a, "urgent", priority="urgent")
        await urgent.run(trio.Event(), limit=3)
        assert urgent.count == 3 and urgent.refusals == 0
        refused_at = normal.count
        space.hub.start()  # the queue drains, space comes back: normal messages are taken again
        with trio.fail_after(STEP * 3):
            while normal.count < refused_at + 20:
                await trio.sleep(0.05)
        stop.set()
    events = await collect(space.a, space.b)
    verdict = judge(normal, events)
    urgent_verdict = judge(urgent, events)
    total = Verdict(verdict.accepted + urgent_verdict.accepted, verdict.lost + urgent_verdict.lost,
                    verdict.duplicated + urgent_verdict.duplicated, verdict.out_of_order + urgent_verdict.out_of_order)
    report(capsys, "9 high water", total, 1, f", normal refusals {normal.refusals}, urgent taken {urgent.count}")

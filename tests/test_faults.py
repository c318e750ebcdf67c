"""The fault suite: the delivery promise (docs/guarantees.md) under crashes,
outages, dead links, full disks and replays, with real processes.

Each scenario runs a hub and two relays from `demo --init-only` files,
drives traffic through relay A's local API the way a careful vendor does
(an Idempotency-Key per message, retried until a 202), injects its faults,
then checks every accepted message against what relay B's systems got:
none lost, none duplicated, order per (sender, recipient) kept.  Each
prints one summary line.  Run alone with ``pytest -m faults``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio
from peers import HubClient, SilentLink, WebhookReceiver
from processes import STEP, DemoSpace, Site

from relay.core import protocol, routes
from relay.core.protocol import Envelope

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
        out_of_order += sum(position[x] > position[y] for x, y in zip(seen, seen[1:]))
    return Verdict(traffic.count, lost, duplicated, out_of_order)


async def collect(site: Site, expected: int, *, token: str | None = None, settle: float = 1.0) -> list[dict]:
    """Every message event of the site, once ``expected`` have come and
    nothing more arrived for ``settle`` seconds (a late duplicate would)."""
    found: list[dict] = []
    cursor = 0
    headers = {"Authorization": f"Bearer {token or site.token}"}
    async with httpx.AsyncClient(base_url=site.url, headers=headers, timeout=STEP) as client:
        with trio.fail_after(120):
            while True:
                wait = 5 if len(found) < expected else settle
                page = (await client.get("/v1/events", params={"after": cursor, "wait": wait})).json()
                if not page["events"] and len(found) >= expected:
                    return found
                found += [e for e in page["events"] if e["type"] == "message"]
                cursor = page["next"]


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
    events = await collect(space.b, traffic.count)
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
        space.hub.kill()
        await space.a.uplink("down")
        before = traffic.count
        attempts_before = space.a.process.log.read_text().count("reconnecting in")
        await trio.sleep(outage)
        during = traffic.count - before
        attempts = space.a.process.log.read_text().count("reconnecting in") - attempts_before
        space.hub.start()
        await space.a.uplink("connected")
        await trio.sleep(0.5)
        stop.set()
    assert during > 0  # submissions are taken while the hub is away
    # Backoff from 0.2 s doubling to 2 s: about six attempts in four seconds, not a tight loop.
    assert 1 <= attempts <= 10, attempts
    events = await collect(space.b, traffic.count)
    report(capsys, "4 hub down", judge(traffic, events), 1, f", accepted during outage {during}, "
           f"reconnect attempts {attempts}")


async def test_silent_link_is_detected_by_ping(space: DemoSpace, capsys, nursery) -> None:
    hub_url = space.manifest["hub"]["url"]
    hub_port = int(hub_url.rsplit(":", 1)[1])
    link = SilentLink(hub_port)
    await nursery.start(link.serve)
    space.edit("relay-a.toml", f'hub_url = "{hub_url}"', f'hub_url = "https://127.0.0.1:{link.port}"')
    space.edit("relay-a.toml", "[uplink]\n", "[uplink]\nkeepalive_interval = 1.0\nkeepalive_timeout = 1.0\n")
    await space.start()
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
    events = await collect(space.b, traffic.count)
    report(capsys, "5 silent link", judge(traffic, events), 1, f", dead peer found in {detected_after:.1f} s")


async def test_store_cannot_write(space: DemoSpace, capsys) -> None:
    state = space.directory / "state-relay-a"
    state.mkdir(mode=0o700)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs", str(state)], check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"this scenario needs root to mount a small tmpfs: {exc}")
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
        events = await collect(space.b, traffic.count)
    finally:
        space.close()
        subprocess.run(["umount", str(state)], check=False)
    report(capsys, "6 disk full", judge(traffic, events), 1, f", 503s while full {traffic.unavailable}")


async def test_replayed_transaction_and_ack_create_nothing_twice(space: DemoSpace, capsys) -> None:
    hub_url = space.manifest["hub"]["url"]
    space.hub.start()
    envelope = Envelope("replayed-message-1", "alice@chu-nord.test", ("bob@clinique-sud.test",),
                        ("bob@clinique-sud.test",), "once only", None, "normal", 1.8e9)
    with trio.fail_after(STEP):
        while True:  # the hub is up once it accepts a connection
            try:
                async with HubClient(space.directory, "chu-nord.test", hub_url) as a:
                    first = await a.post(routes.transaction("replay-txn-0001", [envelope]))
                    again = await a.post(routes.transaction("replay-txn-0001", [envelope]))
                    other = await a.post(routes.transaction("replay-txn-0002", [envelope]))
                break
            except OSError:
                await trio.sleep(0.1)
    assert first == again == other
    assert protocol.decode_outcomes(first, 1)[0].accepted
    async with HubClient(space.directory, "clinique-sud.test", hub_url) as b:
        items = await b.inbox(5)
        assert [item.envelope.id for item in items] == ["replayed-message-1"]
        ack = routes.ack([items[0].seq], [])
        await b.post(ack)
        await b.post(ack)
        assert await b.inbox(5) == []  # acknowledged: gone from B's queue
    async with HubClient(space.directory, "chu-nord.test", hub_url) as a:
        receipts = [item.receipt for item in await a.inbox(5)]
    assert receipts == [protocol.Receipt("replayed-message-1", ("bob@clinique-sud.test",), "delivered")]
    report(capsys, "7 replays", Verdict(1, 0, len(items) - 1 + len(receipts) - 1, 0), 3)


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
    to_dan = traffic.count - len(traffic.accepted[PAIRS[0]])
    dan_events = await collect(space.b, to_dan, token=pager_token)
    bob_expected = len(traffic.accepted[PAIRS[0]])
    with trio.fail_after(60):
        while len({h["event-id"] for h, _ in receiver.received}) < bob_expected:
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
    events = await collect(space.b, normal.count + urgent.count)
    verdict = judge(normal, events)
    urgent_verdict = judge(urgent, events)
    total = Verdict(verdict.accepted + urgent_verdict.accepted, verdict.lost + urgent_verdict.lost,
                    verdict.duplicated + urgent_verdict.duplicated, verdict.out_of_order + urgent_verdict.out_of_order)
    report(capsys, "9 high water", total, 1, f", normal refusals {normal.refusals}, urgent taken {urgent.count}")

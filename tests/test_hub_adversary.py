"""A rogue relay against the hub: it holds a valid certificate of the
national CA for its own registered domain (``rogue.test``) and speaks the
documented protocol (docs/protocol.md, through `relay.core.routes`), but
lies, replays and sends hostile values.  After each attack, the two honest
relays of the demo space (real daemons, over real TLS) must keep working:
a message each way still turns ``delivered``, which needs each one's inbox
stream to decode every item the hub sends it (docs/security.md §A rogue
relay holding a valid certificate)."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime

import pytest
import trio
from conftest import STEP, Space
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peers import HubClient

from relay.core import protocol, routes
from relay.core.h2session import ConnectionClosed
from relay.core.protocol import Envelope, Failure, Receipt
from relay.hub import server
from relay.pki import authority
from relay.pki.identity import PeerIdentity

ROGUE = "rogue.test"
MALLORY = f"mallory@{ROGUE}"
ALICE, BOB = "alice@chu-nord.test", "bob@clinique-sud.test"
MIB = 1 << 20
# The organisation id in the rogue's certificate: not one a relay's decoder
# takes as ``origin_org``; the hub must stamp none rather than pass it on.
ROGUE_OU = "1999\n99999"


@pytest.fixture
async def space(stopped_space: Space) -> Space:
    """The demo space, with a third registered domain whose certificate the
    test holds (the rogue: no daemon, only `HubClient` requests)."""
    pki = stopped_space.directory / "pki"
    authority.issue_certificate(pki / "ca.pem", pki / "ca.key", pki, dns_names=[ROGUE], role="relay",
                                org_id=ROGUE_OU)
    config = stopped_space.hub_config
    stopped_space.hub_config = replace(config, domains=frozenset(config.domains | {ROGUE}))
    return await stopped_space.start()


def rogue(space: Space) -> HubClient:
    return HubClient(space.directory, ROGUE, f"https://127.0.0.1:{space.hub_config.listen.port}")


def envelope(ident: str, *, sender: str = MALLORY, rcpt: tuple[str, ...] = (BOB,), body: str = "rogue",
             **fields) -> Envelope:
    return Envelope(ident, sender, rcpt, rcpt, body, None, "normal", time.time(), **fields)


async def status_of(client: HubClient, request: routes.Request) -> tuple[int, bytes]:
    """The hub's status and body for ``request``; a reset stream (a handler
    that failed) raises, and fails the test."""
    return await client.conn.request(request.method, request.path, request.body, authority=client.AUTHORITY,
                                      content_type=request.content_type, limit=routes.ANSWER_LIMIT)


async def honest_relays_work(space: Space, tag: str) -> None:
    """A message each way between the honest relays turns ``delivered``."""
    sent = [(space.a, await space.send(space.a, [BOB], f"honest {tag} a->b")),
            (space.b, await space.send(space.b, [ALICE], f"honest {tag} b->a"))]
    for relay, ident in sent:
        await space.wait_status(relay, ident, "delivered")


async def test_a_rogue_relay_cannot_harm_the_honest_ones(space: Space) -> None:
    async with rogue(space) as mallory:
        # Spoofed sender, and a forged origin and organisation: refused, or overwritten.
        answer = await mallory.post(routes.transaction("rogue-txn-00001", [
            envelope("rogue-spoof-0001", sender=ALICE, body="spoofed"),
            envelope("rogue-stamp-0001", body="stamped", origin="chu-nord.test", origin_org="1750000001"),
        ]))
        spoofed, stamped = protocol.decode_outcomes(answer, 2)
        assert spoofed.reason == protocol.SENDER_NOT_AUTHENTICATED and stamped.accepted
        await honest_relays_work(space, "spoof")
        messages = {e["message"]["body"]: e["message"] for e in await space.events(space.b, 2)
                    if e["type"] == "message"}
        assert "spoofed" not in messages
        assert messages["stamped"]["origin"] == {"domain": ROGUE, "organisation": None}

        # A transaction id replayed with other content: the first answer, nothing queued.
        again = await mallory.post(routes.transaction("rogue-txn-00001", [envelope("rogue-other-0001",
                                                                                   body="replayed other")]))
        assert again == answer

        # Receipts about messages it never received, or for another domain's recipients.
        ident = await space.send(space.a, [BOB], "read by bob only")
        await space.wait_status(space.a, ident, "delivered")
        answer = await mallory.post(routes.receipts([
            Receipt(ident, (BOB,), "read", origin="chu-nord.test"),
            Receipt(ident, (MALLORY,), "read", origin="chu-nord.test"),
            Receipt(ident, (MALLORY,), "failed", origin="chu-nord.test"),
        ]))
        assert {o.reason for o in protocol.decode_outcomes(answer, 3)} == {protocol.UNKNOWN_MESSAGE}
        await honest_relays_work(space, "receipts")
        assert (await space.status(space.a, ident))["status"] == "delivered"

        # Acks (with failures) for positions in another domain's queue, while its relay is away.
        await space.stop_relay(space.b)
        waiting = await space.send(space.a, [BOB], "waits at the hub")
        positions = list(range(1, protocol.MAX_ACK + 1))
        await mallory.post(routes.ack(positions, [Failure(seq, (BOB,), "misrouted") for seq in positions[:500]]))
        await space.start_relay(space.b)
        await space.wait_status(space.a, waiting, "delivered")
        await honest_relays_work(space, "acks")

        # The defect: a megabyte (or a sentence) of failure reason for the origin's inbox.
        ident = await space.send(space.a, [MALLORY], "to the rogue")
        [item] = [i for i in await mallory.inbox_until(ident) if i.envelope and i.envelope.id == ident]
        for reason in ("x" * MIB, "x" * 100_000, "Dear chu-nord, <script>"):
            status, _ = await status_of(mallory, routes.ack([item.seq], [Failure(item.seq, (MALLORY,), reason)]))
            assert status == 400
        await honest_relays_work(space, "reason")
        await mallory.post(routes.ack([item.seq], [Failure(item.seq, (MALLORY,), "no_such_person")]))
        failed = await space.wait_status(space.a, ident, "failed")
        assert failed["recipients"][MALLORY]["reason"] == "no_such_person"

        # Oversized and wrongly typed fields: a 4xx or a per-envelope refusal, never a reset.
        hostile = [
            routes.Request("POST", routes.PATH_ACK, protocol.pack({"v": 1, "seqs": [2**64 - 1]})),
            routes.Request("POST", routes.PATH_ACK, protocol.pack({"v": 1, "seqs": [True, "1", None]})),
            routes.Request("POST", routes.PATH_RECEIPTS, protocol.pack(
                {"v": 1, "receipts": [{"id": ident, "rcpt": [BOB], "status": "read", "origin": "x" * 200_000}]})),
            routes.Request("POST", routes.PATH_TRANSACTION + "rogue-txn-00002", protocol.pack(
                {"v": 1, "envelopes": [{**envelope("rogue-huge-0001").to_wire(), "thread": "t\n" * 100_000},
                                       {**envelope("rogue-huge-0002").to_wire(), "id": "i" * 200_000}]})),
            routes.Request("POST", routes.PATH_TRANSACTION + "rogue-txn-00003", protocol.pack(
                {"v": 1, "envelopes": [[0] * 10_000] * 150})),
            routes.Request("POST", routes.PATH_TRANSACTION + "x" * 5000, b""),
        ]
        for request in hostile:
            status, _ = await status_of(mallory, request)
            assert status in (200, 400, 413), (request.path[:40], status)
        await honest_relays_work(space, "fields")


# -- hostile values, generated ----------------------------------------------------------------

hostile_text = st.one_of(
    st.text(max_size=40),
    st.builds(lambda n, c: c * n, st.integers(0, 300_000), st.sampled_from(["x", "é", "\n", "\u202e"])),
)
hostile_value = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), hostile_text,
                          st.lists(st.sampled_from([BOB, ALICE, MALLORY]), max_size=3))


@st.composite
def hostile_request(draw) -> routes.Request:
    kind = draw(st.sampled_from(["transaction", "ack", "receipts"]))
    if kind == "transaction":
        wire = envelope(draw(st.sampled_from(["rogue-fuzz-0001", "rogue-fuzz-0002"]))).to_wire()
        for name in draw(st.lists(st.sampled_from(sorted(wire) + ["origin", "origin_org", "expires_at"]),
                                  max_size=3, unique=True)):
            wire[name] = draw(hostile_value)
        txn = draw(st.sampled_from(["rogue-fuzz-txn-1", "rogue-fuzz-txn-2"]))
        return routes.Request("POST", routes.PATH_TRANSACTION + txn, protocol.pack({"v": 1, "envelopes": [wire]}))
    if kind == "ack":
        seqs = draw(st.lists(st.sampled_from([0, -1, 2**63, 2**64 - 1]) | st.integers(-(2**63), 2**64 - 1),
                             max_size=5))
        failure = {"seq": draw(st.sampled_from(seqs) if seqs else hostile_value),
                   "rcpt": draw(st.lists(st.sampled_from([BOB, MALLORY]), min_size=1, unique=True) | hostile_value),
                   "reason": draw(hostile_text)}
        failed = draw(st.lists(st.just(failure), max_size=1))
        return routes.Request("POST", routes.PATH_ACK, protocol.pack({"v": 1, "seqs": seqs, "failed": failed}))
    receipt = {"id": "rogue-fuzz-0001", "rcpt": [BOB], "status": "read", "origin": "chu-nord.test"}
    for name in draw(st.lists(st.sampled_from(["id", "rcpt", "status", "origin", "reason"]), max_size=2)):
        receipt[name] = draw(hostile_value)
    return routes.Request("POST", routes.PATH_RECEIPTS, protocol.pack({"v": 1, "receipts": [receipt]}))


async def test_generated_hostile_requests_get_an_answer_and_harm_no_one(space: Space) -> None:
    """Hypothesis runs in a worker thread and sends each example through the
    rogue's connection on the test's trio loop: every one is answered 200 or
    4xx (never a reset or a 5xx), then the honest relays still work."""
    async with rogue(space) as mallory:
        answers: list[int] = []

        @settings(max_examples=60, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(request=hostile_request())
        def one(request: routes.Request) -> None:
            status, _ = trio.from_thread.run(status_of, mallory, request)
            assert status in (200, 400, 413), status
            answers.append(status)

        with trio.fail_after(STEP * 4):
            await trio.to_thread.run_sync(one)
        assert 200 in answers and 400 in answers
        await honest_relays_work(space, "generated")


def test_the_hub_takes_only_a_domain_and_an_organisation_id_every_relay_decodes() -> None:
    """Names from a certificate enter the hub at the handshake: a first DNS
    name that is not a domain is refused; an OU that is not a printable org
    id is not stamped (either would make every receiving relay refuse the
    envelope, and the hub resend it forever)."""
    def identity(names: list[str], org: str | None = None) -> PeerIdentity:
        return PeerIdentity(dns_names=tuple(names), org_id=org, serial=1, not_after=datetime.now(UTC))

    assert server._domain_of(identity(["CHU-Nord.test"])) == "chu-nord.test"
    for names in ([], ["localhost"], ["*.chu-nord.test"], ["chu_nord.test"], ["x" * 300 + ".test"]):
        assert server._domain_of(identity(names)) == ""
    assert protocol.is_org_id("1750000001") and not protocol.is_org_id(ROGUE_OU)
    assert not protocol.is_org_id("1" * 65) and not protocol.is_org_id("")


async def test_a_certificate_for_an_unregistered_domain_is_closed_after_the_handshake(space: Space, caplog) -> None:
    pki = space.directory / "pki"
    authority.issue_certificate(pki / "ca.pem", pki / "ca.key", pki, dns_names=["unknown.test"], role="relay")
    with pytest.raises(BaseExceptionGroup) as caught:
        with trio.fail_after(STEP):
            async with HubClient(space.directory, "unknown.test", f"https://127.0.0.1:{space.hub_config.listen.port}") \
                    as stranger:
                await stranger.post(routes.transaction("stranger-txn-01", [envelope("stranger-0001",
                                                                                    sender="eve@unknown.test")]))
    assert [type(e) for e in caught.value.exceptions] == [ConnectionClosed]  # closed by the hub, not a timeout
    assert "not a registered domain" in caplog.text
    await honest_relays_work(space, "stranger")

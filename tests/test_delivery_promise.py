"""The delivery promise beyond the happy path: read receipts, delay
notices, time-to-live, the store's ceiling, and webhooks."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import replace

import trio
from conftest import STEP, Space
from peers import WebhookReceiver

from relay.config.model import Delivery, StoreLimits


async def test_read_receipt_turns_the_status_read(space: Space) -> None:
    ident = await space.send(space.a, ["bob@clinique-sud.test"], "please read")
    await space.events(space.b, 1)
    await space.wait_status(space.a, ident, "delivered")
    async with space.b.client() as client:
        first = await client.post(f"/v1/messages/{ident}/read")
        again = await client.post(f"/v1/messages/{ident}/read")
        unknown = await client.post("/v1/messages/nosuchmessage1/read")
    assert (first.status_code, first.json()) == (202, {"id": ident, "status": "read"})
    assert again.status_code == 202
    assert unknown.status_code == 404
    document = await space.wait_status(space.a, ident, "read")
    assert document["recipients"] == {"bob@clinique-sud.test": {"status": "read"}}


async def test_only_the_receiving_system_may_mark_read(space: Space) -> None:
    ident = await space.send(space.a, ["bob@clinique-sud.test"], "not yours")
    async with space.a.client() as client:  # the sender's own system did not receive it
        response = await client.post(f"/v1/messages/{ident}/read")
    assert response.status_code == 404


async def test_a_late_message_produces_one_delayed_notice(stopped_space: Space) -> None:
    space = stopped_space
    space.a.config = replace(space.a.config, delivery=Delivery(delay_warning=0.5))
    await space.start_hub()
    await space.start_relay(space.a)  # relay B stays down: nothing can be delivered
    ident = await space.send(space.a, ["bob@clinique-sud.test"], "are you there?")
    [event] = await space.events(space.a, 1)
    assert event["type"] == "delayed"
    assert event["notice"]["id"] == ident
    assert event["notice"]["recipients"] == {"bob@clinique-sud.test": "sent"}
    # A second message's notice comes from a later sweep, which posts none
    # again for the first: once, not every period.
    second = await space.send(space.a, ["bob@clinique-sud.test"], "still there?")
    events = await space.events(space.a, 2)
    assert [(e["type"], e["notice"]["id"]) for e in events] == [("delayed", ident), ("delayed", second)]


async def test_message_expires_at_the_origin_when_the_hub_stays_away(stopped_space: Space) -> None:
    space = stopped_space
    space.a.config = replace(space.a.config, delivery=Delivery(message_ttl=1.0, delay_warning=3600))
    await space.start_hub()
    await space.stop_hub()
    await space.start_relay(space.a, wait_connected=False)
    ident = await space.send(space.a, ["bob@clinique-sud.test"], "too late")
    document = await space.wait_status(space.a, ident, "failed")
    assert document["recipients"]["bob@clinique-sud.test"] == {"status": "failed", "reason": "expired"}
    [event] = await space.events(space.a, 1)
    assert event["type"] == "failed"
    assert event["notice"] == {"id": ident, "recipients": {"bob@clinique-sud.test": "expired"}}


async def test_message_expires_at_the_hub_when_the_destination_stays_away(stopped_space: Space) -> None:
    space = stopped_space
    space.a.config = replace(space.a.config, delivery=Delivery(message_ttl=1.0, delay_warning=3600))
    space.hub_config = replace(space.hub_config, expiry_interval=0.1)
    await space.start_hub()
    await space.start_relay(space.a)
    ident = await space.send(space.a, ["bob@clinique-sud.test"], "nobody home")
    await space.wait_status(space.a, ident, "sent")
    document = await space.wait_status(space.a, ident, "failed")  # by the hub's sweep, once past its grace
    assert document["recipients"]["bob@clinique-sud.test"]["reason"] == "expired"
    await space.start_relay(space.b)
    # Never delivered after its failure was announced: a message sent now
    # is queued behind it at the hub, and comes first.
    marker = await space.send(space.a, ["bob@clinique-sud.test"], "after the sweep")
    events = await space.events(space.b, 1)
    assert [e["message"]["id"] for e in events] == [marker]


async def test_store_ceiling_refuses_normal_then_urgent_and_recovers(stopped_space: Space) -> None:
    space = stopped_space
    await space.start_hub()
    await space.start_relay(space.a)
    await space.stop_relay(space.a)
    # Restart A with a ceiling just above what its store already uses.
    space.a.config = replace(space.a.config, store=StoreLimits(max_bytes=200_000, high_water=0.5))
    await space.start_relay(space.a)
    await space.stop_hub()  # keep the messages in A's store
    accepted, refused = 0, None
    async with space.a.client() as client:
        with trio.fail_after(STEP):
            while refused is None:
                response = await client.post("/v1/messages", json={
                    "from": "alice@chu-nord.test", "to": ["bob@clinique-sud.test"], "body": "x" * 4000})
                if response.status_code == 202:
                    accepted += 1
                else:
                    refused = response
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "store_full"
        urgent = await client.post("/v1/messages", json={
            "from": "alice@chu-nord.test", "to": ["bob@clinique-sud.test"], "body": "urgent", "priority": "urgent"})
        assert urgent.status_code == 202
    await space.start_hub()
    await space.start_relay(space.b)
    events = await space.events(space.b, accepted + 1)
    assert events[0]["message"]["body"] == "urgent"
    assert len(events) == accepted + 1


async def test_webhook_delivers_signed_events_in_order_through_failures(stopped_space: Space, tmp_path) -> None:
    space = stopped_space
    receiver = WebhookReceiver()
    receiver.fail_next, receiver.hang_next = 2, 1
    await space.nursery.start(receiver.serve)
    secret = tmp_path / "webhook.secret"
    secret.write_bytes(b"0123456789abcdef-secret")
    secret.chmod(0o600)
    system = replace(space.b.config.local_systems[0], webhook_url=f"http://127.0.0.1:{receiver.port}/eimis",
                     webhook_secret=secret.read_bytes())
    space.b.config = replace(space.b.config, local_systems=(system,))
    await space.start()
    idents = [await space.send(space.a, ["bob@clinique-sud.test"], f"push {n}") for n in range(5)]
    with trio.fail_after(STEP * 3):  # retries back off from 1 s, and one attempt hangs until its timeout
        while len(receiver.received) < 5:
            await trio.sleep(0.05)
    ids, cursors = [], []
    for headers, body in receiver.received:
        expected = hmac.new(secret.read_bytes(), body, hashlib.sha256).hexdigest()
        assert headers["eimis-signature"] == f"sha256={expected}"
        event = json.loads(body)
        assert headers["event-id"] == str(event["cursor"])
        ids.append(event["message"]["id"])
        cursors.append(event["cursor"])
    assert ids == idents
    assert cursors == sorted(cursors)
    # The first event was tried four times (two failures, a hang, a success),
    # always under the same Event-Id.
    assert receiver.attempts[:4] == [str(cursors[0])] * 4

"""The message path end to end, in one trio run: local API -> relay A ->
hub -> relay B -> local API, and receipts back, over real mutual TLS."""

from __future__ import annotations

import sqlite3

import trio
from conftest import STEP, Space


async def test_message_crosses_and_turns_delivered(space: Space) -> None:
    a, b = space.a, space.b
    ident = await space.send(a, ["bob@clinique-sud.test"], "Rappeler le patient de la chambre 12", thread="t-42")
    [event] = await space.events(b, 1)
    message = event["message"]
    assert event["type"] == "message" and event["cursor"] > 0
    assert message["id"] == ident
    assert message["from"] == "alice@chu-nord.test"
    assert message["to"] == ["bob@clinique-sud.test"]
    assert message["body"] == "Rappeler le patient de la chambre 12"
    assert message["thread"] == "t-42"
    assert message["priority"] == "normal"
    assert message["origin"] == {"domain": "chu-nord.test", "organisation": "1750000001"}
    document = await space.wait_status(a, ident, "delivered")
    assert document == {"id": ident, "status": "delivered",
                        "recipients": {"bob@clinique-sud.test": {"status": "delivered"}}}


async def test_messages_flow_both_ways(space: Space) -> None:
    a, b = space.a, space.b
    to_b = await space.send(a, ["bob@clinique-sud.test", "dan@clinique-sud.test"], "aller")
    to_a = await space.send(b, ["alice@chu-nord.test"], "retour", sender="dan@clinique-sud.test")
    [at_b] = await space.events(b, 1)
    [at_a] = await space.events(a, 1)
    assert (at_b["message"]["id"], at_b["message"]["body"]) == (to_b, "aller")
    assert (at_a["message"]["id"], at_a["message"]["body"]) == (to_a, "retour")
    assert at_a["message"]["origin"] == {"domain": "clinique-sud.test", "organisation": "1130000002"}
    await space.wait_status(a, to_b, "delivered")
    await space.wait_status(b, to_a, "delivered")


async def test_unknown_domain_fails_with_reason(space: Space) -> None:
    ident = await space.send(space.a, ["bob@clinique-sud.test", "eve@nowhere.test"], "x")
    document = await space.wait_status(space.a, ident, "failed")
    assert document["recipients"]["eve@nowhere.test"] == {"status": "failed", "reason": "unknown_domain"}
    with trio.fail_after(STEP):
        while document["recipients"]["bob@clinique-sud.test"]["status"] != "delivered":
            document = await space.status(space.a, ident)
            await trio.sleep(0.02)


async def test_unknown_recipient_fails_with_reason(space: Space) -> None:
    ident = await space.send(space.a, ["nobody@clinique-sud.test"], "x")
    document = await space.wait_status(space.a, ident, "failed")
    assert document["recipients"] == {"nobody@clinique-sud.test": {"status": "failed", "reason": "unknown_recipient"}}


async def test_order_from_one_sender_to_one_recipient_is_kept(space: Space) -> None:
    async with trio.open_nursery(strict_exception_groups=True) as nursery:
        # Submitted one after the other (each after the previous 202)...
        async def submit_all() -> None:
            for n in range(60):
                await space.send(space.a, ["bob@clinique-sud.test"], f"m{n}")
        nursery.start_soon(submit_all)
    events = await space.events(space.b, 60)
    assert [e["message"]["body"] for e in events] == [f"m{n}" for n in range(60)]


async def test_hub_down_messages_queue_then_go_and_urgent_overtakes(space: Space) -> None:
    await space.stop_hub()
    await space.wait_uplink(space.a, "down")
    normal = [await space.send(space.a, ["bob@clinique-sud.test"], f"normal {n}") for n in range(30)]
    urgent = await space.send(space.a, ["bob@clinique-sud.test"], "URGENT", priority="urgent")
    assert (await space.status(space.a, urgent))["status"] == "queued"
    await space.start_hub()
    events = await space.events(space.b, 31)
    bodies = [e["message"]["body"] for e in events]
    assert bodies[0] == "URGENT"
    assert bodies[1:] == [f"normal {n}" for n in range(30)]
    for ident in normal + [urgent]:
        await space.wait_status(space.a, ident, "delivered")


async def test_offline_destination_gets_its_messages_on_return(space: Space) -> None:
    await space.stop_relay(space.b)
    ident = await space.send(space.a, ["bob@clinique-sud.test"], "while you were away")
    await space.wait_status(space.a, ident, "sent")
    await space.start_relay(space.b)
    [event] = await space.events(space.b, 1)
    assert event["message"]["id"] == ident
    await space.wait_status(space.a, ident, "delivered")


async def test_each_message_appears_once_after_relay_restarts(space: Space) -> None:
    idents = [await space.send(space.a, ["bob@clinique-sud.test"], f"m{n}") for n in range(20)]
    await space.events(space.b, 20)
    await space.stop_relay(space.b)
    await space.start_relay(space.b)
    more = await space.send(space.a, ["bob@clinique-sud.test"], "after restart")
    events = await space.events(space.b, 21)
    assert [e["message"]["id"] for e in events] == idents + [more]
    async with space.b.client() as client:
        page = (await client.get("/v1/events", params={"after": events[-1]["cursor"], "wait": 0.2})).json()
    assert page == {"events": [], "next": events[-1]["cursor"]}


async def test_a_queued_item_that_cannot_be_opened_is_dropped_and_the_stream_goes_on(space: Space) -> None:
    await space.stop_relay(space.b)
    damaged, kept = [await space.send(space.a, ["bob@clinique-sud.test"], text) for text in ("lost", "kept")]
    for ident in (damaged, kept):
        await space.wait_status(space.a, ident, "sent")
    await space.stop_hub()
    hub_db = sqlite3.connect(space.hub_config.state_dir / "hub.db")
    with hub_db:  # what a disk error or a lost key would leave: a payload that fails its tag
        seq, sealed = hub_db.execute("SELECT seq, payload FROM queue ORDER BY seq LIMIT 1").fetchone()
        hub_db.execute("UPDATE queue SET payload = ? WHERE seq = ?", (sealed[:-1] + bytes([sealed[-1] ^ 1]), seq))
    hub_db.close()
    await space.start_hub()
    await space.start_relay(space.b)
    [event] = await space.events(space.b, 1)
    assert event["message"]["id"] == kept
    await space.wait_status(space.a, kept, "delivered")
    hub_db = sqlite3.connect(space.hub_config.state_dir / "hub.db")
    assert hub_db.execute("SELECT outcome FROM audit WHERE action = 'dropped'").fetchall() == [
        (f"queue item {seq} cannot be opened",)]
    hub_db.close()

"""The deadlines of the relay's requests to the hub, in exact virtual time.

A client and a server `Http2Connection` face each other over an in-memory
stream pair, both sending PINGs every 5 s that the other answers: the
connection stays alive, so whatever ends a request here is its deadline
(``[uplink] request_timeout``), never the keepalive.  The health figures
built on it (`assess`, `stall_reasons`, `health`) are checked as data.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from relay.appliance.inbox_receiver import InboxReceiver
from relay.appliance.operations import assess, health, stall_reasons
from relay.appliance.uplink_connection import HubSession, HubTimeout, Progress
from relay.cli import demo
from relay.config.model import load_relay_config
from relay.core import protocol, routes
from relay.core.h2session import Http2Settings, header
from relay.net.h2connection import H2Stream, Http2Connection

TIMEOUT = 30.0
KEEPALIVE = Http2Settings(keepalive_interval=5, keepalive_timeout=2)
VIRTUAL_STEP = 1000.0


async def hub(stream: H2Stream) -> None:
    """Answers an ack at once; leaves a transaction unanswered; answers the
    inbox request only when its path says so, and then stays quiet."""
    path = header(stream.headers, b":path").decode()
    if path == routes.PATH_INBOX:
        if header(stream.headers, b"x-answer") == b"headers":
            stream.send_headers([(b":status", b"200"), (b"content-type", protocol.MSGPACK)])
        await trio.sleep_forever()
    await stream.read_body(protocol.MAX_TRANSACTION_BYTES)
    if path.startswith(routes.PATH_TRANSACTION):
        await trio.sleep_forever()
    await stream.send_response(200, [(b"content-type", protocol.MSGPACK)], protocol.pack({"v": protocol.VERSION}))


@asynccontextmanager
async def session() -> AsyncIterator[tuple[HubSession, Http2Connection]]:
    client_end, server_end = trio.testing.memory_stream_pair()
    client = Http2Connection(client_end, client=True, settings=KEEPALIVE, name="hub")
    server = Http2Connection(server_end, client=False, settings=KEEPALIVE, name="relay")
    async with trio.open_nursery(strict_exception_groups=True) as nursery:
        nursery.start_soon(server.run, hub)
        await nursery.start(client.run)
        yield HubSession(client, "hub.eimis.test", TIMEOUT), client
        client.abort()
        server.abort()


def transaction() -> routes.Request:
    return routes.transaction("txn-1", [])


async def test_an_unanswered_request_times_out_on_a_live_connection_and_marks_its_lane(
        autojump_clock: trio.abc.Clock) -> None:
    progress = Progress("normal", "the normal lane")
    with trio.fail_after(VIRTUAL_STEP):
        async with session() as (hub_session, conn):
            t0 = trio.current_time()
            with pytest.raises(HubTimeout, match=r"did not answer POST /v1/transactions/txn-1 within 30 s"):
                await hub_session.post(transaction(), progress)
            assert trio.current_time() - t0 == TIMEOUT
            assert conn.is_open  # six PINGs answered meanwhile: only the deadline ended the request
            assert progress.stall()["unanswered"] == "POST /v1/transactions/txn-1"
            assert (progress.timeouts, progress.stalled_timeouts) == (1, 1)
            # An answer to a request of the same kind: moving again.
            await hub_session.post(routes.ack([1], []), progress)
            assert progress.stall() is None and progress.timeouts == 1


async def test_an_unanswered_inbox_request_times_out(autojump_clock: trio.abc.Clock) -> None:
    receiver = InboxReceiver(lambda: None, None, lambda systems: None, lambda priority, seconds: None, None)
    with trio.fail_after(VIRTUAL_STEP):
        async with session() as (hub_session, conn):
            t0 = trio.current_time()
            with pytest.raises(HubTimeout, match=r"did not answer GET /v1/inbox within 30 s"):
                await receiver.run(hub_session)
            assert trio.current_time() - t0 == TIMEOUT and conn.is_open
            assert receiver.stream.stall()["unanswered"] == "GET /v1/inbox"


async def test_a_quiet_inbox_with_no_ack_outstanding_ends_a_stall_of_the_acks(
        autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ack left unanswered on an earlier connection: if the hub sends
    nothing for request_timeout on the next one, nothing is left to
    acknowledge (it had applied the ack after all)."""
    monkeypatch.setattr(routes, "inbox_headers",
                        lambda authority: [(b":method", b"GET"), (b":scheme", b"https"),
                                           (b":authority", authority.encode()), (b":path", b"/v1/inbox"),
                                           (b"x-answer", b"headers")])
    receiver = InboxReceiver(lambda: None, None, lambda systems: None, lambda priority, seconds: None, None)
    receiver.acks.timed_out("POST /v1/ack")
    with trio.fail_after(VIRTUAL_STEP):
        async with session() as (hub_session, _), trio.open_nursery(strict_exception_groups=True) as nursery:
            nursery.start_soon(receiver.run, hub_session)
            await trio.sleep(TIMEOUT - 1)
            assert receiver.acks.stall() is not None and receiver.stream.stall() is None
            await trio.sleep(2)
            assert receiver.acks.stall() is None
            receiver.stop()


def test_stalls_make_the_status_degraded_and_an_outage_unhealthy(tmp_path: Path) -> None:
    config = load_relay_config(Path(demo.init(tmp_path)["relays"][0]["config"]))
    stall = {"lane": "urgent", "what": "the urgent lane", "since": 1000.0, "timeouts": 3,
             "unanswered": "POST /v1/transactions/abc"}
    snapshot = {
        "uplink": {"state": "connected", "since": 0.0, "last_error": None, "stalls": [stall]},
        "certificates": [], "reload": {"errors": []},
        "store": {"error": None, "used_bytes": 0, "max_bytes": 1, "high_water": 0.8},
        "queues": {"oldest_queued_at": None},
    }
    stalls = stall_reasons([stall], 60.0, 1200.0)
    assert stalls == [("degraded: the urgent lane got no answer from the hub for 3.3 min (POST /v1/transactions/abc"
                       " unanswered within 60 s, 3 time(s); the relay reconnects and sends it again)")]
    problems, _ = assess(snapshot, config, 1200.0)
    assert problems == stalls and health(problems, stalls) == "degraded"
    snapshot["uplink"]["state"] = "down"
    problems, _ = assess(snapshot, config, 1200.0)
    assert health(problems, stalls) == "unhealthy"
    snapshot["uplink"].update(state="connected", stalls=[])
    problems, _ = assess(snapshot, config, 1200.0)
    assert problems == [] and health(problems, []) == "healthy"

"""One outbox lane against a scripted hub: "peek, send, then commit".

A `LaneSender` runs on a real store (a SQLite file) and posts to
`ScriptedHub`, which hands each transaction to the test and answers it, or
loses the answer, when the test says so: no network.  The commits of the
hub's answers can be held on the store's writer thread, as a slow disk
would hold them.  What is asserted is the lane's share of the delivery
promise: a lost answer is replayed under the same id before anything
newer, only a commit takes envelopes out of the outbox, and envelopes
whose answer is settling are neither sent again nor forgotten.
"""

from __future__ import annotations

import collections
import functools
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from relay.appliance.lane_sender import SETTLING_MAX, LaneSender
from relay.cli import demo
from relay.config.model import RelayConfig, load_relay_config
from relay.core import protocol, routes
from relay.core.h2session import ConnectionClosed
from relay.core.protocol import Outcome
from relay.net.wakeup import Signal
from relay.store import relay_queue
from relay.store.engine import Store
from relay.store.relay_queue import Submission

STEP = 10.0
ALICE = "alice@chu-nord.test"
BOB = "bob@clinique-sud.test"


class Call:
    """One transaction posted to the hub, waiting for the test's answer."""

    def __init__(self, request: routes.Request) -> None:
        self.request = request
        self.txn_id = request.path.removeprefix(routes.PATH_TRANSACTION)
        self.ids = [protocol.Envelope.from_wire(e).id for e in protocol.decode_transaction(request.body)]
        self._answered = trio.Event()
        self._answer: bytes | Exception = b""

    def accept(self) -> None:
        self._answer = protocol.encode_outcomes([Outcome(True)] * len(self.ids))
        self._answered.set()

    def refuse(self, reason: str) -> None:
        self._answer = protocol.encode_outcomes([Outcome(False, reason, "refused by the test")] * len(self.ids))
        self._answered.set()

    def lose(self) -> None:
        """The connection breaks before the answer arrives."""
        self._answer = ConnectionClosed("connection to the hub lost")
        self._answered.set()

    async def answer(self) -> bytes:
        await self._answered.wait()
        if isinstance(self._answer, Exception):
            raise self._answer
        return self._answer


class ScriptedHub:
    def __init__(self) -> None:
        self._send, self._calls = trio.open_memory_channel[Call](0)

    async def post(self, request: routes.Request) -> bytes:
        call = Call(request)
        await self._send.send(call)
        return await call.answer()

    async def next_call(self) -> Call:
        with trio.fail_after(STEP):
            return await self._calls.receive()

    def nothing_posted(self) -> bool:
        try:
            self._calls.receive_nowait()
        except trio.WouldBlock:
            return True
        return False


class SlowCommits:
    """The real store, whose commits of the hub's answers wait on the writer
    thread until the test releases them; it knows when no read is running."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.released = threading.Event()
        self._reads = 0
        self._read_done = trio.Event()

    async def read(self, name: str, fn: Callable[[Any], Any]) -> Any:
        self._reads += 1
        try:
            return await self._store.read(name, fn)
        finally:
            self._reads -= 1
            self._read_done.set()
            self._read_done = trio.Event()

    async def run(self, name: str, fn: Callable[[Any], Any], *, urgent: bool = False) -> Any:
        if name == "apply_outcomes":
            def held(conn: Any, fn: Callable[[Any], Any] = fn) -> Any:
                self.released.wait(STEP)  # bounded: a failed test must not hang the writer
                return fn(conn)
            return await self._store.run(name, held, urgent=urgent)
        return await self._store.run(name, fn, urgent=urgent)

    async def quiet(self) -> None:
        """Until every task waits on something the test controls: no read
        on a thread, every trio task blocked."""
        with trio.fail_after(STEP):
            while True:
                if self._reads:
                    await self._read_done.wait()
                    continue
                await trio.testing.wait_all_tasks_blocked()
                if not self._reads:
                    return


@pytest.fixture(scope="module")
def base_config(tmp_path_factory: pytest.TempPathFactory) -> RelayConfig:
    directory = tmp_path_factory.mktemp("lane")
    demo.init(directory)
    return load_relay_config(directory / "relay-a.toml")


@pytest.fixture
async def store(tmp_path: Path):
    async with Store.open(tmp_path / "relay.db", relay_queue.MIGRATIONS) as store:
        yield store


@pytest.fixture
def slow(store: Store):
    slow = SlowCommits(store)
    yield slow
    slow.released.set()


async def submit(store: Store, *idents: str, priority: str = "normal") -> None:
    for ident in idents:
        message = Submission(ident, "chu-nord.test", "messenger", None, ALICE, (BOB,), None, priority, "Bonjour")
        await store.run("submit", functools.partial(relay_queue.submit, msg=message, now=time.time()))


async def outbox(store: Store) -> list[str]:
    rows = await store.read("outbox", lambda c: c.execute("SELECT message_id FROM outbox ORDER BY seq").fetchall())
    return [ident for ident, in rows]


async def statuses(store: Store) -> dict[str, str]:
    rows = await store.read("statuses", lambda c: c.execute("SELECT message_id, status FROM recipient").fetchall())
    return dict(rows)


class Lane:
    """A lane sender, what it told the rest of the relay, and a way to wait for its commits."""

    def __init__(self, config: RelayConfig, store: SlowCommits, batch_max: int, lane: int = relay_queue.NORMAL) -> None:
        config = replace(config, uplink=replace(config.uplink, batch_max=batch_max))
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.settled = 0
        self._settled_signal = Signal()
        self.sender = LaneSender(lane, lambda: config, store, Signal(), self._on_events,  # type: ignore[arg-type]
                                 self.counts)

    def _on_events(self, systems: object) -> None:
        self.settled += 1  # called once per committed answer
        self._settled_signal.fire()

    async def wait_settled(self, count: int) -> None:
        with trio.fail_after(STEP):
            while self.settled < count:
                await self._settled_signal.watch().wait()


async def run_until_lost(lane: Lane, hub: ScriptedHub) -> Call:
    """Run the lane until the answer to its first transaction is lost."""
    lost: list[Call] = []

    async def script() -> None:
        call = await hub.next_call()
        lost.append(call)
        call.lose()

    with pytest.raises(BaseExceptionGroup) as caught:
        async with trio.open_nursery(strict_exception_groups=True) as nursery:
            nursery.start_soon(lane.sender.run, hub.post)
            nursery.start_soon(script)
    assert caught.value.subgroup(ConnectionClosed) is not None
    assert caught.value.subgroup(lambda e: not isinstance(e, (ConnectionClosed, BaseExceptionGroup))) is None
    return lost[0]


async def test_a_lost_answer_is_replayed_under_the_same_id_and_only_its_commit_empties_the_outbox(
        base_config: RelayConfig, store: Store, slow: SlowCommits) -> None:
    await submit(store, "msg-00000001")
    slow.released.set()
    lane, hub = Lane(base_config, slow, batch_max=10), ScriptedHub()

    lost = await run_until_lost(lane, hub)
    assert lost.ids == ["msg-00000001"]
    assert lane.sender.in_flight() == {"msg-00000001"}
    assert await outbox(store) == ["msg-00000001"]

    await submit(store, "msg-00000002")  # newer: goes after the replay
    async with trio.open_nursery(strict_exception_groups=True) as nursery:
        nursery.start_soon(lane.sender.run, hub.post)
        replay = await hub.next_call()
        assert (replay.txn_id, replay.request.body) == (lost.txn_id, lost.request.body)
        replay.accept()
        newer = await hub.next_call()
        assert newer.ids == ["msg-00000002"] and newer.txn_id != lost.txn_id
        newer.refuse(protocol.UNKNOWN_RECIPIENT)
        await lane.wait_settled(2)
        nursery.cancel_scope.cancel()
    assert await outbox(store) == []
    assert await statuses(store) == {"msg-00000001": "sent", "msg-00000002": "failed"}
    assert lane.sender.in_flight() == set()
    assert lane.counts == {("sent", "normal"): 1, ("refused", "normal"): 1}
    assert hub.nothing_posted()


async def test_answers_settle_behind_the_next_transactions_and_are_not_sent_again(
        base_config: RelayConfig, store: Store, slow: SlowCommits) -> None:
    ids = ["msg-00000001", "msg-00000002", "msg-00000003"]
    await submit(store, *ids)
    lane, hub = Lane(base_config, slow, batch_max=1), ScriptedHub()
    async with trio.open_nursery(strict_exception_groups=True) as nursery:
        nursery.start_soon(lane.sender.run, hub.post)
        calls = []
        for ident in ids:
            call = await hub.next_call()
            assert call.ids == [ident]  # never one whose answer is still settling
            calls.append(call)
            if ident != ids[-1]:
                call.accept()
        # Two answers committing (held), the third transaction with the hub:
        assert SETTLING_MAX == 2
        assert lane.sender.in_flight() == set(ids)
        assert await outbox(store) == ids  # nothing committed, nothing left the outbox
        assert len({call.txn_id for call in calls}) == 3
        slow.released.set()
        calls[-1].accept()
        await lane.wait_settled(3)
        nursery.cancel_scope.cancel()
    assert await outbox(store) == []
    assert await statuses(store) == dict.fromkeys(ids, "sent")
    assert lane.sender.in_flight() == set()
    assert hub.nothing_posted()


async def test_a_cancel_while_answers_settle_keeps_the_unsettled_transaction_pending(
        base_config: RelayConfig, store: Store, slow: SlowCommits) -> None:
    """The connection drops while the lane waits for a settling slot, its
    third transaction answered: that answer is not committed, so the
    transaction is replayed under its id on the next connection."""
    ids = ["msg-00000001", "msg-00000002", "msg-00000003"]
    await submit(store, *ids)
    lane, hub = Lane(base_config, slow, batch_max=1), ScriptedHub()
    async with trio.open_nursery(strict_exception_groups=True) as nursery:
        nursery.start_soon(lane.sender.run, hub.post)
        for _ in ids:
            last = await hub.next_call()
            last.accept()
        await slow.quiet()  # the lane waits for one of the SETTLING_MAX slots
        nursery.cancel_scope.cancel()
    assert lane.sender.in_flight() == {"msg-00000003"}
    slow.released.set()
    await store.run("after the held commits", lambda c: None)  # one writer: they are done
    assert lane.settled == 0  # their tasks were cancelled, not their commits
    assert await outbox(store) == ["msg-00000003"]

    async with trio.open_nursery(strict_exception_groups=True) as nursery:
        nursery.start_soon(lane.sender.run, hub.post)
        replay = await hub.next_call()
        assert (replay.txn_id, replay.request.body) == (last.txn_id, last.request.body)
        replay.accept()
        await lane.wait_settled(1)
        nursery.cancel_scope.cancel()
    assert await outbox(store) == []
    assert await statuses(store) == dict.fromkeys(ids, "sent")
    assert hub.nothing_posted()


async def test_the_normal_lane_waits_for_the_urgent_one_to_have_sent_what_waited(
        base_config: RelayConfig, store: Store, slow: SlowCommits) -> None:
    await submit(store, "msg-00000001")
    await submit(store, "msg-00000002", priority="urgent")
    slow.released.set()
    urgent = Lane(base_config, slow, batch_max=10, lane=relay_queue.URGENT)
    normal = Lane(base_config, slow, batch_max=10)
    hub = ScriptedHub()
    urgent_sent = trio.Event()
    async with trio.open_nursery(strict_exception_groups=True) as nursery:
        nursery.start_soon(lambda: normal.sender.run(hub.post, start=urgent_sent))
        nursery.start_soon(lambda: urgent.sender.run(hub.post, caught_up=urgent_sent))
        first = await hub.next_call()
        assert first.ids == ["msg-00000002"]
        await slow.quiet()
        assert hub.nothing_posted() and not urgent_sent.is_set()
        first.accept()
        second = await hub.next_call()
        assert second.ids == ["msg-00000001"]
        second.accept()
        await normal.wait_settled(1)
        nursery.cancel_scope.cancel()
    assert urgent.counts == {("sent", "urgent"): 1}
    assert normal.counts == {("sent", "normal"): 1}


async def test_an_urgent_lane_with_nothing_to_send_lets_the_normal_lane_go(
        base_config: RelayConfig, store: Store, slow: SlowCommits) -> None:
    await submit(store, "msg-00000001")
    slow.released.set()
    urgent = Lane(base_config, slow, batch_max=10, lane=relay_queue.URGENT)
    normal = Lane(base_config, slow, batch_max=10)
    hub = ScriptedHub()
    urgent_sent = trio.Event()
    async with trio.open_nursery(strict_exception_groups=True) as nursery:
        nursery.start_soon(lambda: normal.sender.run(hub.post, start=urgent_sent))
        await slow.quiet()
        assert hub.nothing_posted()  # the normal lane waits: the urgent one has not looked yet
        nursery.start_soon(lambda: urgent.sender.run(hub.post, caught_up=urgent_sent))
        call = await hub.next_call()
        assert call.ids == ["msg-00000001"] and urgent_sent.is_set()
        nursery.cancel_scope.cancel()

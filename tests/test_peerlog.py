"""What a network peer can make a daemon log is bounded per peer: the filter
as data on a given clock, then a flood of anonymous requests against a real
relay's local API, logged the way the daemon logs (`logs.setup`)."""

from __future__ import annotations

import io
import logging

import httpx
import pytest
import trio
from conftest import STEP, Space

from relay.net import peerlog
from relay.runtime import logs


def _record() -> logging.LogRecord:
    return logging.LogRecord("relay.appliance.local_api", logging.INFO, __file__, 1, "refused", None, None)


def test_a_peer_gets_a_burst_then_one_line_every_interval() -> None:
    now = [1000.0]
    limit = peerlog.PeerLogLimit(clock=lambda: now[0])
    with peerlog.serving("192.0.2.7"):
        passed = [limit.filter(_record()) for _ in range(peerlog.PEER_BURST + 30)]
        assert passed == [True] * peerlog.PEER_BURST + [False] * 30
        now[0] += peerlog.PEER_INTERVAL
        record = _record()
        assert limit.filter(record) and record.dropped_before == 30 and record.peer == "192.0.2.7"
        assert not limit.filter(_record())
    with peerlog.serving("192.0.2.8"):  # another peer has its own burst
        assert limit.filter(_record())
    assert all(limit.filter(_record()) for _ in range(1000))  # outside any peer's context: never dropped


def test_many_peers_share_one_ceiling_and_bounded_memory() -> None:
    limit = peerlog.PeerLogLimit(clock=lambda: 5.0)
    passed = 0
    for n in range(peerlog.MAX_PEERS * 3):
        with peerlog.serving(f"2001:db8::{n:x}"):
            passed += limit.filter(_record())
    assert passed == peerlog.ALL_BURST
    assert len(limit._peers) == peerlog.MAX_PEERS


@pytest.fixture
def daemon_log() -> io.StringIO:
    """The root logger set up as the daemon sets it up (writing here rather
    than to stderr), restored afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    logs.setup("info", "logfmt")
    written = io.StringIO()
    root.handlers[0].setStream(written)
    yield written
    root.handlers[:], root.level = handlers, level


async def test_an_anonymous_flood_gets_a_bounded_number_of_log_lines(space: Space, daemon_log: io.StringIO) -> None:
    flood = 300
    async with httpx.AsyncClient(base_url=space.a.url, timeout=STEP) as client:
        with trio.fail_after(STEP):
            for _ in range(flood):
                assert (await client.post("/v1/messages", headers={"Authorization": "Bearer nope"})).status_code == 401
    lines = [line for line in daemon_log.getvalue().splitlines() if "refused: 401" in line]
    assert len(lines) == peerlog.PEER_BURST
    assert all(" peer=127.0.0.1" in line for line in lines)

"""The operations tools' parts, without processes: the queue units, the
certificate warnings, the health assessment, the admin channel and its
lock, and the watchdog of a stuck event loop."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from itertools import pairwise
from pathlib import Path

import pytest
import trio

from relay.appliance import operations
from relay.core.protocol import Envelope, Outcome
from relay.net import admin_socket, sdnotify
from relay.store import relay_admin, relay_queue
from relay.store.relay_queue import Submission

HOME = "chu-nord.test"
ALICE, BOB, ZOE = f"alice@{HOME}", "bob@clinique-sud.test", "zoe@late.test"
NOW = 1_700_000_000.0


def submit(conn, ident: str, to=(BOB, ZOE), priority: str = "normal") -> None:
    relay_queue.submit(conn, Submission(ident, HOME, "messenger", None, ALICE, tuple(to), None, priority, "Bonjour"),
                       now=NOW)


def refuse(conn, ident: str, dest: str) -> None:
    """What the uplink commits when the hub refuses the envelope for ``dest``."""
    seq, = conn.execute("SELECT seq FROM outbox WHERE message_id = ? AND dest = ?", (ident, dest)).fetchone()
    env = Envelope(ident, ALICE, (BOB, ZOE), tuple(a for a in (BOB, ZOE) if a.endswith(dest)), "Bonjour", None,
                   "normal", NOW)
    relay_queue.apply_outcomes(conn, [(seq, env, Outcome(False, "unknown_domain", "no relay"))], now=NOW)


# -- the queue's units ------------------------------------------------------------------


def test_list_and_show_filter_by_state_and_domain(conn) -> None:
    submit(conn, "msg-00000001")
    submit(conn, "msg-00000002", to=(BOB,), priority="urgent")
    refuse(conn, "msg-00000001", "late.test")

    assert [m["id"] for m in relay_admin.queue_messages(conn, None, None, 10)] == ["msg-00000001", "msg-00000002"]
    assert [m["id"] for m in relay_admin.queue_messages(conn, "failed", None, 10)] == ["msg-00000001"]
    assert [m["id"] for m in relay_admin.queue_messages(conn, "queued", "clinique-sud.test", 10)] == \
        ["msg-00000001", "msg-00000002"]
    assert relay_admin.queue_messages(conn, None, "nowhere.test", 10) == []
    assert relay_admin.queue_messages(conn, None, "late_test", 10) == []  # "_" is no wildcard
    shown = relay_admin.queue_message(conn, "msg-00000001", False)
    assert shown["recipients"][ZOE]["status"] == "failed" and shown["waiting_for_hub"] == ["clinique-sud.test"]
    assert "body" not in shown and shown["body_kept"]
    assert relay_admin.queue_message(conn, "msg-00000001", True)["body"] == "Bonjour"
    assert relay_admin.queue_message(conn, "nope", False) is None


def test_retry_queues_failed_recipients_again_while_the_body_is_kept(conn) -> None:
    submit(conn, "msg-00000001")
    refuse(conn, "msg-00000001", "late.test")
    now = NOW + 60

    assert relay_admin.retry_failed(conn, None, 3600, now) == {"msg-00000001": relay_admin.RETRIED}
    assert relay_admin.queue_message(conn, "msg-00000001", False)["recipients"][ZOE]["status"] == "queued"
    assert sorted(d for (d,) in conn.execute("SELECT dest FROM outbox")) == ["clinique-sud.test", "late.test"]
    expires, = conn.execute("SELECT expires_at FROM message").fetchone()
    assert expires == now + 3600
    assert relay_admin.retry_failed(conn, ["msg-00000001"], 3600, now) == {"msg-00000001": "no failed recipient"}


def test_retry_explains_a_body_that_is_gone(conn) -> None:
    submit(conn, "msg-00000001", to=(ZOE,))
    refuse(conn, "msg-00000001", "late.test")  # its last envelope: the body is kept for the retry window
    assert relay_queue.drop_bodies(conn, NOW + 600, 600) == 0
    assert relay_queue.drop_bodies(conn, NOW + 601, 600) == 1

    assert "body no longer kept" in relay_admin.retry_failed(conn, None, 3600, NOW + 601)["msg-00000001"]


def test_purge_fails_queued_recipients_and_notifies_the_sender(conn) -> None:
    submit(conn, "msg-00000001")

    assert relay_admin.purge(conn, "msg-00000001", now=NOW) == (2, {"messenger"})
    assert {r["reason"] for r in relay_admin.queue_message(conn, "msg-00000001", False)["recipients"].values()} \
        == {relay_admin.PURGED}
    assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0
    assert conn.execute("SELECT type FROM event").fetchall() == [("failed",)]
    assert relay_admin.purge(conn, "nope", now=NOW) is None


def test_summary_counts_what_status_shows(conn) -> None:
    submit(conn, "msg-00000001")
    submit(conn, "msg-00000002", to=(BOB,), priority="urgent")
    summary = relay_admin.queue_summary(conn)
    assert summary["outbound"] == {"urgent": 1, "normal": 2}
    assert summary["recipients"] == {"queued": 3, "sent": 0, "failed": 0}
    assert summary["oldest_queued_at"] == NOW


# -- certificates and health ------------------------------------------------------------


@pytest.mark.parametrize(("days", "expected"), [
    ([40, 29, 20, 6.5, 6, 0.5, -1], [None, 30, None, 7, None, 1, 0]),
    ([5, 4], [7, None]),  # a relay started 5 days before expiry warns once, not for 30 then 7
    ([-3], [0]),
])
def test_expiry_warnings_come_once_per_threshold(days, expected) -> None:
    warned: set[int] = set()
    assert [operations.due_warning(d, warned) for d in days] == expected


def test_certificate_watch_logs_and_starts_afresh_for_a_renewed_certificate(caplog) -> None:
    watch, now = operations.CertificateWatch(), time.time()
    old = operations.Certificate("relay", now + 6 * 86400, "relay.pem")
    watch.check([old], now)
    watch.check([old], now + 60)
    renewed = operations.Certificate("relay", now + 25 * 86400, "relay.pem")
    watch.check([renewed], now + 120)
    warnings = [r.getMessage() for r in caplog.records if r.name == "relay.appliance.operations"]
    assert len(warnings) == 2
    assert "certificate relay (relay.pem) expires in 6 day(s)" in warnings[0]
    assert "expires in 25 day(s)" in warnings[1]


# -- the admin channel ----------------------------------------------------------------


def test_the_lock_says_who_holds_the_store(tmp_path: Path) -> None:
    assert admin_socket.holder(tmp_path) is None
    with admin_socket.StateLock(tmp_path) as lock:
        lock.acquire("eimis-relay run", tmp_path / "admin.sock")
        found = admin_socket.holder(tmp_path)
        assert found["pid"] == os.getpid() and found["admin_socket"] == str(tmp_path / "admin.sock")
        with pytest.raises(admin_socket.StoreBusy, match=r"in use by eimis-relay run \(pid \d+\)"):
            admin_socket.StateLock(tmp_path).acquire("eimis-relay queue purge")
    assert admin_socket.holder(tmp_path) is None


async def test_the_admin_socket_is_private_and_answers_one_json_line(tmp_path: Path) -> None:
    async def status(args):
        return {"asked": args}

    async def refuse(args):
        raise admin_socket.AdminError("no such message")

    path = tmp_path / "admin.sock"
    server = admin_socket.AdminServer(path, {"status": status, "queue.show": refuse})
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with trio.fail_after(10):
            assert await trio.to_thread.run_sync(admin_socket.call, path, "status", {"x": 1}) == {"asked": {"x": 1}}
            with pytest.raises(admin_socket.AdminError, match="no such message"):
                await trio.to_thread.run_sync(admin_socket.call, path, "queue.show")
            with pytest.raises(admin_socket.AdminError, match="malformed"):
                await trio.to_thread.run_sync(admin_socket.call, path, "drop tables")
        nursery.cancel_scope.cancel()
    assert not path.exists()
    with pytest.raises(admin_socket.DaemonUnreachable):
        admin_socket.call(path, "status")


# -- the watchdog ---------------------------------------------------------------------


async def test_a_stuck_event_loop_stops_the_watchdog_pings(tmp_path: Path, monkeypatch) -> None:
    """The ping comes from a task of the trio loop itself: while the loop is
    blocked, systemd hears nothing, and kills the service after WatchdogSec."""
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(10)
    pings: list[float] = []

    def listen() -> None:  # systemd's side, in a thread of its own: it is not stuck
        while len(pings) < 12:
            if sock.recv(64) == b"WATCHDOG=1":
                pings.append(time.monotonic())

    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 50 ms
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    listener = threading.Thread(target=listen)
    listener.start()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sdnotify.watchdog)
            with trio.fail_after(10):
                while len(pings) < 4:
                    await trio.sleep(0.01)
            stuck_at = time.monotonic()
            time.sleep(0.6)  # the loop is stuck: no task runs
            with trio.fail_after(10):
                while len(pings) < 12:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        listener.join(10)
        sock.close()
    gaps = [b - a for a, b in pairwise(pings)]
    during = [b - a for a, b in pairwise(pings) if a <= stuck_at + 0.05 <= b]
    assert during and during[0] >= 0.5, gaps
    assert sorted(gaps)[len(gaps) // 2] < 0.2  # otherwise every 50 ms or so

"""Power cuts: does a 202 (and the hub's 200, and an ack) survive losing
every byte that was not fsynced?  The promise of docs/guarantees.md,
tested for its strongest half.

The fault suite's SIGKILL leaves the kernel's page cache intact, so it
cannot tell a commit that was fsynced from one that was only written.
Here the state directories of the victims are LossyFS mounts
(lossyfs.py): each trial SIGKILLs the victim daemons at a random moment
of a stream of messages, drops every unsynced byte (``clear-cache``),
checks each victim's store (``PRAGMA integrity_check``, the real
``eimis-relay audit-verify``, and that nothing acknowledged before the
cut is missing from it), and restarts them.  At the end every message
answered 202 must have reached relay B's event stream once, in order per
sender and recipient.  The traffic, its checks and the summary line are
the fault suite's (test_faults.py).

The short version runs in the default ``pytest`` run; ``POWERCUT_TRIALS=N``
sets the power cuts per scenario (docs/guarantees.md has the figures of a
long run); ``FAULT_SEED`` replays the same moments.
"""

from __future__ import annotations

import os
import random
import sqlite3
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest
import trio
from lossy_mount import LossyMount, requires_fuse
from processes import STEP, DemoSpace, Process, Site
from test_faults import FAST_RETRY, SEED, Traffic, Verdict, judge

from relay.store import sealing
from relay.store.engine import UNSAFE_NO_FSYNC_FOR_TESTS, connect

pytestmark = [pytest.mark.faults, pytest.mark.e2e, requires_fuse]

TRIALS = int(os.environ.get("POWERCUT_TRIALS", "2"))
ORIGIN, DESTINATION = "chu-nord.test", "clinique-sud.test"
STATE = {"origin": ("state-relay-a", "relay.db"), "hub": ("state-hub", "hub.db"),
         "destination": ("state-relay-b", "relay.db")}
# How long the event stream may stay silent before the messages still
# missing count as lost (the negative control needs an end; the others
# get everything well before).
IDLE = 10.0


class PowerCutSpace:
    """The fault suite's demo space with some state directories on LossyFS."""

    def __init__(self, directory: Path, victims: list[str]) -> None:
        self.demo = DemoSpace(directory)
        for name in ("relay-a.toml", "relay-b.toml"):
            self.demo.edit(name, "[uplink]\n", FAST_RETRY)
        self.victims = victims
        self.mounts: dict[str, LossyMount] = {}
        for victim in victims:
            self.mounts[victim] = LossyMount(directory / f"backing-{victim}", directory / STATE[victim][0],
                                             directory / f"lossyfs-{victim}.log").start()

    def process(self, victim: str) -> Process:
        return {"origin": self.demo.a.process, "hub": self.demo.hub, "destination": self.demo.b.process}[victim]

    def db(self, victim: str) -> Path:
        state, name = STATE[victim]
        return self.demo.directory / state / name

    def close(self) -> None:
        self.demo.close()
        for mount in self.mounts.values():
            mount.stop()


@pytest.fixture
def make_space(tmp_path: Path):
    spaces: list[PowerCutSpace] = []

    def make(victims: list[str]) -> PowerCutSpace:
        spaces.append(PowerCutSpace(tmp_path, victims))
        return spaces[-1]

    try:
        yield make
    finally:
        for space in spaces:
            space.close()


def _rows(db: Path, query: str) -> set[tuple]:
    conn = sqlite3.connect(db, timeout=STEP)
    try:
        return set(conn.execute(query))
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return set()  # the cut took the schema too (the negative control): nothing is kept
        raise
    finally:
        conn.close()


def check_after_cut(space: PowerCutSpace, traffic: Traffic, counts: Counter) -> None:
    """With the victims dead and their unsynced bytes gone: their stores
    are sound, and hold everything they acknowledged before the cut."""
    for victim in space.victims:
        db = space.db(victim)
        if _rows(db, "PRAGMA integrity_check") != {("ok",)}:
            counts["integrity failures"] += 1
        verify = subprocess.run([sys.executable, "-m", "relay", "audit-verify", "--db", str(db)],
                                capture_output=True, check=False, text=True)
        if verify.returncode != 0:
            counts["audit-verify failures"] += 1
    a = space.db("origin") if "origin" in space.victims else space.demo.directory / "state-relay-a" / "relay.db"
    if "origin" in space.victims:  # every 202 is in relay A's store
        kept = {ident for (ident,) in _rows(a, "SELECT id FROM message")}
        accepted = {ident for ids in traffic.accepted.values() for ident in ids}
        counts["acked but missing after a cut"] += len(accepted - kept)
    # Relay A's statuses witness what the others acknowledged: "sent" is
    # written only after the hub's 200 was committed at the hub, "delivered"
    # only after relay B's commit and ack.
    statuses = _rows(a, "SELECT message_id, address, status FROM recipient")
    if "hub" in space.victims:
        seen = _rows(space.db("hub"), "SELECT origin, id, dest FROM seen")
        counts["acked but missing after a cut"] += sum(
            (ORIGIN, ident, address.split("@")[1]) not in seen
            for ident, address, status in statuses if status in ("sent", "delivered", "read"))
    if "destination" in space.victims:
        inbound = _rows(space.db("destination"), "SELECT origin, id FROM inbound")
        counts["acked but missing after a cut"] += sum(
            (ORIGIN, ident) not in inbound for ident, _, status in statuses if status in ("delivered", "read"))


async def drain(site: Site, expected: int) -> list[dict]:
    """Relay B's message events, once ``expected`` have come and a second
    passed without more (a late duplicate would come), or once nothing
    came for `IDLE` seconds (what is missing then is lost)."""
    found: list[dict] = []
    cursor = 0
    quiet_since = trio.current_time()
    async with httpx.AsyncClient(base_url=site.url, headers={"Authorization": f"Bearer {site.token}"},
                                 timeout=STEP) as client:
        with trio.fail_after(180):
            while True:
                wait = 1 if len(found) >= expected else 2
                page = (await client.get("/v1/events", params={"after": cursor, "wait": wait})).json()
                if page["events"]:
                    found += [e for e in page["events"] if e["type"] == "message"]
                    cursor = page["next"]
                    quiet_since = trio.current_time()
                elif len(found) >= expected or trio.current_time() - quiet_since > IDLE:
                    return found


async def power_cuts(space: PowerCutSpace, name: str) -> tuple[Verdict, Counter, list[dict], Traffic]:
    rng = random.Random(f"{SEED}-powercut-{name}")
    demo = space.demo
    await demo.start()
    traffic = Traffic(demo.a, f"powercut-{name.replace(' ', '-')}")
    counts: Counter = Counter()
    stop = trio.Event()
    async with trio.open_nursery(strict_exception_groups=True) as nursery:
        nursery.start_soon(traffic.run, stop)
        for _ in range(TRIALS):
            before = traffic.count
            await trio.sleep(rng.uniform(0.3, 1.5))
            with trio.fail_after(STEP * 2):
                while traffic.count == before:  # a cut with nothing acknowledged since the last one tests little
                    await trio.sleep(0.05)
            for victim in space.victims:
                space.process(victim).kill()  # SIGKILL, reaped: nothing writes any more
            for victim in space.victims:
                counts["unsynced bytes dropped"] += int(space.mounts[victim].clear_cache().split()[-2])
            counts["power cuts"] += 1
            check_after_cut(space, traffic, counts)
            for victim in space.victims:
                space.process(victim).start()
        await demo.a.uplink("connected")
        await demo.b.uplink("connected")
        await trio.sleep(0.5)
        stop.set()
    events = await drain(demo.b, traffic.count)
    return judge(traffic, events), counts, events, traffic


def report(capsys, scenario: str, verdict: Verdict, counts: Counter) -> None:
    with capsys.disabled():
        print(f"\npower-cut scenario {scenario}: trials {counts['power cuts']}, accepted {verdict.accepted}, "
              f"lost {verdict.lost}, duplicated {verdict.duplicated}, out of order {verdict.out_of_order}, "
              f"acked but missing after a cut {counts['acked but missing after a cut']}, "
              f"integrity failures {counts['integrity failures']}, "
              f"audit-verify failures {counts['audit-verify failures']}, "
              f"unsynced bytes dropped {counts['unsynced bytes dropped']} (seed {SEED})")


def assert_survived(verdict: Verdict, counts: Counter) -> None:
    assert counts["power cuts"] == TRIALS
    assert verdict.accepted > 0
    assert (verdict.lost, verdict.duplicated, verdict.out_of_order) == (0, 0, 0)
    assert counts["acked but missing after a cut"] == 0
    assert (counts["integrity failures"], counts["audit-verify failures"]) == (0, 0)


@pytest.mark.parametrize("victims", [["origin"], ["hub"], ["destination"], ["origin", "hub", "destination"]],
                         ids=["origin", "hub", "destination", "all"])
async def test_power_cut(make_space, victims: list[str], capsys) -> None:
    name = " + ".join(victims)
    verdict, counts, _, _ = await power_cuts(make_space(victims), name)
    report(capsys, f"{name}", verdict, counts)
    assert_survived(verdict, counts)


async def test_negative_control_without_fsync_loses_messages(make_space, monkeypatch, capsys) -> None:
    """The same scenario with the stores' fsyncs switched off (a test-only
    switch of relay/store/engine.py): it must see acknowledged messages
    vanish, or the scenarios above prove nothing."""
    monkeypatch.setenv(UNSAFE_NO_FSYNC_FOR_TESTS, "1")
    verdict, counts, _, _ = await power_cuts(make_space(["origin", "hub", "destination"]), "control")
    report(capsys, "negative control (synchronous=OFF)", verdict, counts)
    assert verdict.lost > 0
    assert counts["acked but missing after a cut"] > 0


async def test_key_rotation_survives_a_power_cut(make_space, capsys) -> None:
    """A cut right after ``rotate-key``, then bodies sealed with the new key
    and another cut: the key must still be there to open them."""
    space = make_space(["origin"])
    await space.demo.start()
    traffic = Traffic(space.demo.a, "rotated")
    await traffic.run(trio.Event(), limit=5)
    space.demo.a.process.kill()
    ring = space.demo.directory / "state-relay-a" / sealing.KEY_FILE
    rotated = subprocess.run([sys.executable, "-m", "relay", "rotate-key", "--state-dir", str(ring.parent)],
                             capture_output=True, check=False, text=True)
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    counts = Counter({"power cuts": 2})
    counts["unsynced bytes dropped"] += int(space.mounts["origin"].clear_cache().split()[-2])
    assert sealing.KeyRing.load(ring).current == 2
    space.demo.a.process.start()
    await space.demo.a.uplink("connected")
    space.demo.hub.kill()  # the new messages wait in relay A's store, sealed with key 2
    await space.demo.a.uplink("down")
    await traffic.run(trio.Event(), limit=25)
    space.demo.a.process.kill()
    counts["unsynced bytes dropped"] += int(space.mounts["origin"].clear_cache().split()[-2])
    space.demo.hub.start()
    space.demo.a.process.start()
    events = await drain(space.demo.b, traffic.count)
    verdict = judge(traffic, events)
    bodies_intact = all(e["message"]["body"].startswith("rotated ") for e in events)
    report(capsys, "key rotation", verdict, counts)
    assert (verdict.accepted, verdict.lost, verdict.duplicated, verdict.out_of_order) == (30, 0, 0, 0)
    assert bodies_intact


@pytest.fixture
def synced(monkeypatch) -> list[str]:
    """What os.fsync is called on from Python ("file" or "directory")."""
    calls: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        calls.append("directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return calls


def test_key_ring_writes_sync_the_file_and_its_directory(tmp_path: Path, synced: list[str]) -> None:
    """What LossyFS cannot see (it never loses a directory entry): a new
    ring's name is made durable too."""
    sealing.KeyRing.load_or_create(tmp_path / sealing.KEY_FILE)
    sealing.rotate(tmp_path / sealing.KEY_FILE)
    assert synced == ["file", "directory", "file", "directory"]


def test_a_new_store_syncs_its_name(tmp_path: Path, synced: list[str]) -> None:
    connect(tmp_path / "new.db").close()
    assert synced == ["directory"]
    connect(tmp_path / "new.db").close()  # an existing store: nothing to sync
    assert synced == ["directory"]

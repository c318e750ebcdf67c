"""Encryption at rest: bodies never lie in clear in the relays' and the
hub's database files, and rotating the key keeps old data readable."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Space

from relay.store.sealing import KEY_FILE, KeyRing, KeyRingError, Unreadable, rotate

SECRET = "Patient Martin, 45 ans: suspicion d'embolie pulmonaire"


def test_seal_and_unseal_round_trip_bound_to_their_context(tmp_path: Path) -> None:
    ring = KeyRing.load_or_create(tmp_path / KEY_FILE)
    assert (tmp_path / KEY_FILE).stat().st_mode & 0o777 == 0o600
    sealed = ring.seal(SECRET, "msg-1")
    assert SECRET.encode() not in sealed
    assert ring.unseal(sealed, "msg-1") == SECRET
    assert ring.unseal(ring.seal(b"\x00bytes", "d"), "d") == b"\x00bytes"
    with pytest.raises(Unreadable, match="msg-2"):  # moved to another row: no longer opens
        ring.unseal(sealed, "msg-2")
    assert ring.unseal("written before encryption", "msg-1") == "written before encryption"


def test_rotation_keeps_old_data_readable(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE
    old = KeyRing.load_or_create(path).seal(SECRET, "m")
    assert rotate(path) == 2
    ring = KeyRing.load(path)
    assert ring.current == 2
    assert ring.unseal(old, "m") == SECRET
    assert ring.unseal(ring.seal("new", "m"), "m") == "new"


def test_an_exposed_or_damaged_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE
    KeyRing.load_or_create(path)
    path.chmod(0o644)
    with pytest.raises(KeyRingError, match="readable by group or others"):
        KeyRing.load(path)
    path.chmod(0o600)
    path.write_text("1 not-base64!\n")
    with pytest.raises(KeyRingError, match="not a key ring"):
        KeyRing.load(path)


def _in_clear(directory: Path) -> list[str]:
    """Files of a state directory holding the secret body in clear."""
    return [p.name for p in directory.glob("*.db*") if SECRET.encode() in p.read_bytes()]


async def test_bodies_are_sealed_in_every_store(stopped_space: Space) -> None:
    space = stopped_space
    await space.start_hub()
    await space.start_relay(space.a)
    ident = await space.send(space.a, ["bob@clinique-sud.test"], SECRET)
    await space.wait_status(space.a, ident, "sent")  # now queued at the hub, relay B being down
    assert _in_clear(space.directory / "state-hub") == []
    await space.stop_hub()
    await space.start_hub()
    await space.start_relay(space.b)
    [event] = await space.events(space.b, 1)
    assert event["message"]["body"] == SECRET
    await space.wait_status(space.a, ident, "delivered")
    for state in ("state-relay-a", "state-relay-b", "state-hub"):
        assert _in_clear(space.directory / state) == [], state
    # After a key rotation and a restart, old and new messages both read back.
    rotate(space.directory / "state-relay-b" / KEY_FILE)
    await space.stop_relay(space.b)
    await space.start_relay(space.b)
    second = await space.send(space.a, ["bob@clinique-sud.test"], SECRET + " (bis)")
    events = await space.events(space.b, 2)
    assert [e["message"]["body"] for e in events] == [SECRET, SECRET + " (bis)"]
    assert events[1]["message"]["id"] == second

"""The destination side: a messaging tool long-polling ``GET /v1/events``.

End-to-end figures stop the clock when a message is *readable by the
destination's local system*, so the reader behaves like one: one keep-alive
connection, ``after=<cursor>&wait=<s>``, the next poll as soon as a page is
in.  Each event's arrival is stamped with ``time.perf_counter()`` (the
clock the generator stamps its POSTs with) and filed under the ``tag`` the
generator put at the start of the body; events of other tags (earlier
runs, other scenarios) only move the cursor.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict

import trio

from .loadgen import H1Client, RequestFailed, Target, parse_marker

# Long-poll length: short enough that a cancelled reader leaves quickly,
# long enough that an idle reader costs nothing.
POLL_WAIT = 5.0


class EventReader:
    """Reads one relay's events for one local system, from a kept cursor.

    Resource handling: `run` holds one connection for as long as it runs;
    cancel it to stop.  The cursor survives runs, so a later run only
    reads what arrived since (after `drain`)."""

    def __init__(self, url: str, token: str) -> None:
        self._target = Target.from_url(url)
        self._headers = [(b"authorization", f"Bearer {token}".encode())]
        self.cursor = 0
        self.arrivals: dict[str, dict[int, float]] = defaultdict(dict)
        self.other = 0
        self._changed = trio.Event()

    async def drain(self, timeout: float) -> int:
        """Skip everything already readable (``wait=0`` pages until empty); return how many."""
        skipped = 0
        client = await H1Client.connect(self._target)
        try:
            with trio.fail_after(timeout):
                while True:
                    events = await self._page(client, 0)
                    if not events:
                        return skipped
                    skipped += len(events)
        finally:
            await client.aclose()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Long-poll until cancelled; reconnects if the relay closes the connection."""
        started = False
        while True:
            try:
                client = await H1Client.connect(self._target)
                try:
                    if not started:
                        task_status.started()
                        started = True
                    await self._poll(client)
                finally:
                    await client.aclose()
            except (RequestFailed, OSError, trio.TooSlowError):
                await trio.sleep(0.05)  # the relay restarted: reconnect at once

    async def _poll(self, client: H1Client) -> None:
        while True:
            events = await self._page(client, POLL_WAIT)
            now = time.perf_counter()
            for event in events:
                marker = parse_marker(event["message"]["body"])
                if marker is None:
                    self.other += 1
                else:
                    self.arrivals[marker[0]].setdefault(marker[1], now)
            if events:
                self._changed.set()
                self._changed = trio.Event()

    async def wait_for(self, tag: str, count: int, timeout: float) -> bool:
        """Wait until ``count`` distinct messages of ``tag`` arrived; False on timeout."""
        with trio.move_on_after(timeout):
            while len(self.arrivals[tag]) < count:
                await self._changed.wait()
            return True
        return False

    async def _page(self, client: H1Client, wait: float) -> list[dict]:
        path = f"/v1/events?after={self.cursor}&wait={wait:g}".encode()
        with trio.fail_after(wait + 30):
            status, body = await client.request(b"GET", path, self._headers)
        if status != 200:
            raise RequestFailed(f"GET /v1/events answered {status}: {body[:200]!r}")
        page = json.loads(body)
        self.cursor = page["next"]
        return page["events"]

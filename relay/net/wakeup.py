"""A level-triggered wake-up shared by one producer side and many waiters.

The pattern every queue here follows: take ``signal.watch()`` *before*
looking at the store, and wait on it only if the look found nothing.  A
`fire` that lands between the look and the wait is then never missed.
"""

from __future__ import annotations

from collections.abc import Iterable

import trio


class Signal:
    def __init__(self) -> None:
        self._event = trio.Event()

    def watch(self) -> trio.Event:
        return self._event

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()


class Signals:
    """A `Signal` per name, made on first use: a local system's "new
    events" (its long-polls and its webhook wait on it; the uplink,
    housekeeping and the queue tools fire it)."""

    def __init__(self) -> None:
        self._signals: dict[str, Signal] = {}

    def signal(self, name: str) -> Signal:
        return self._signals.setdefault(name, Signal())

    def fire(self, names: Iterable[str]) -> None:
        for name in names:
            self.signal(name).fire()

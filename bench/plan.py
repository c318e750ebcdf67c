"""What a benchmark run does (`Plan`) and what its scenarios share (`Bench`).

`QUICK` is sized to finish in about three minutes on a 2-core VM and only
shows the shape of the figures; `FULL` is the one to quote (under twenty
minutes: 100,000 messages for catch-up, five runs a figure, a soak of
three minutes, 50 destination domains).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio

from .events import EventReader
from .profile import Profiler
from .report import Report
from .space import Relay, Space


@dataclass(frozen=True)
class Plan:
    runs: int  # runs per figure; the median and spread are over these
    duration: float  # seconds measured per closed-loop run...
    warmup: float  # ...after this many seconds not counted
    e2e_messages: int  # messages per end-to-end run
    latency_seconds: float  # per latency run, at `latency_rate`
    urgent_seconds: float  # per urgent run, loaded and unloaded
    catchup_messages: int  # queued at A while the hub is down
    catchup_runs: int
    catchup_timeout: float  # seconds the drain may take before the figure is reported as partial
    startup_runs: int
    soak_seconds: float
    domains: int  # destination domains for the scaling figure (B and extra relays)
    users: int = 1000  # local users for the scaling figure
    postfix_messages: int = 2000
    postfix_sessions: int = 50
    sqlite_seconds: float = 1.0
    latency_rate: float = 200.0  # msg/s offered, the target's load
    urgent_rate: float = 10.0  # urgent msg/s under the background


QUICK = Plan(runs=3, duration=0.8, warmup=0.2, e2e_messages=1500, latency_seconds=3.0, urgent_seconds=2.5,
             catchup_messages=3000, catchup_runs=1, catchup_timeout=120.0, startup_runs=3, soak_seconds=10.0,
             domains=10, postfix_messages=800, sqlite_seconds=0.7)
FULL = Plan(runs=5, duration=2.0, warmup=0.5, e2e_messages=8000, latency_seconds=8.0, urgent_seconds=5.0,
            catchup_messages=100_000, catchup_runs=1, catchup_timeout=180.0, startup_runs=5, soak_seconds=180.0,
            domains=50, postfix_messages=3000, sqlite_seconds=1.5)


def plan_for(quick: bool, **overrides: object) -> Plan:
    return replace(QUICK if quick else FULL, **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class Bench:
    """The space, the plan, the report, and helpers every scenario uses."""

    plan: Plan
    space: Space
    report: Report
    directory: Path
    readers: dict[str, EventReader] = field(default_factory=dict)
    profiler: Profiler | None = None
    _tags: itertools.count = field(default_factory=itertools.count)

    def tag(self, name: str) -> str:
        """A tag unique to this run of this scenario: the reader files events under it."""
        return f"{name}-{next(self._tags)}"

    def reader(self, relay: Relay) -> EventReader:
        if relay.domain not in self.readers:
            self.readers[relay.domain] = EventReader(relay.url, relay.token)
        return self.readers[relay.domain]

    @asynccontextmanager
    async def reading(self, *relays: Relay) -> AsyncIterator[list[EventReader]]:
        """Long-poll the events of ``relays`` for the duration of the block,
        starting after whatever was already readable."""
        readers = [self.reader(r) for r in relays]
        async with trio.open_nursery() as nursery:
            for reader in readers:
                await reader.drain(timeout=120)
                await nursery.start(reader.run)
            yield readers
            nursery.cancel_scope.cancel()

    @asynccontextmanager
    async def profiling(self, name: str) -> AsyncIterator[None]:
        """py-spy on the hub, A and B during the block, when ``--profile`` asked for it.

        A daemon restarted inside the block is profiled until it stops; a
        scenario that restarts daemons opens its own block around the part
        that matters (catch-up's drain)."""
        if self.profiler is None:
            yield
            return
        daemons = [self.space.hub, self.space.a.daemon, self.space.b.daemon]
        async with self.profiler.record(name, daemons, self.report.data.setdefault("profiles", {})):
            yield

    async def settle(self, timeout: float = 90.0, window: float = 0.3, busy: float = 0.08) -> None:
        """Wait until the space is idle: its daemons together used under
        ``busy`` of a core over ``window`` s (the forwarding of a previous
        run's backlog is over), so that it does not eat the next run's CPU."""
        with trio.move_on_after(timeout):
            while True:
                before = self._cpu()
                await trio.sleep(window)
                if self._cpu() - before < busy * window:
                    return
        self.report.note(f"the space was still busy after {timeout:g} s of waiting to settle")

    def _cpu(self) -> float:
        total = 0.0
        for daemon in self.space.daemons:
            if daemon.running:
                try:
                    total += daemon.cpu_seconds()
                except OSError:  # exited in between
                    pass
        return total

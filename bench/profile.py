"""``--profile``: py-spy on the hub and both relays while a scenario runs.

Where a figure falls short, the question is where the CPU (or the wait)
goes, and the answer must come from the processes under the same load,
not from a guess.  py-spy samples a running CPython from outside (no code
change, ~100 samples/s, a few % of a core); `Profiler.record` runs one
``py-spy record --format raw`` per daemon for the duration of a block and
stops it with SIGINT, on which py-spy writes its collapsed stacks.  The
summary (share of samples per thread, top functions by own samples) goes
into the JSON; the raw files stay next to it for flame graphs
(``flamegraph.pl`` or speedscope read them).

py-spy counts a thread blocked in C (fsync inside ``COMMIT``, a queue
``get``) as busy: read ``Store._serve`` / ``queue.get`` lines as waiting.
"""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from .space import Daemon

SAMPLE_RATE = 100  # per second: enough for a few seconds' profile, cheap on 2 cores
TOP = 15


def py_spy() -> str | None:
    """py-spy from the virtualenv running the benchmark (``pip install py-spy``)."""
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else None


class Profiler:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.program = py_spy()

    @asynccontextmanager
    async def record(self, name: str, daemons: list[Daemon], summaries: dict) -> AsyncIterator[None]:
        """Profile ``daemons`` during the block; file a summary per daemon under ``summaries[name]``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        spies: list[tuple[Daemon, Path, subprocess.Popen]] = []
        for daemon in daemons:
            if daemon.running:
                out = self.directory / f"{name}-{daemon.name}.txt"
                spies.append((daemon, out, subprocess.Popen(
                    [self.program, "record", "--pid", str(daemon.popen.pid), "--format", "raw", "--threads",
                     "-r", str(SAMPLE_RATE), "-o", str(out)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        try:
            yield
        finally:
            with trio.CancelScope(shield=True):
                for _, _, spy in spies:
                    spy.send_signal(signal.SIGINT)
                for daemon, out, spy in spies:
                    with trio.move_on_after(30):
                        while spy.poll() is None:
                            await trio.sleep(0.05)
                    if spy.poll() is None:
                        spy.kill()
                    if out.exists():
                        summaries.setdefault(name, {})[daemon.name] = summarize(out)


def summarize(path: Path) -> dict:
    """Samples per thread and the top functions by own samples, from py-spy's raw output."""
    own: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        total += int(count)
        threads[frames[0].split(": ", 1)[-1]] += int(count)
        own[frames[-1]] += int(count)
    def share(n: int) -> float:
        return round(100 * n / total, 1) if total else 0.0

    return {"samples": total, "file": str(path), "threads_pct": {t: share(n) for t, n in threads.items()},
            "top_own_pct": [(f, share(n)) for f, n in own.most_common(TOP)]}

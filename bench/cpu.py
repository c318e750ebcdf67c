"""How much of the machine other processes took while a scenario ran.

The machine is shared (a test suite, a fuzzer, another benchmark may run
beside this one), and two cores leave no slack: a figure measured while
something else ate half a core is not the same figure.  `CpuAccount`
compares the machine's busy time (``/proc/stat``) with the benchmark's
own: this process, its live descendants (the daemons, Postfix and the
children Postfix reaped, h2load...) and the children it reaped itself.
The difference, in cores, goes into the JSON for every scenario, and a
note says when it was large enough to matter.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
# Average cores taken by others above which a scenario's figures get a note.
NOTICEABLE_CORES = 0.15


@dataclass(frozen=True)
class Sample:
    wall: float
    busy: float  # seconds of CPU the whole machine spent not idle
    ours: float  # seconds of CPU this benchmark's process tree spent


def sample() -> Sample:
    return Sample(time.perf_counter(), _machine_busy(), _tree_cpu(os.getpid()))


def foreign_cores(start: Sample, end: Sample) -> float:
    """Average cores used by processes outside the benchmark between two samples."""
    wall = end.wall - start.wall
    if wall <= 0:
        return 0.0
    return max(0.0, ((end.busy - start.busy) - (end.ours - start.ours)) / wall)


def _machine_busy() -> float:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields]
    idle = values[3] + values[4]  # idle + iowait
    # guest time is already counted in user; steal is time the VM did not get.
    total = sum(values[:8])
    return (total - idle - values[7]) / TICKS


def _tree_cpu(root: int) -> float:
    """CPU of ``root`` (with the children it reaped) and of its live descendants
    (with the children they reaped)."""
    times = os.times()
    total = times.user + times.system + times.children_user + times.children_system
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        pid = int(entry.name)
        stats[pid] = fields
        children.setdefault(int(fields[1]), []).append(pid)
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        fields = stats.get(pid)
        if fields is not None:
            total += sum(int(v) for v in fields[11:15]) / TICKS  # utime stime cutime cstime
            todo.extend(children.get(pid, []))
    return total

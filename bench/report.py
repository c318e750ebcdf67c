"""The results: one table row per figure, printed and written as JSON.

Each row says what was measured (median, spread over the runs), what it
is compared with (a baseline measured in the same run, or a fixed target
from issue 7) and whether the target is met.  The JSON keeps everything,
including every run's raw value and the machine it ran on.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Row:
    figure: str
    value: str
    spread: str = ""
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    met: bool | None = None


class Report:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.rows: list[Row] = []
        self.data: dict = {"mode": mode, "machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "figures": {}, "baselines": {}, "notes": []}

    def row(self, figure: str, value: str, *, spread: float | None = None, baseline: str = "",
            ratio: float | None = None, target: str = "", met: bool | None = None) -> None:
        self.rows.append(Row(figure, value, _pct(spread), baseline, f"{ratio:.2f}" if ratio is not None else "",
                             target, met))
        print(f"  {figure}: {value}" + (f" (spread {_pct(spread)})" if spread is not None else "")
              + (f", {ratio:.2f} x {baseline}" if ratio is not None else "")
              + (f" [target {target}: {'met' if met else 'NOT met'}]" if met is not None else ""), flush=True)

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        print(f"  note: {text}", flush=True)

    def table(self) -> str:
        headers = ["figure", "median", "spread", "baseline (same run)", "ratio", "target", "met"]
        cells = [[r.figure, r.value, r.spread, r.baseline, r.ratio, r.target,
                  "" if r.met is None else ("yes" if r.met else "NO")] for r in self.rows]
        widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
        def line(values: list[str]) -> str:
            return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

        return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                          *(line(c) for c in cells)])

    def write(self, path: Path, elapsed: float) -> None:
        self.data["elapsed_s"] = round(elapsed, 1)
        self.data["table"] = [asdict(r) for r in self.rows]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.data, indent=2, default=_jsonable) + "\n")


def _pct(spread: float | None) -> str:
    return f"±{spread * 50:.0f}%" if spread is not None else ""


def _jsonable(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def machine() -> dict:
    """What the figures were measured on: cores, memory, CPU model, versions."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    versions = {}
    for module in ("trio", "h2", "h11", "msgpack"):
        try:
            versions[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            versions[module] = "?"
    import sqlite3  # noqa: PLC0415 -- only here, for its version
    try:
        def git(*argv: str) -> str:
            return subprocess.run(["git", *argv], capture_output=True, text=True, timeout=10, check=False,
                                  cwd=Path(__file__).parent).stdout.strip()

        commit = git("rev-parse", "--short", "HEAD")
        if git("status", "--porcelain", "--", "relay"):
            commit += " (relay/ has uncommitted changes)"
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return {"nproc": os.cpu_count(), "ram_gib": round(mem_kib / 2**20, 1), "cpu": cpu,
            "kernel": platform.release(), "python": sys.version.split()[0], "sqlite": sqlite3.sqlite_version,
            "libraries": versions, "commit": commit}

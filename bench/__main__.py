"""``python -m bench``: the benchmark suite of issue 7, in one command.

Run from the repository root with the project's virtualenv:

    .venv/bin/python -m bench --quick          # ~3 minutes, the shape of every figure
    .venv/bin/python -m bench                  # ~17 minutes, the figures to quote
    .venv/bin/python -m bench --out FILE.json  # default: bench/results.json

It creates a demo space in a temporary directory (``python -m relay demo
--init-only``), starts the hub and two relays (and, for the scaling
figure, extra relays) as real processes on loopback, runs the baselines
and the scenarios, prints a table and writes every figure, run and note to
the JSON file.  Postfix (``postfix``) and h2load (``nghttp2-client``) are
installed with apt-get when missing and the benchmark runs as root; pass
``--no-install`` to skip them instead.  Every process it started is
stopped on the way out, Ctrl-C included.  bench/README.md explains each
figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import trio

from . import cpu, outage, scaling, scenarios
from .baselines import ensure_installed
from .plan import Bench, plan_for
from .profile import Profiler
from .report import Report
from .space import Space

SCENARIOS = {
    "sqlite": scenarios.sqlite_ceiling,
    "ingress": scenarios.ingress,
    "h2load": scenarios.h2load_ingress,
    "postfix": scenarios.postfix_baseline,
    "e2e": scenarios.end_to_end,
    "latency": scenarios.latency,
    "urgent": scenarios.urgent,
    "catchup": outage.catch_up,
    "soak": outage.soak,
    "users": scaling.users,
    "domains": scaling.domains,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs (about 3 minutes)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results.json", metavar="FILE.json")
    parser.add_argument("--only", nargs="+", choices=list(SCENARIOS), metavar="NAME",
                        help=f"run only these scenarios ({', '.join(SCENARIOS)})")
    parser.add_argument("--runs", type=int, help="runs per figure (quick 3, full 5)")
    parser.add_argument("--catchup", type=int, metavar="N", help="messages queued for catch-up (full 100000)")
    parser.add_argument("--soak", type=float, metavar="SECONDS",
                        help="soak length in seconds (quick 10, full 180; the target says 600)")
    parser.add_argument("--domains", type=int, metavar="N", help="destination domains for scaling (full 50)")
    parser.add_argument("--dir", type=Path, help="where to create the space (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the space's directory (logs, databases)")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get install postfix / nghttp2-client")
    parser.add_argument("--relay-src", type=Path, metavar="DIR",
                        help="run the daemons from the `relay` package in DIR instead of the installed one, e.g. a "
                             "snapshot (`git archive HEAD relay | tar -x -C DIR`) or a candidate fix to compare")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="record py-spy profiles of the hub and relays A and B during each scenario into DIR "
                             "(needs `pip install py-spy` in the venv; costs a few %% of CPU)")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace, directory: Path, report: Report) -> None:
    plan = plan_for(args.quick, runs=args.runs, catchup_messages=args.catchup, soak_seconds=args.soak,
                    domains=args.domains)
    report.data["plan"] = plan.__dict__
    selected = args.only or list(SCENARIOS)
    extra = plan.domains - 1 if "domains" in selected else 0
    print(f"creating the space in {directory} ({extra} extra domain(s))", flush=True)
    space = Space.create(directory, extra_domains=extra)
    bench = Bench(plan, space, report, directory)
    if args.profile:
        bench.profiler = Profiler(args.profile.resolve())
        if bench.profiler.program is None:
            report.note("--profile: py-spy not found next to this Python; install it with: pip install py-spy")
            bench.profiler = None
    run_start = cpu.sample()
    foreign = report.data.setdefault("foreign_cpu_cores", {})
    try:
        await space.start()
        for name in selected:
            print(f"\n== {name}", flush=True)
            started = time.perf_counter()
            before = cpu.sample()
            try:
                await space.start()  # a failed scenario may have left a daemon down
                async with bench.profiling(name):
                    await SCENARIOS[name](bench)
            except Exception as exc:  # noqa: BLE001 -- one broken scenario must not hide the others' figures
                with (directory / "bench-errors.log").open("a") as log:
                    traceback.print_exception(exc, file=log)
                report.note(f"{name} failed: {_describe(exc)} (traceback in {directory / 'bench-errors.log'})")
            report.data.setdefault("scenario_seconds", {})[name] = round(time.perf_counter() - started, 1)
            foreign[name] = round(cpu.foreign_cores(before, cpu.sample()), 2)
            if foreign[name] > cpu.NOTICEABLE_CORES:
                report.note(f"{name}: other processes on this machine used {foreign[name]:.2f} cores on average "
                            f"meanwhile; its figures are lower than this machine can do alone")
        worst = max(foreign, key=foreign.get, default=None)
        if worst is not None:
            report.row("CPU taken by other processes: whole run / worst scenario",
                       f"{cpu.foreign_cores(run_start, cpu.sample()):.2f} / {foreign[worst]:.2f} cores ({worst})")
    finally:
        await space.aclose()


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    report = Report("quick" if args.quick else "full")
    if args.relay_src:
        _use_relay_source(args.relay_src.resolve(), report)
    for reason in ensure_installed(["postfix", "smtp-source", "smtp-sink", "h2load"],
                                   allow_install=not args.no_install).values():
        report.note(reason)
    directory = (args.dir or Path(tempfile.mkdtemp(prefix="eimis-bench-"))).resolve()
    started = time.perf_counter()
    interrupted = False
    try:
        trio.run(run, args, directory, report)
    except BaseException as exc:
        if not _interrupted(exc):
            raise
        interrupted = True
        report.data["interrupted"] = True
        print("\ninterrupted: every process of the space was stopped; partial results follow", file=sys.stderr)
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    elapsed = time.perf_counter() - started
    machine = report.data["machine"]
    print(f"\n{report.mode} run, {elapsed:.0f} s, on {machine['nproc']} x {machine['cpu']}, "
          f"{machine['ram_gib']} GiB RAM\n")
    print(report.table())
    report.write(args.out, elapsed)
    print(f"\nwritten to {args.out}")
    return 130 if interrupted else 0


def _use_relay_source(source: Path, report: Report) -> None:
    """Make every daemon (and this process) import ``relay`` from ``source``.

    Other people edit relay/ while a 20-minute run goes on, and every
    restart inside the run (catch-up, scaling) would pick up their latest
    edit: a snapshot keeps one run on one version of the code."""
    if not (source / "relay" / "__init__.py").exists():
        raise SystemExit(f"--relay-src: no relay package in {source}")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(source))
    report.data["relay_src"] = str(source)


def _interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is Ctrl-C, possibly wrapped in trio's exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(lambda e: isinstance(e, KeyboardInterrupt)) is not None
    return isinstance(exc, KeyboardInterrupt)


if __name__ == "__main__":
    raise SystemExit(main())

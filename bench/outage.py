"""Outage and resources: catch-up, start-up, memory, soak, database growth.

One sequence, because the figures share one expensive state (a full queue):

1. idle: relay A's RSS and start-up time with an empty outbox;
2. the hub stops; N messages are posted at A (they can only be queued):
   the ingress rate with the hub down, A's RSS and database size with the
   queue full;
3. A restarts a few times with the queue full: start-up time to READY
   (``/healthz`` answering), and the RSS of a fresh process with that queue;
4. the hub restarts: the time until all N are readable at B is catch-up.

The soak then offers 200 msg/s for minutes and samples every daemon's RSS.
"""

from __future__ import annotations

import sqlite3
import time

import trio

from .loadgen import Target, closed_loop, open_loop, opener
from .plan import Bench
from .scenarios import check_result, delays_ms, post_to
from .stats import percentile, ratio, summary

CATCHUP_TARGET = 5000.0  # msg/s
IDLE_RSS_TARGET_MB = 60.0
QUEUE_RSS_TARGET_MB = 30.0  # growth with 100,000 queued
STARTUP_TARGET_S = 1.0
# RSS samples during the soak; growth is judged between the first quarter and the end.
SOAK_SAMPLES = 40
SOAK_GROWTH_LIMIT_MB = 2.0
MIB = 1024.0


async def _restart_timed(bench: Bench, runs: int) -> list[float]:
    """Restart relay A ``runs`` times; seconds from exec to /healthz answering each time."""
    relay = bench.space.a
    times = []
    for _ in range(runs):
        await relay.daemon.stop()
        relay.daemon.start()
        times.append(await relay.wait_health(None, timeout=120, poll=0.005))
    return times


async def _abandon_backlog(bench: Bench) -> None:
    """Empty relay A's outbox (A stopped, then restarted) after a catch-up
    that did not finish in time, so that its drain does not eat the CPU of
    every later figure.  Touches A's database directly: only ever done to
    the benchmark's throwaway space."""
    relay = bench.space.a
    await relay.daemon.stop()
    conn = sqlite3.connect(relay.state_dir / "relay.db", isolation_level=None)
    try:
        dropped = conn.execute("DELETE FROM outbox").rowcount
    finally:
        conn.close()
    bench.report.note(f"catch-up: dropped the {dropped:,} envelopes still queued at A before the next figures")
    await bench.space.start([relay])
    await bench.settle()


async def catch_up(bench: Bench) -> None:
    space, plan, report = bench.space, bench.plan, bench.report
    a, b = space.a, space.b
    await bench.settle()
    idle_startup = await _restart_timed(bench, plan.startup_runs)
    await a.wait_health("connected", timeout=60)
    await bench.settle()
    idle_rss = a.daemon.rss_kib() / MIB
    rates, fill_rates, connect_delays, startup, queued_rss, fresh_rss, per_message = [], [], [], [], [], [], []
    incomplete: list[int] = []
    for _ in range(plan.catchup_runs):
        await space.hub.stop()
        await a.wait_health(("connecting", "down"), timeout=30)
        tag = bench.tag("catchup")
        db_before = a.db_bytes()
        result = await closed_loop(opener(Target.from_url(a.url), "h2"), post_to(a, b.users[:1], tag),
                                   streams=100, connections=4, total=plan.catchup_messages, timeout=1200)
        check_result(bench, "catch-up fill", result)
        fill_rates.append(result.accepted / result.elapsed)
        await bench.settle()
        queued_rss.append(a.daemon.rss_kib() / MIB)
        per_message.append((a.db_bytes() - db_before) / max(1, result.accepted))
        startup += await _restart_timed(bench, plan.startup_runs)
        await bench.settle()
        fresh_rss.append(a.daemon.rss_kib() / MIB)
        async with bench.reading(b) as (reader,):
            space.hub.start()
            hub_at = space.hub.exec_at
            connected = await a.wait_health("connected", timeout=120, poll=0.01)
            connect_delays.append(a.daemon.exec_at + connected - hub_at)
            async with bench.profiling("catchup-drain"):
                complete = await reader.wait_for(tag, result.accepted, timeout=plan.catchup_timeout)
            arrived = len(reader.arrivals[tag])
            last = max(reader.arrivals[tag].values()) if complete else time.perf_counter()
            rates.append(arrived / (last - hub_at))
        if not complete:
            incomplete.append(arrived)
            report.note(f"catch-up: only {arrived:,} of {result.accepted:,} reached B within "
                        f"{plan.catchup_timeout:g} s; the rate is over that partial drain")
            await _abandon_backlog(bench)
        await b.wait_health("connected", timeout=60)
    after_rss = a.daemon.rss_kib() / MIB
    n = plan.catchup_messages
    figures = report.data["figures"]
    figures["catch_up"] = {"messages": n, "rate_from_hub_restart": summary(rates), "complete": not incomplete,
                           "delivered_in_partial_runs": incomplete, "timeout_s": plan.catchup_timeout,
                           "hub_restart_to_a_connected_s": summary(connect_delays),
                           "ingress_hub_down": summary(fill_rates)}
    figures["startup"] = {"empty_queue_s": summary(idle_startup), "queue_full_s": summary(startup), "queued": n}
    figures["memory"] = {"idle_mib": idle_rss, "queue_full_after_fill_mib": summary(queued_rss),
                         "queue_full_fresh_process_mib": summary(fresh_rss), "after_catch_up_mib": after_rss,
                         "queued": n}
    figures.setdefault("db_growth", {})["relay_a_bytes_per_queued_message"] = summary(per_message)
    disk = report.data["baselines"].get("sqlite", {}).get("100_rows_per_commit", {}).get("rows_per_s", {})
    catchup = summary(rates)
    report.row(f"catch-up: {n:,} queued at A, hub restarts",
               f"{catchup['median']:,.0f} msg/s" + (f" (partial: {incomplete[0]:,} in {plan.catchup_timeout:g} s)"
                                                     if incomplete else ""),
               spread=catchup["spread"], baseline="SQLite 100 rows/commit", ratio=ratio(catchup["median"],
                                                                                   disk.get("median")),
               target=f">= {CATCHUP_TARGET:,.0f} msg/s", met=catchup["median"] >= CATCHUP_TARGET)
    report.row("  of which hub restart -> A connected", f"{summary(connect_delays)['median']:.2f} s")
    ingress_100 = report.data["figures"].get("ingress", {}).get("h2", {}).get("100", {}).get("median")
    fill = summary(fill_rates)
    report.row("ingress, 100 streams, hub down (queue only)", f"{fill['median']:,.0f} msg/s", spread=fill["spread"],
               baseline="ingress 100, hub up", ratio=ratio(fill["median"], ingress_100))
    report.row("start-up to READY, empty queue", f"{summary(idle_startup)['median']:.2f} s",
               spread=summary(idle_startup)["spread"])
    full_startup = summary(startup)
    report.row(f"start-up to READY, {n:,} queued", f"{full_startup['median']:.2f} s", spread=full_startup["spread"],
               baseline="empty queue", ratio=ratio(full_startup["median"], summary(idle_startup)["median"]),
               target=f"<= {STARTUP_TARGET_S:g} s", met=full_startup["median"] <= STARTUP_TARGET_S)
    bare = report.data["baselines"].get("python_ceiling", {}).get("rss_mib")
    report.row("RSS relay A idle", f"{idle_rss:.1f} MiB", baseline="bare server (loaded)", ratio=ratio(idle_rss, bare),
               target=f"<= {IDLE_RSS_TARGET_MB:g} MB", met=idle_rss <= IDLE_RSS_TARGET_MB)
    growth = max(summary(queued_rss)["median"], summary(fresh_rss)["median"]) - idle_rss
    report.row(f"RSS relay A, {n:,} queued (after the fill / fresh process)",
               f"{summary(queued_rss)['median']:.1f} / {summary(fresh_rss)['median']:.1f} MiB",
               baseline="idle", target=f"growth <= {QUEUE_RSS_TARGET_MB:g} MB",
               met=growth <= QUEUE_RSS_TARGET_MB)
    report.row("database growth at A per queued message", f"{summary(per_message)['median']:,.0f} bytes")


async def soak(bench: Bench) -> None:
    """200 msg/s from A to B for ``soak_seconds``, every daemon's RSS sampled."""
    space, plan = bench.space, bench.plan
    daemons = [space.hub, space.a.daemon, space.b.daemon]
    samples: list[tuple[float, list[float]]] = []
    await bench.settle()
    tag = bench.tag("soak")
    async with bench.reading(space.b) as (reader,):
        async with trio.open_nursery() as nursery:
            async def sample() -> None:
                start = time.perf_counter()
                while True:
                    samples.append((time.perf_counter() - start, [d.rss_kib() / MIB for d in daemons]))
                    await trio.sleep(plan.soak_seconds / SOAK_SAMPLES)

            nursery.start_soon(sample)
            result = await open_loop(opener(Target.from_url(space.a.url), "h2"),
                                     post_to(space.a, space.b.users[:1], tag),
                                     rate=plan.latency_rate, duration=plan.soak_seconds)
            nursery.cancel_scope.cancel()
        check_result(bench, "soak", result)
        await reader.wait_for(tag, result.accepted, timeout=120)
        delays = delays_ms(result, reader.arrivals[tag])
    quarter = [s for t, s in samples if t >= plan.soak_seconds / 4] or [samples[-1][1]]
    by_daemon = {}
    for index, daemon in enumerate(daemons):
        series = [s[index] for _, s in samples]
        by_daemon[daemon.name] = {"first_mib": series[0], "quarter_mib": quarter[0][index], "last_mib": series[-1],
                                  "max_mib": max(series),
                                  "growth_after_first_quarter_mib": series[-1] - quarter[0][index]}
    growth = by_daemon[space.a.daemon.name]["growth_after_first_quarter_mib"]
    bench.report.data["figures"]["soak"] = {
        "seconds": plan.soak_seconds, "rate": plan.latency_rate, "accepted": result.accepted,
        "p50_ms": percentile(delays, 50), "p99_ms": percentile(delays, 99), "rss": by_daemon,
        "samples": [(round(t, 1), [round(v, 1) for v in s]) for t, s in samples]}
    a = by_daemon[space.a.daemon.name]
    bench.report.row(f"soak {plan.soak_seconds:g} s at {plan.latency_rate:g} msg/s: RSS A start/end/max",
                     f"{a['first_mib']:.1f} / {a['last_mib']:.1f} / {a['max_mib']:.1f} MiB",
                     target=f"no growth (<= {SOAK_GROWTH_LIMIT_MB:g} MiB after 1st quarter)",
                     met=growth <= SOAK_GROWTH_LIMIT_MB)
    bench.report.row("  soak latency p50 / p99", f"{percentile(delays, 50):.1f} / {percentile(delays, 99):.1f} ms")

"""Throughput and latency: the ceilings, ingress, end to end, latency, urgent.

Runs of a figure and of its baseline are interleaved (ceiling, relay h2,
relay h1, ceiling, ...) so that a drift of the VM during the figure hits
both sides of the ratio alike, and the space is left to settle (its
backlog forwarded) before each run so that one run's leftovers do not eat
the next one's CPU.
"""

from __future__ import annotations

import time

import trio

from . import baselines
from .baselines import BareServer, Postfix, Unavailable
from .loadgen import (
    LoadResult,
    Post,
    Target,
    api_post,
    client_tls,
    closed_loop,
    connections_for,
    message_body,
    open_loop,
    opener,
)
from .plan import Bench
from .space import Relay, db_bytes
from .stats import median_of, percentile, ratio, summary

CONCURRENCY = (1, 10, 100)
INGRESS_TARGET = 0.6  # x the Python ceiling at 100 streams (issue 7)
E2E_TARGET = 2.0  # x Postfix's end-to-end rate
P50_TARGET_MS, P99_TARGET_MS = 10.0, 50.0
URGENT_TARGET = 2.0  # loaded urgent p99 within this factor of the unloaded one


def post_to(sender: Relay, recipients: list[str], tag: str, *, senders: list[str] | None = None,
            priority: str = "normal") -> Post:
    """Messages from ``sender``'s users (or ``senders``) to ``recipients``, in turn."""
    froms = senders or sender.users[:1]
    return api_post(sender.token, lambda seq: message_body(
        tag, seq, froms[seq % len(froms)], recipients[seq % len(recipients)], priority=priority))


async def sqlite_ceiling(bench: Bench) -> None:
    """The disk ceiling: SQLite commits/s with the relay's settings, on the space's disk."""
    path = bench.directory / "sqlite-baseline.db"
    results = {}
    for rows in (1, 100):
        runs = []
        for _ in range(bench.plan.runs):
            await bench.settle()
            runs.append(await trio.to_thread.run_sync(baselines.sqlite_commits, path, rows, bench.plan.sqlite_seconds))
        results[f"{rows}_rows_per_commit"] = {"commits_per_s": summary([r["commits_per_s"] for r in runs]),
                                              "rows_per_s": summary([r["rows_per_s"] for r in runs])}
    bench.report.data["baselines"]["sqlite"] = results
    one, hundred = results["1_rows_per_commit"], results["100_rows_per_commit"]
    bench.report.row("disk ceiling: SQLite WAL FULL, 1 row/commit",
                     f"{median_of(one['commits_per_s']):,.0f} commits/s", spread=one["commits_per_s"]["spread"])
    bench.report.row("disk ceiling: SQLite WAL FULL, 100 rows/commit",
                     f"{median_of(hundred['rows_per_s']):,.0f} rows/s", spread=hundred["rows_per_s"]["spread"])


async def ingress(bench: Bench) -> None:
    """Figure 1, with the Python ceiling interleaved: accepted/s at 1, 10, 100 streams."""
    space, plan = bench.space, bench.plan
    pki = space.directory / "pki"
    bare = BareServer(bench.directory, cert=pki / "hub.eimis.test.pem", key=pki / "hub.eimis.test.key",
                      ca=pki / "ca.pem")
    await bare.start()
    ceiling_target = Target("127.0.0.1", bare.port, "hub.eimis.test",
                            client_tls(str(pki / "chu-nord.test.pem"), str(pki / "chu-nord.test.key"),
                                       str(pki / "ca.pem")), "hub.eimis.test")
    relay_target = Target.from_url(space.a.url)
    rates: dict[str, dict[int, list[float]]] = {"ceiling": {}, "h2": {}, "h1": {}}
    cpu: dict[str, list[float]] = {"ceiling": [], "h2": []}
    try:
        for streams in CONCURRENCY:
            for _ in range(plan.runs):
                for kind in ("ceiling", "h2", "h1"):
                    await bench.settle()
                    target, http = (ceiling_target, "h2") if kind == "ceiling" else (relay_target, kind)
                    daemon = bare.daemon if kind == "ceiling" else space.a.daemon
                    post = post_to(space.a, space.b.users[:1], bench.tag(f"ingress-{kind}"))
                    cpu_before = daemon.cpu_seconds()
                    result = await closed_loop(opener(target, http), post, streams=streams,
                                               connections=connections_for(streams, http),
                                               duration=plan.duration, warmup=plan.warmup)
                    check_result(bench, f"ingress {kind} {streams} streams", result)
                    rates[kind].setdefault(streams, []).append(result.rate)
                    if streams == 100 and kind in cpu and result.accepted:
                        # CPU of the whole run (warm-up included) per request counted: an upper bound.
                        cpu[kind].append((daemon.cpu_seconds() - cpu_before) / result.accepted * 1e6)
        bare_rss = bare.daemon.rss_kib()
    finally:
        await bare.stop()
    figures = {kind: {str(s): summary(v) for s, v in by_streams.items()} for kind, by_streams in rates.items()}
    bench.report.data["baselines"]["python_ceiling"] = {
        **figures["ceiling"], "rss_mib": bare_rss / 1024, "cpu_us_per_request_100": summary(cpu["ceiling"])}
    ingress_data = {"h2": figures["h2"], "h1": figures["h1"], "relay_cpu_us_per_message_100": summary(cpu["h2"])}
    bench.report.data["figures"]["ingress"] = ingress_data
    for streams in CONCURRENCY:
        ceiling = figures["ceiling"][str(streams)]
        bench.report.row(f"Python ceiling (bare h2+TLS), {streams} stream(s)", f"{ceiling['median']:,.0f} req/s",
                         spread=ceiling["spread"])
    # Each relay run is paired with the ceiling run just before it (same
    # minute of the VM's drift): the median of those paired ratios is the
    # figure; the ratio of the two medians is kept in the JSON beside it.
    paired = {http: {str(s): summary([r / c for r, c in zip(rates[http][s], rates["ceiling"][s], strict=False) if c])
                     for s in CONCURRENCY} for http in ("h2", "h1")}
    ingress_data["paired_ratio_vs_ceiling"] = paired
    for http in ("h2", "h1"):
        for streams in CONCURRENCY:
            figure = figures[http][str(streams)]
            r = paired[http][str(streams)]["median"]
            is_target = http == "h2" and streams == 100
            bench.report.row(f"ingress {'HTTP/2' if http == 'h2' else 'HTTP/1.1'}, {streams} stream(s)"
                             + (" / connection(s)" if http == "h1" else ""),
                             f"{figure['median']:,.0f} msg/s", spread=figure["spread"],
                             baseline=f"ceiling {streams}", ratio=r,
                             target=f">= {INGRESS_TARGET} x ceiling" if is_target else "",
                             met=(r is not None and r >= INGRESS_TARGET) if is_target else None)
    ingress_data["ratio_vs_ceiling_100"] = paired["h2"]["100"]["median"]
    ingress_data["ratio_of_medians_100"] = ratio(median_of(figures["h2"]["100"]), median_of(figures["ceiling"]["100"]))
    bench.report.row("CPU per message at 100 streams: relay A / bare server",
                     f"{median_of(summary(cpu['h2'])) or 0:,.0f} / {median_of(summary(cpu['ceiling'])) or 0:,.0f} us")


async def h2load_ingress(bench: Bench) -> None:
    """A second, independent generator (C, nghttp2) on the same figure at 100 streams."""
    space, plan = bench.space, bench.plan
    body = message_body("h2load", 0, space.a.users[0], space.b.users[0])
    try:
        runs = []
        for _ in range(plan.runs):
            await bench.settle()
            runs.append(await baselines.h2load(space.a.url + "/v1/messages", space.a.token, body, connections=4,
                                               streams=100, duration=plan.duration, warmup=plan.warmup,
                                               directory=bench.directory))
    except Unavailable as exc:
        bench.report.note(f"h2load not run: {exc}")
        bench.report.data["figures"]["ingress_h2load"] = {"unavailable": str(exc)}
        return
    figure = summary([r["rate"] for r in runs])
    bench.report.data["figures"]["ingress_h2load"] = {"100": figure, "runs": runs}
    ceiling = median_of(bench.report.data["baselines"].get("python_ceiling", {}).get("100"))
    bench.report.row("ingress HTTP/2, 100 streams, h2load (4 x 25)", f"{figure['median']:,.0f} msg/s",
                     spread=figure["spread"], baseline="ceiling 100 (Python gen.)",
                     ratio=ratio(figure["median"], ceiling))


async def postfix_baseline(bench: Bench) -> None:
    """A classic durable relay, end to end: smtp-source -> Postfix (queue, fsync) -> smtp-sink."""
    plan = bench.plan
    postfix = Postfix()
    try:
        await postfix.start()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(postfix.count_deliveries)
            rates = []
            for _ in range(plan.runs):
                await bench.settle()
                rates.append(await postfix.relay(plan.postfix_messages, plan.postfix_sessions, timeout=300))
            pss, processes = postfix.pss_kib()
            nursery.cancel_scope.cancel()
    except Unavailable as exc:
        bench.report.note(f"Postfix baseline not run: {exc}")
        bench.report.data["baselines"]["postfix"] = {"unavailable": str(exc)}
        return
    finally:
        await postfix.stop()
    figure = summary(rates)
    bench.report.data["baselines"]["postfix"] = {"rate": figure, "messages": plan.postfix_messages,
                                                 "sessions": plan.postfix_sessions, "pss_mib": pss / 1024,
                                                 "processes": processes}
    bench.report.row(f"Postfix end to end ({plan.postfix_sessions} sessions)", f"{figure['median']:,.0f} msg/s",
                     spread=figure["spread"])


async def end_to_end(bench: Bench, *, label: str = "end to end A -> hub -> B", recipients: list[str] | None = None,
                     senders: list[str] | None = None, destinations: list[Relay] | None = None,
                     record: str = "end_to_end") -> dict:
    """Figure 2: ``e2e_messages`` posted at A over 100 streams; the rate is
    counted until the last one is readable at the destination(s)."""
    space, plan = bench.space, bench.plan
    destinations = destinations or [space.b]
    recipients = recipients or space.b.users[:1]
    rates, ingress_rates = [], []
    databases = {"relay A": space.a.state_dir / "relay.db", "hub": space.hub_db,
                 "relay B": space.b.state_dir / "relay.db"}
    await bench.settle()
    db_before = {name: db_bytes(path) for name, path in databases.items()}
    async with bench.reading(*destinations) as readers:
        for _ in range(plan.runs):
            await bench.settle()
            tag = bench.tag("e2e")
            start = time.perf_counter()
            result = await closed_loop(opener(Target.from_url(space.a.url), "h2"),
                                       post_to(space.a, recipients, tag, senders=senders),
                                       streams=100, connections=4, total=plan.e2e_messages, timeout=600)
            check_result(bench, label, result)
            expected = _expected_per_domain(recipients, plan.e2e_messages)
            for reader, relay in zip(readers, destinations, strict=True):
                if not await reader.wait_for(tag, expected.get(relay.domain, 0), timeout=600):
                    bench.report.note(f"{label}: only {len(reader.arrivals[tag])} of {expected[relay.domain]} "
                                      f"messages reached {relay.domain} within 600 s")
            last = max(max(r.arrivals[tag].values(), default=start) for r in readers)
            rates.append(result.accepted / (last - start))
            ingress_rates.append(result.accepted / result.elapsed if result.elapsed else 0)
    figure = {"rate": summary(rates), "ingress_during": summary(ingress_rates), "messages": plan.e2e_messages}
    bench.report.data["figures"][record] = figure
    if record == "end_to_end":
        postfix = median_of(bench.report.data["baselines"].get("postfix", {}).get("rate"))
        r = ratio(figure["rate"]["median"], postfix)
        figure["ratio_vs_postfix"] = r
        bench.report.row(label, f"{figure['rate']['median']:,.0f} msg/s", spread=figure["rate"]["spread"],
                         baseline="Postfix e2e", ratio=r, target=f">= {E2E_TARGET} x Postfix",
                         met=(r is not None and r >= E2E_TARGET) if postfix else None)
        growth = {name: (db_bytes(path) - db_before[name]) / (plan.runs * plan.e2e_messages)
                  for name, path in databases.items()}
        bench.report.data["figures"].setdefault("db_growth", {})["bytes_per_delivered_message"] = growth
        bench.report.row("database growth per message delivered: A / hub / B",
                         " / ".join(f"{v:,.0f}" for v in growth.values()) + " bytes")
    return figure


def _expected_per_domain(recipients: list[str], total: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for seq in range(total):
        domain = recipients[seq % len(recipients)].rpartition("@")[2]
        counts[domain] = counts.get(domain, 0) + 1
    return counts


async def latency(bench: Bench) -> None:
    """Figure 3a: POST at A -> event readable at B, at a steady 200 msg/s."""
    space, plan = bench.space, bench.plan
    p50s, p99s, maxes = [], [], []
    async with bench.reading(space.b) as (reader,):
        for _ in range(plan.runs):
            await bench.settle()
            tag = bench.tag("latency")
            result = await open_loop(opener(Target.from_url(space.a.url), "h2"),
                                     post_to(space.a, space.b.users[:1], tag),
                                     rate=plan.latency_rate, duration=plan.latency_seconds)
            check_result(bench, "latency", result)
            await reader.wait_for(tag, result.accepted, timeout=60)
            samples = delays_ms(result, reader.arrivals[tag])
            p50s.append(percentile(samples, 50))
            p99s.append(percentile(samples, 99))
            maxes.append(max(samples))
    figure = {"p50_ms": summary(p50s), "p99_ms": summary(p99s), "max_ms": summary(maxes),
              "rate": plan.latency_rate, "seconds": plan.latency_seconds}
    bench.report.data["figures"]["latency"] = figure
    bench.report.row(f"latency A -> B at {plan.latency_rate:g} msg/s, p50", f"{figure['p50_ms']['median']:.1f} ms",
                     spread=figure["p50_ms"]["spread"], target=f"<= {P50_TARGET_MS:g} ms",
                     met=figure["p50_ms"]["median"] <= P50_TARGET_MS)
    bench.report.row(f"latency A -> B at {plan.latency_rate:g} msg/s, p99", f"{figure['p99_ms']['median']:.1f} ms",
                     spread=figure["p99_ms"]["spread"], target=f"<= {P99_TARGET_MS:g} ms",
                     met=figure["p99_ms"]["median"] <= P99_TARGET_MS)


def delays_ms(result: LoadResult, arrivals: dict[int, float]) -> list[float]:
    return [(arrivals[seq] - sent) * 1000 for seq, sent in result.sent_at.items() if seq in arrivals]


async def urgent(bench: Bench) -> None:
    """Figure 3b: urgent p99 alone, then under a saturating normal background."""
    space, plan = bench.space, bench.plan
    target = Target.from_url(space.a.url)
    alone, loaded, background_in, background_out = [], [], [], []
    async with bench.reading(space.b) as (reader,):
        for _ in range(plan.runs):
            for with_background in (False, True):
                await bench.settle()
                tag, bg_tag = bench.tag("urgent"), bench.tag("background")
                urgent_post = post_to(space.a, space.b.users[:1], tag, priority="urgent")
                async with trio.open_nursery() as nursery:
                    if with_background:
                        # Background from a second sender, so per-sender order does not tie the two.
                        background = post_to(space.a, space.b.users[:1], bg_tag, senders=space.a.users[1:2])
                        bg: dict[str, LoadResult] = {}

                        async def run_background() -> None:
                            # B023: called in the nursery below, which ends within this iteration
                            bg["result"] = await closed_loop(opener(target, "h2"), background, streams=100,  # noqa: B023
                                                             connections=4, duration=plan.urgent_seconds + 1.0)

                        nursery.start_soon(run_background)
                        await trio.sleep(1.0)  # the background reaches its pace before urgent ones start
                    started = time.perf_counter()
                    result = await open_loop(opener(target, "h2"), urgent_post, rate=plan.urgent_rate,
                                             duration=plan.urgent_seconds, connections=1)
                    window = time.perf_counter() - started
                check_result(bench, "urgent", result)
                await reader.wait_for(tag, result.accepted, timeout=120)
                p99 = percentile(delays_ms(result, reader.arrivals[tag]), 99)
                if with_background:
                    loaded.append(p99)
                    background_in.append(bg["result"].rate)
                    arrived = [t for t in reader.arrivals[bg_tag].values() if started <= t <= started + window]
                    background_out.append(len(arrived) / window)
                else:
                    alone.append(p99)
    r = ratio(summary(loaded)["median"], summary(alone)["median"])
    figure = {"unloaded_p99_ms": summary(alone), "loaded_p99_ms": summary(loaded), "ratio": r,
              "background_accepted_per_s": summary(background_in),
              "background_delivered_per_s": summary(background_out), "urgent_rate": plan.urgent_rate}
    bench.report.data["figures"]["urgent"] = figure
    bench.report.row(f"urgent p99 alone ({plan.urgent_rate:g} msg/s)", f"{figure['unloaded_p99_ms']['median']:.1f} ms",
                     spread=figure["unloaded_p99_ms"]["spread"])
    bench.report.row("urgent p99 under normal background", f"{figure['loaded_p99_ms']['median']:.1f} ms",
                     spread=figure["loaded_p99_ms"]["spread"], baseline="urgent p99 alone", ratio=r,
                     target=f"<= {URGENT_TARGET:g} x alone", met=r is not None and r <= URGENT_TARGET)
    bench.report.row("  background during it: accepted / delivered at B",
                     f"{median_of(figure['background_accepted_per_s']):,.0f} / "
                     f"{median_of(figure['background_delivered_per_s']):,.0f} msg/s")


def check_result(bench: Bench, what: str, result: LoadResult) -> None:
    """Refusals and failures are reported, never folded into a rate."""
    if result.refused or result.failed:
        bench.report.note(f"{what}: {result.refused} refused {result.statuses or ''}, {result.failed} failed")

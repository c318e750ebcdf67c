"""Figure 7: how ingress and end-to-end rates change with users and domains.

*Users*: relays A and B are restarted with 1,000 users listed each, and
messages go from 1,000 senders to 1,000 recipients in turn, against the
same figures with one sender and one recipient (the demo's users).

*Domains*: extra relays join the space (certificates from the demo CA,
configs cloned from relay B, see `space.py`), and messages from A go to
each destination domain in turn, against one destination.  The full plan
uses 50 domains: 49 extra relay processes of ~35 MB each fit this
machine's memory; the quick plan uses fewer to stay within minutes.
"""

from __future__ import annotations

from .loadgen import Target, closed_loop, opener
from .plan import Bench
from .scenarios import check_result, end_to_end, post_to
from .stats import median_of, ratio, summary


async def _ingress_100(bench: Bench, recipients: list[str], senders: list[str] | None, what: str) -> dict:
    runs = []
    for _ in range(bench.plan.runs):
        await bench.settle()
        result = await closed_loop(opener(Target.from_url(bench.space.a.url), "h2"),
                                   post_to(bench.space.a, recipients, bench.tag(what), senders=senders),
                                   streams=100, connections=4, duration=bench.plan.duration,
                                   warmup=bench.plan.warmup)
        check_result(bench, what, result)
        runs.append(result.rate)
    return summary(runs)


def _rows(bench: Bench, what: str, one: str, many: str, ingress: dict, e2e: dict) -> None:
    figures = bench.report.data["figures"]
    base_ingress = median_of(figures.get("ingress", {}).get("h2", {}).get("100"))
    base_e2e = median_of(figures.get("end_to_end", {}).get("rate"))
    bench.report.row(f"scaling: ingress 100 streams, {many}", f"{ingress['median']:,.0f} msg/s",
                     spread=ingress["spread"], baseline=one, ratio=ratio(ingress["median"], base_ingress))
    bench.report.row(f"scaling: end to end, {many}", f"{e2e['rate']['median']:,.0f} msg/s",
                     spread=e2e["rate"]["spread"], baseline=one, ratio=ratio(e2e["rate"]["median"], base_e2e))


async def users(bench: Bench) -> None:
    space, count = bench.space, bench.plan.users
    senders = space.set_users(space.a, count)
    recipients = space.set_users(space.b, count)
    for relay in (space.a, space.b):
        await relay.daemon.stop()
    await space.start([space.a, space.b])
    ingress = await _ingress_100(bench, recipients, senders, "users-ingress")
    e2e = await end_to_end(bench, label=f"end to end, {count} users", recipients=recipients, senders=senders,
                           record="scaling_users_e2e")
    bench.report.data["figures"]["scaling_users"] = {"users": count, "ingress_100": ingress, "end_to_end": e2e}
    _rows(bench, "users", "1 user", f"{count:,} users", ingress, e2e)


async def domains(bench: Bench) -> None:
    space = bench.space
    destinations = [space.b, *space.extra]
    await space.start(space.extra, timeout=180)
    recipients = [relay.users[0] for relay in destinations]
    ingress = await _ingress_100(bench, recipients, None, "domains-ingress")
    e2e = await end_to_end(bench, label=f"end to end, {len(destinations)} domains", recipients=recipients,
                           destinations=destinations, record="scaling_domains_e2e")
    exited = [relay for relay in space.extra if not relay.daemon.running]
    for relay in exited:
        bench.report.note(f"extra relay {relay.domain} exited (code {relay.daemon.popen.returncode}): "
                          f"{relay.daemon.tail(3)}")
    rss = [relay.daemon.rss_kib() / 1024 for relay in space.extra if relay.daemon.running]
    bench.report.data["figures"]["scaling_domains"] = {
        "domains": len(destinations), "ingress_100": ingress, "end_to_end": e2e,
        "extra_relay_rss_mib": summary(rss)}
    _rows(bench, "domains", "1 domain", f"{len(destinations)} destination domains", ingress, e2e)

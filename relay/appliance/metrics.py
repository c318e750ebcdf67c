"""Prometheus metrics, liveness and readiness, on a listener of their own.

``[metrics] listen = "127.0.0.1:9108"`` turns it on.  Three routes:

  GET /metrics   the Prometheus text format, made by prometheus_client
  GET /healthz   200 as long as the event loop answers (alive: a liveness
                 probe restarts the relay when this fails); the body says
                 "degraded", with the reasons, while a lane gets no answers
                 from the hub (a restart would not help: the hub is the cause)
  GET /readyz    200 when the store is open, the uplink connected to the
                 hub and every lane getting answers, else 503 with the
                 reasons ("degraded" when only lanes are stalled): "messages
                 are accepted but do not leave" is what not ready means here

Each daemon has its own `CollectorRegistry` (the tests run several relays
in one process).  Counters the relay keeps anyway (the uplink's, the
webhooks') are read when scraped, by a collector; queue depths come from
one unit of work run per scrape, so that a scrape never reads SQLite on the
event loop's thread; the two latency histograms are fed as things happen
(commit latency from the store's writer thread, which prometheus_client
allows).  docs/operations.md lists every metric.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from relay import __version__
from relay.appliance.housekeeping import Housekeeping
from relay.appliance.operations import certificates, stall_reasons
from relay.appliance.uplink import Uplink, UplinkState
from relay.appliance.webhook import WebhookPusher
from relay.config.model import RelayConfig
from relay.core.priority import PRIORITIES
from relay.net.local_server import Request, Response
from relay.store import relay_admin
from relay.store.engine import Store, StoreUnavailable

# Group commits take milliseconds (one fsync); seconds mean a sick disk.
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# End-to-end delivery: sub-second when both relays are up, hours when a
# destination was offline.
DELIVERY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)


class RelayCounters:
    """The registry of one relay, with what its parts report as it
    happens.  Made before the parts, which are each given the method they
    call: the store `observe_commit`, the uplink `observe_delivery`, the
    local API `count_accepted`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        Info("eimis_relay_build", "The relay's version", registry=self.registry).info(
            {"version": __version__, "python": platform.python_version()})
        self.accepted = Counter("eimis_relay_messages_accepted", "Messages the local API answered 202 for",
                                ["priority"], registry=self.registry)
        self.commit_seconds = Histogram("eimis_relay_store_commit_seconds", "Time to commit one group of units",
                                        buckets=COMMIT_BUCKETS, registry=self.registry)
        self.delivery_seconds = Histogram(
            "eimis_relay_delivery_seconds", "From acceptance here to the destination relay's commit",
            ["priority"], buckets=DELIVERY_BUCKETS, registry=self.registry)
        for priority in PRIORITIES:  # every series exists from the start, at 0
            self.accepted.labels(priority)
            self.delivery_seconds.labels(priority)

    def count_accepted(self, priority: str) -> None:
        """A 202 to a submission.  (A retry with the same Idempotency-Key is
        answered 202 again, and counted again.)"""
        self.accepted.labels(priority).inc()

    def observe_commit(self, seconds: float) -> None:
        """A group committed (called on the store's writer thread, which prometheus_client allows)."""
        self.commit_seconds.observe(seconds)

    def observe_delivery(self, priority: str, seconds: float) -> None:
        """A destination relay committed a message sent from here, ``seconds`` after its acceptance."""
        self.delivery_seconds.labels(priority).observe(seconds)


class RelayMetrics:
    """The routes that serve one relay's registry; what the relay counts
    anyway is read from its parts at scrape time."""

    def __init__(self, counters: RelayCounters, config: Callable[[], RelayConfig], store: Store, uplink: Uplink,
                 webhooks: Callable[[], Iterable[WebhookPusher]], housekeeping: Housekeeping) -> None:
        self.config = config
        self.store = store
        self.uplink = uplink
        self.housekeeping = housekeeping
        self.registry = counters.registry
        self.registry.register(_RelayCollector(self, webhooks))
        # The queue figures of the last scrape, for the collector.
        self.queues: dict[str, Any] | None = None

    async def __call__(self, request: Request) -> Response:
        if request.method != "GET":
            return Response(405, b"GET only\n", [("allow", "GET"), ("content-type", "text/plain")])
        if request.path == "/metrics":
            try:
                self.queues = await self.store.read("queue_summary", relay_admin.queue_summary)
            except StoreUnavailable:
                pass  # the store cannot commit: the last figures read, and the rest, still tell a story
            return Response(200, generate_latest(self.registry), [("content-type", CONTENT_TYPE_LATEST)])
        if request.path == "/healthz":
            stalls = self.stalls()
            return Response.json(200, {"status": "alive", "health": "degraded" if stalls else "healthy",
                                       "reasons": stalls})
        if request.path == "/readyz":
            stalls = self.stalls()
            reasons = self.not_ready() + stalls
            status = "not ready" if len(reasons) > len(stalls) else "degraded" if stalls else "ready"
            return Response.json(503 if reasons else 200, {"ready": not reasons, "status": status,
                                                           "reasons": reasons})
        return Response(404, b"not found: /metrics, /healthz and /readyz are\n", [("content-type", "text/plain")])

    def not_ready(self) -> list[str]:
        reasons = []
        if not self.store.is_open:
            reasons.append("the store is closed")
        if self.uplink.state is not UplinkState.CONNECTED:
            reasons.append(f"the uplink to the hub is {self.uplink.state.value}")
        return reasons

    def stalls(self) -> list[str]:
        """The lanes that get no answers from the hub, in words."""
        return stall_reasons(self.uplink.stalls(), self.config().uplink.request_timeout, time.time())


class _RelayCollector:
    """Reads, at scrape time, what the relay counts anyway."""

    def __init__(self, metrics: RelayMetrics, webhooks: Callable[[], Iterable[WebhookPusher]]) -> None:
        self.metrics = metrics
        self.webhooks = webhooks

    def collect(self) -> Iterable[Metric]:
        uplink = self.metrics.uplink
        for what, help_text in [("sent", "Recipients the hub took"), ("refused", "Recipients the hub refused"),
                                ("delivered", "Recipients the destination relay committed"),
                                ("failed", "Recipients reported failed after the hub took them")]:
            family = CounterMetricFamily(f"eimis_relay_messages_{what}", help_text, labels=["priority"])
            for priority in PRIORITIES:
                family.add_metric([priority], uplink.counts[what, priority])
            yield family
        chores = self.metrics.housekeeping
        yield CounterMetricFamily("eimis_relay_messages_delayed",
                                  "Messages still not delivered after delay_warning (one delayed event each)",
                                  value=chores.delayed)
        yield CounterMetricFamily("eimis_relay_recipients_expired",
                                  "Recipients failed here because the time-to-live ran out", value=chores.expired)
        yield GaugeMetricFamily("eimis_relay_uplink_connected", "1 when connected to the hub",
                                value=int(uplink.state is UplinkState.CONNECTED))
        yield CounterMetricFamily("eimis_relay_uplink_reconnects", "Connection attempts after the first",
                                  value=max(0, uplink.attempts - 1))
        stalled = GaugeMetricFamily("eimis_relay_uplink_stalled",
                                    "1 while the hub leaves this lane's requests unanswered (degraded)",
                                    labels=["lane"])
        timeouts = CounterMetricFamily("eimis_relay_uplink_request_timeouts",
                                       "Requests the hub left unanswered past request_timeout", labels=["lane"])
        for progress in uplink.progress:
            stalled.add_metric([progress.lane], int(progress.stalled_since is not None))
            timeouts.add_metric([progress.lane], progress.timeouts)
        yield stalled
        yield timeouts
        failures = CounterMetricFamily("eimis_relay_webhook_failures", "Failed webhook delivery attempts",
                                       labels=["system"])
        for pusher in self.webhooks():
            failures.add_metric([pusher.system.name], pusher.failures)
        yield failures
        expiry = GaugeMetricFamily("eimis_relay_certificate_expiry_timestamp_seconds",
                                   "When a certificate expires (Unix time)", labels=["certificate"])
        for cert in certificates(self.metrics.config(), uplink.hub_cert_expires):
            expiry.add_metric([cert.name], cert.expires)
        yield expiry
        yield GaugeMetricFamily("eimis_relay_store_used_bytes", "Bytes in use in the store",
                                value=self.metrics.store.used_bytes)
        queues = self.metrics.queues
        if queues is None:
            return
        depth = GaugeMetricFamily("eimis_relay_outbound_queue", "Envelopes waiting for the hub",
                                  labels=["priority"])
        for priority in PRIORITIES:
            depth.add_metric([priority], queues["outbound"][priority])
        yield depth
        oldest = queues["oldest_queued_at"]
        yield GaugeMetricFamily("eimis_relay_oldest_queued_age_seconds", "Age of the oldest queued message",
                                value=0 if oldest is None else max(0.0, time.time() - oldest))
        unread = GaugeMetricFamily("eimis_relay_inbound_unread", "Messages received, not marked read",
                                   labels=["system"])
        for system in self.metrics.config().local_systems:
            unread.add_metric([system.name], queues["unread"].get(system.name, 0))
        yield unread

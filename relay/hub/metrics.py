"""The hub's Prometheus metrics, liveness and readiness, on a listener of their own.

``[metrics] listen = "127.0.0.1:9109"`` in hub.toml turns it on; the routes
are the relay's (`relay.appliance.metrics`):

  GET /metrics   the Prometheus text format, made by prometheus_client
  GET /healthz   200 as long as the event loop answers
  GET /readyz    200 when the store is open and the hub takes connections,
                 else 503 with the reasons

What happens is counted as it happens (`HubCounters`, handed to the hub
and to the store); what the hub holds (connections, the backlog per lane,
store size, certificate expiry) is read at scrape time, the backlog by one
read of the store per scrape.  docs/operations.md lists every metric.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from relay.config.model import HubConfig
from relay.core.priority import NORMAL, URGENT
from relay.hub.counters import HubCounters
from relay.hub.operations import certificate_expiry
from relay.hub.server import Hub
from relay.net.local_server import Request, Response
from relay.store import hub_queue
from relay.store.engine import Store, StoreUnavailable

LANES = {URGENT: "urgent", NORMAL: "normal"}


class HubMetrics:
    """The routes that serve one hub's registry."""

    def __init__(self, counters: HubCounters, config: Callable[[], HubConfig], store: Store, hub: Hub) -> None:
        self.config = config
        self.store = store
        self.hub = hub
        self.registry = counters.registry
        self.registry.register(_HubCollector(self))
        # The backlog of the last scrape, for the collector.
        self.backlog: dict[str, dict[int, int]] | None = None

    async def __call__(self, request: Request) -> Response:
        if request.method != "GET":
            return Response(405, b"GET only\n", [("allow", "GET"), ("content-type", "text/plain")])
        if request.path == "/metrics":
            try:
                self.backlog = await self.store.read("backlog", hub_queue.backlog)
            except StoreUnavailable:
                pass  # the last figures read, and the rest, still tell a story
            return Response(200, generate_latest(self.registry), [("content-type", CONTENT_TYPE_LATEST)])
        if request.path == "/healthz":
            return Response.json(200, {"status": "alive"})
        if request.path == "/readyz":
            reasons = self.not_ready()
            return Response.json(503 if reasons else 200, {"ready": not reasons, "reasons": reasons})
        return Response(404, b"not found: /metrics, /healthz and /readyz are\n", [("content-type", "text/plain")])

    def not_ready(self) -> list[str]:
        reasons = []
        if not self.store.is_open:
            reasons.append("the store is closed")
        if not self.hub.accepting:
            reasons.append("the hub is not taking connections (starting or stopping)")
        return reasons


class _HubCollector:
    """Reads, at scrape time, what the hub holds."""

    def __init__(self, metrics: HubMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        hub, gate = self.metrics.hub, self.metrics.hub.gate
        yield GaugeMetricFamily("eimis_hub_connections", "Authenticated relay connections",
                                value=gate.authenticated)
        yield GaugeMetricFamily("eimis_hub_connected_domains", "Domains with at least one connection",
                                value=len(gate.per_domain))
        yield GaugeMetricFamily("eimis_hub_handshakes_in_progress", "TLS handshakes in progress",
                                value=gate.handshakes)
        yield GaugeMetricFamily("eimis_hub_store_used_bytes", "Bytes in use in the store",
                                value=self.metrics.store.used_bytes)
        expiry = GaugeMetricFamily("eimis_hub_certificate_expiry_timestamp_seconds",
                                   "When the hub's certificate expires (Unix time)", labels=["certificate"])
        expires = certificate_expiry(self.metrics.config().cert_file)
        if expires is not None:
            expiry.add_metric(["hub"], expires)
        yield expiry
        if hub.last_sweep is not None:
            yield GaugeMetricFamily("eimis_hub_last_sweep_timestamp_seconds", "When the last sweep ended",
                                    value=hub.last_sweep)
        backlog = self.metrics.backlog
        if backlog is None:
            return
        lanes = GaugeMetricFamily("eimis_hub_inbox_backlog", "Items waiting for their destination relay",
                                  labels=["lane"])
        for lane, name in LANES.items():
            lanes.add_metric([name], sum(per_lane.get(lane, 0) for per_lane in backlog.values()))
        yield lanes
        yield GaugeMetricFamily("eimis_hub_domains_with_backlog", "Domains with items waiting",
                                value=len(backlog))

"""The parts of each daemon, built in one place.

A part is handed what it calls at construction, never wired up by an
attribute set afterwards, so the order below is the order of needs: the
metrics' counters exist before the store (which reports each commit to
them), the per-system event signals before everything that fires them,
the uplink before the local API (whose ``/healthz`` reports it), the
reloader before whatever asks for the configuration in force.  Running
the parts, and the order they start and stop in, is `relay.runtime.daemon`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from relay.appliance.housekeeping import Housekeeping
from relay.appliance.local_api import LocalApi, too_large
from relay.appliance.metrics import RelayCounters, RelayMetrics
from relay.appliance.operations import QueueTools, RelayOperations, StatusReporter
from relay.appliance.uplink import Uplink
from relay.config.model import HubConfig, RelayConfig, load_hub_config, load_relay_config
from relay.hub.counters import HubCounters
from relay.hub.metrics import HubMetrics
from relay.hub.operations import HubOperations
from relay.hub.server import Hub
from relay.net.admin_socket import AdminServer
from relay.net.local_server import HttpServer
from relay.net.wakeup import Signal, Signals
from relay.runtime.reload import (
    Reloader,
    WebhookSet,
    apply_log_level,
    hub_files,
    local_tls,
    prepare_hub,
    prepare_relay,
    record_reload,
    relay_files,
)
from relay.store.engine import Store

# The metrics listener takes GETs from a monitoring system, and few of them.
METRICS_MAX_BODY = 1024
METRICS_MAX_CONNECTIONS = 16


class RelayApp:
    """The relay's parts.  ``counters`` are the ones ``store`` already
    reports its commits to (`Store.open`'s ``on_commit``)."""

    def __init__(self, config: RelayConfig, store: Store, counters: RelayCounters, admin_socket: Path) -> None:
        self.store = store
        self.outbox_changed = Signal()
        self.events = Signals()
        local = config.local_api
        self.uplink = Uplink(config, store, self.outbox_changed, self.events.fire, counters.observe_delivery)
        self.api = LocalApi(config, store, self.outbox_changed, self.events,
                            uplink_state=lambda: self.uplink.state.value, on_accepted=counters.count_accepted)
        self.housekeeping = Housekeeping(store, config.delivery, self.events.fire)
        self.webhooks = WebhookSet(store, self.events.signal)
        self.reloader = Reloader(config, load=load_relay_config, prepare=prepare_relay, stage=self._stage,
                                 files=relay_files)
        current = self.current_config
        self.metrics = RelayMetrics(counters, current, store, self.uplink, lambda: self.webhooks.pushers,
                                    self.housekeeping)
        queue = QueueTools(store, lambda: current().delivery.message_ttl, on_requeued=self.outbox_changed.fire,
                           on_events=self.events.fire, retry_now=self.uplink.retry_now, in_flight=self.uplink.in_flight)
        operations = RelayOperations(current, store, self.uplink, queue, lambda: self.reloader.last)
        self.admin = AdminServer(admin_socket, operations.handlers())
        self.reporter = StatusReporter(current, store, self.uplink, self.outbox_changed, self.reloader.reloaded)
        self.api_server = HttpServer(self.api, max_body=local.max_body_bytes, too_large=too_large(local.max_body_bytes),
                                     tls=local_tls(config), max_connections=local.max_connections)
        self.metrics_server = HttpServer(self.metrics, max_body=METRICS_MAX_BODY,
                                         too_large=too_large(METRICS_MAX_BODY), max_connections=METRICS_MAX_CONNECTIONS)

    def current_config(self) -> RelayConfig:
        """The configuration in force: the last one a reload applied."""
        return self.reloader.config

    async def _stage(self, new: RelayConfig) -> Callable[[], None]:
        """Build what ``new`` needs and record the reload; return the swap
        of every part to it, which cannot fail (`relay.runtime.reload`)."""
        swap_uplink = self.uplink.stage_config(new)
        tls = local_tls(new)  # None only when the API serves HTTP, which a reload cannot change
        swap_webhooks = self.webhooks.stage(new.local_systems)
        await record_reload(self.store)

        def swap() -> None:
            swap_uplink()
            self.api.config = new
            self.housekeeping.delivery = new.delivery
            swap_webhooks()
            self.api_server.tls = tls
            apply_log_level(new)

        return swap


class HubApp:
    """The hub's parts: the hub itself, what reloads its configuration, its
    admin channel and its metrics.  ``counters`` are the ones ``store``
    already reports its commits to."""

    def __init__(self, config: HubConfig, store: Store, counters: HubCounters, admin_socket: Path) -> None:
        self.store = store
        self.hub = Hub(config, store, counters)
        self.reloader = Reloader(config, load=load_hub_config, prepare=prepare_hub, stage=self._stage,
                                 files=hub_files)
        current = self.current_config
        operations = HubOperations(current, store, self.hub, lambda: self.reloader.last)
        self.admin = AdminServer(admin_socket, operations.handlers())
        self.metrics = HubMetrics(counters, current, store, self.hub)
        self.metrics_server = HttpServer(self.metrics, max_body=METRICS_MAX_BODY,
                                         too_large=too_large(METRICS_MAX_BODY), max_connections=METRICS_MAX_CONNECTIONS)

    def current_config(self) -> HubConfig:
        """The configuration in force: the last one a reload applied."""
        return self.reloader.config

    async def _stage(self, new: HubConfig) -> Callable[[], None]:
        swap_hub = await self.hub.stage_config(new, lambda register: record_reload(self.store, register))

        def swap() -> None:
            swap_hub()
            apply_log_level(new)

        return swap

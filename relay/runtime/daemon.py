"""Wiring: the relay (`eimis-relay run`) and the hub (`eimis-relay hub`).

Start-up order matters for the guarantees: the state directory's lock is
taken (one process per store: `relay.net.admin_socket`), the store is opened (and
migrated) before any listener is bound, so nothing is ever acknowledged
without a place to keep it; ``READY=1`` goes to systemd once both are up.
Shutdown (SIGTERM, SIGINT) is the reverse: stop taking requests, GOAWAY on
HTTP/2 connections so in-flight requests finish (within ``shutdown_grace``),
then close the store after its last queued unit has committed.  SIGHUP
reloads the configuration in place (`relay.runtime.reload`).
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import trio

from relay.appliance.housekeeping import Housekeeping
from relay.appliance.local_api import LocalApi, too_large
from relay.appliance.metrics import RelayMetrics
from relay.appliance.operations import QueueTools, RelayOperations, StatusReporter, watch_own_certificate
from relay.appliance.uplink import Uplink
from relay.config.model import HubConfig, RelayConfig, load_hub_config, load_relay_config
from relay.hub.server import Hub
from relay.net.admin_socket import AdminServer, StateLock, socket_path
from relay.net.local_server import HttpServer
from relay.net.sdnotify import notify, watchdog
from relay.net.tls import local_server_context
from relay.net.wakeup import Signal
from relay.runtime.paths import state_dir
from relay.runtime.reload import (
    Reloader,
    WebhookSet,
    apply_log_level,
    hub_files,
    prepare_hub,
    prepare_relay,
    relay_files,
    reload_local_tls,
)
from relay.store import audit, hub_queue, relay_queue
from relay.store.engine import Store
from relay.store.sealing import KEY_FILE, KeyRing

log = logging.getLogger(__name__)

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The metrics listener takes GETs from a monitoring system, and few of them.
METRICS_MAX_BODY = 1024
METRICS_MAX_CONNECTIONS = 16


async def run_relay(config: RelayConfig, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the relay until SIGTERM or SIGINT.  Raises `StoreBusy` when
    another process holds the state directory (see `relay.net.admin_socket`)."""
    state = state_dir(config.state_dir)
    path = state / "relay.db"
    admin_socket = socket_path(config.domain, state)
    with StateLock(state) as lock:
        lock.acquire("eimis-relay run", admin_socket)
        async with Store.open(path, relay_queue.MIGRATIONS, _key_ring(path.parent)) as store:
            await _serve_relay(config, store, admin_socket, task_status)
    log.info("relay %s stopped", config.domain)


async def _serve_relay(config: RelayConfig, store: Store, admin_socket: Path,
                       task_status: trio.TaskStatus[list[trio.SocketListener]]) -> None:
    outbox_changed = Signal()
    uplink: Uplink | None = None
    api = LocalApi(config, store, outbox_changed, lambda: uplink.state.value)
    uplink = Uplink(config, store, outbox_changed, api.events_arrived)
    housekeeping = Housekeeping(store, config.delivery, api.events_arrived)
    local = config.local_api
    tls = None
    if local.tls_cert_file is not None:
        tls = local_server_context(local.tls_cert_file, local.tls_key_file, local.tls_client_ca_file)
    webhooks: WebhookSet | None = None

    async def apply(new: RelayConfig) -> None:
        uplink.swap_config(new)  # first: it raises before changing anything
        api.config = new
        housekeeping.delivery = new.delivery
        webhooks.apply(new.local_systems)
        reload_local_tls(tls, new)
        apply_log_level(new)
        await store.run_patiently("audit_reload", lambda c: audit.record(c, "admin", "reload", None, None, "applied",
                                                                   now=time.time()))

    reloader = Reloader(config, load=load_relay_config, prepare=prepare_relay, apply=apply, files=relay_files)

    def current() -> RelayConfig:
        return reloader.config

    metrics = RelayMetrics(current, store, uplink, lambda: webhooks.pushers, housekeeping)
    api.on_accepted = metrics.count_accepted
    server = HttpServer(api, max_body=local.max_body_bytes,
                        too_large=too_large(local.max_body_bytes), tls=tls, max_connections=local.max_connections)
    listeners = await trio.open_tcp_listeners(local.listen.port, host=local.listen.host)
    metrics_server = HttpServer(metrics, max_body=METRICS_MAX_BODY, too_large=too_large(METRICS_MAX_BODY),
                                max_connections=METRICS_MAX_CONNECTIONS)
    metrics_listeners = []
    if config.metrics.listen is not None:
        metrics_listeners = await trio.open_tcp_listeners(config.metrics.listen.port, host=config.metrics.listen.host)
    queue = QueueTools(store, lambda: current().delivery.message_ttl, on_requeued=outbox_changed.fire,
                       on_events=api.events_arrived, retry_now=uplink.retry_now, in_flight=uplink.in_flight)
    operations = RelayOperations(current, store, uplink, queue, lambda: reloader.last)
    reporter = StatusReporter(current, store, uplink, outbox_changed, reloader.reloaded)
    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
        async with trio.open_nursery(strict_exception_groups=True) as nursery:
            webhooks = WebhookSet(nursery, store, api.signal)
            await nursery.start(server.serve, listeners)
            if metrics_listeners:
                await nursery.start(metrics_server.serve, metrics_listeners)
            webhooks.apply(config.local_systems)
            nursery.start_soon(uplink.run)
            nursery.start_soon(housekeeping.run)
            nursery.start_soon(reloader.run)
            try:
                await nursery.start(AdminServer(admin_socket, operations.handlers()).serve)
            except OSError as exc:  # the relay works without it; `status` will say it cannot ask
                log.error("admin channel off: cannot listen on %s: %s", admin_socket, exc.strerror or exc)
            nursery.start_soon(reporter.run)
            nursery.start_soon(watchdog)
            log.info("relay %s: local API on %s, store %s%s", config.domain, _names(listeners), store.path,
                     f", metrics on {_names(metrics_listeners)}" if metrics_listeners else "")
            notify("READY=1", f"STATUS=relay {config.domain} serving; connecting to the hub")
            task_status.started(listeners)
            await _until_stopped(signals)
            grace = reloader.config.shutdown_grace
            async with trio.open_nursery(strict_exception_groups=True) as closing:
                closing.start_soon(server.shutdown, grace)
                closing.start_soon(uplink.aclose)
                if metrics_listeners:
                    closing.start_soon(metrics_server.shutdown, 0)
            nursery.cancel_scope.cancel()


async def run_hub(config: HubConfig, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED) -> None:
    path = state_dir(config.state_dir) / "hub.db"
    async with Store.open(path, hub_queue.MIGRATIONS, _key_ring(path.parent)) as store:
        hub = Hub(config, store)

        async def apply(new: HubConfig) -> None:
            await hub.swap_config(new)
            apply_log_level(new)
            await store.run_patiently("audit_reload",
                                      lambda c: audit.record(c, "admin", "reload", None, None, "applied",
                                                             now=time.time()))

        reloader = Reloader(config, load=load_hub_config, prepare=prepare_hub, apply=apply, files=hub_files)
        with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
            async with trio.open_nursery(strict_exception_groups=True) as nursery:
                listeners = await nursery.start(hub.serve)
                nursery.start_soon(reloader.run)
                nursery.start_soon(watch_own_certificate, "hub", lambda: reloader.config.cert_file, reloader.reloaded)
                nursery.start_soon(watchdog)
                notify("READY=1", f"STATUS=hub {config.name} serving")
                task_status.started(listeners)
                await _until_stopped(signals)
                await hub.shutdown()
                nursery.cancel_scope.cancel()
    log.info("hub %s stopped", config.name)


async def _until_stopped(signals) -> None:
    """Wait for SIGTERM or SIGINT, then tell systemd the stop has begun."""
    async for signum in signals:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        break
    notify("STOPPING=1")


def _key_ring(directory: Path) -> KeyRing:
    """The keys that seal message bodies in the store, made on first start."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return KeyRing.load_or_create(directory / KEY_FILE)


def _names(listeners: list[trio.SocketListener]) -> str:
    return ", ".join("%s:%s" % l.socket.getsockname()[:2] for l in listeners)

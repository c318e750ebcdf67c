"""Running the relay (`eimis-relay run`) and the hub (`eimis-relay hub`):
their parts are built by `relay.runtime.apps`, started and stopped here.

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
from pathlib import Path

import trio

from relay.appliance.metrics import RelayCounters
from relay.appliance.operations import watch_own_certificate
from relay.config.model import HubConfig, RelayConfig, cleartext_problems
from relay.config.reader import ConfigError
from relay.hub.counters import HubCounters
from relay.net.admin_socket import HUB_LOCK_NAME, HUB_SOCKET_NAME, StateLock, socket_path
from relay.net.sdnotify import notify, watchdog
from relay.runtime.apps import HubApp, RelayApp
from relay.runtime.paths import state_dir
from relay.store import hub_queue, relay_queue
from relay.store.engine import Store
from relay.store.sealing import KEY_FILE, KeyRing

log = logging.getLogger(__name__)

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def run_relay(
    config: RelayConfig, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the relay until SIGTERM or SIGINT.  Raises `StoreBusy` when
    another process holds the state directory (see `relay.net.admin_socket`),
    `ConfigError` for a cleartext listener on the network that the
    configuration does not allow (the loader refuses it already; this is
    for a configuration built otherwise)."""
    if problems := cleartext_problems(config):
        raise ConfigError(problems)
    state = state_dir(config.state_dir)
    path = state / "relay.db"
    admin_socket = socket_path(config.domain, state)
    counters = RelayCounters()
    with StateLock(state) as lock:
        lock.acquire("eimis-relay run", admin_socket)
        async with Store.open(path, relay_queue.MIGRATIONS, _key_ring(path.parent),
                              on_commit=counters.observe_commit) as store:
            await _serve_relay(config, RelayApp(config, store, counters, admin_socket), task_status)
    log.info("relay %s stopped", config.domain)


async def _serve_relay(config: RelayConfig, app: RelayApp,
                       task_status: trio.TaskStatus[list[trio.SocketListener]]) -> None:
    local = config.local_api
    listeners = await trio.open_tcp_listeners(local.listen.port, host=local.listen.host)
    metrics_listeners = []
    if config.metrics.listen is not None:
        metrics_listeners = await trio.open_tcp_listeners(config.metrics.listen.port, host=config.metrics.listen.host)
    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
        async with trio.open_nursery(strict_exception_groups=True) as nursery:
            await nursery.start(app.webhooks.run)
            await nursery.start(app.api_server.serve, listeners)
            if metrics_listeners:
                await nursery.start(app.metrics_server.serve, metrics_listeners)
            app.webhooks.stage(config.local_systems)()
            nursery.start_soon(app.uplink.run)
            nursery.start_soon(app.housekeeping.run)
            await nursery.start(app.reloader.run)  # SIGHUP is handled before READY
            try:
                await nursery.start(app.admin.serve)
            except OSError as exc:  # the relay works without it; `status` will say it cannot ask
                log.error("admin channel off: cannot listen on %s: %s", app.admin.path, exc.strerror or exc)
            nursery.start_soon(app.reporter.run)
            nursery.start_soon(watchdog)
            log.info("relay %s: local API on %s, store %s%s", config.domain, _names(listeners), app.store.path,
                     f", metrics on {_names(metrics_listeners)}" if metrics_listeners else "")
            notify("READY=1", f"STATUS=relay {config.domain} serving; connecting to the hub")
            task_status.started(listeners)
            await _until_stopped(signals)
            grace = app.current_config().shutdown_grace
            async with trio.open_nursery(strict_exception_groups=True) as closing:
                closing.start_soon(app.api_server.shutdown, grace)
                closing.start_soon(app.uplink.aclose)
                if metrics_listeners:
                    closing.start_soon(app.metrics_server.shutdown, 0)
            nursery.cancel_scope.cancel()


async def run_hub(
    config: HubConfig, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the hub until SIGTERM or SIGINT.  Raises `StoreBusy` when another
    process holds its state directory."""
    state = state_dir(config.state_dir)
    path = state / "hub.db"
    admin_socket = socket_path(config.name, state, HUB_SOCKET_NAME)
    counters = HubCounters()
    with StateLock(state, HUB_LOCK_NAME) as lock:
        lock.acquire("eimis-relay hub", admin_socket)
        async with Store.open(path, hub_queue.MIGRATIONS, _key_ring(state),
                              on_commit=counters.observe_commit) as store:
            await _serve_hub(config, HubApp(config, store, counters, admin_socket), task_status)
    log.info("hub %s stopped", config.name)


async def _serve_hub(config: HubConfig, app: HubApp,
                     task_status: trio.TaskStatus[list[trio.SocketListener]]) -> None:
    metrics_listeners = []
    if config.metrics.listen is not None:
        metrics_listeners = await trio.open_tcp_listeners(config.metrics.listen.port, host=config.metrics.listen.host)
    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
        async with trio.open_nursery(strict_exception_groups=True) as nursery:
            await nursery.start(app.reloader.run)  # SIGHUP is handled before READY
            listeners = await nursery.start(app.hub.serve)
            if metrics_listeners:
                await nursery.start(app.metrics_server.serve, metrics_listeners)
            try:
                await nursery.start(app.admin.serve)
            except OSError as exc:  # the hub works without it; `status` will say it cannot ask
                log.error("admin channel off: cannot listen on %s: %s", app.admin.path, exc.strerror or exc)
            nursery.start_soon(watch_own_certificate, "hub", lambda: app.reloader.config.cert_file,
                               app.reloader.reloaded)
            nursery.start_soon(watchdog)
            if metrics_listeners:
                log.info("hub %s: metrics on %s", config.name, _names(metrics_listeners))
            notify("READY=1", f"STATUS=hub {config.name} serving")
            task_status.started(listeners)
            await _until_stopped(signals)
            await app.hub.shutdown()  # stops accepting first, then GOAWAY, then the drain
            if metrics_listeners:
                await app.metrics_server.shutdown(0)
            nursery.cancel_scope.cancel()


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
    return ", ".join("{}:{}".format(*listener.socket.getsockname()[:2]) for listener in listeners)

"""Wiring: the relay (`eimis-relay run`) and the hub (`eimis-relay hub`).

Start-up order matters for the guarantees: the store is opened (and
migrated) before any listener is bound, so nothing is ever acknowledged
without a place to keep it; ``READY=1`` goes to systemd once both are up.
Shutdown (SIGTERM, SIGINT) is the reverse: stop taking requests, GOAWAY on
HTTP/2 connections so in-flight requests finish, then close the store after
its last queued unit has committed.
"""

from __future__ import annotations

import logging
import signal

import trio

from . import hub_store, relay_store
from .config import HubConfig, RelayConfig
from .http_server import HttpServer
from .housekeeping import Housekeeping
from .hub import Hub
from .local_api import LocalApi, too_large
from .paths import state_dir
from .sdnotify import notify, watchdog
from .store import Store
from .tls import local_server_context
from .uplink import Uplink
from .wakeup import Signal
from .webhook import WebhookPusher

log = logging.getLogger(__name__)

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# In-flight local requests get this long to finish on shutdown.
SHUTDOWN_GRACE = 10.0


async def run_relay(config: RelayConfig, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED) -> None:
    path = state_dir(config.state_dir) / "relay.db"
    async with Store.open(path, relay_store.MIGRATIONS) as store:
        outbox_changed = Signal()
        uplink: Uplink | None = None
        api = LocalApi(config, store, outbox_changed, lambda: uplink.state.value)
        uplink = Uplink(config, store, outbox_changed, api.events_arrived)
        local = config.local_api
        tls = None
        if local.tls_cert_file is not None:
            tls = local_server_context(local.tls_cert_file, local.tls_key_file, local.tls_client_ca_file)
        server = HttpServer(api, max_body=local.max_body_bytes, too_large=too_large(local.max_body_bytes),
                            tls=tls, max_connections=local.max_connections)
        listeners = await trio.open_tcp_listeners(local.listen.port, host=local.listen.host)
        with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
            async with trio.open_nursery(strict_exception_groups=True) as nursery:
                await nursery.start(server.serve, listeners)
                nursery.start_soon(uplink.run)
                nursery.start_soon(Housekeeping(store, config.delivery, api.events_arrived).run)
                for system in config.local_systems:
                    if system.webhook_url is not None:
                        nursery.start_soon(WebhookPusher(system, store, api.signal(system.name)).run)
                nursery.start_soon(watchdog)
                log.info("relay %s: local API on %s, store %s", config.domain, _names(listeners), path)
                notify("READY=1", f"STATUS=relay {config.domain} serving")
                task_status.started(listeners)
                async for signum in signals:
                    log.info("received %s: shutting down", signal.Signals(signum).name)
                    break
                notify("STOPPING=1")
                async with trio.open_nursery(strict_exception_groups=True) as closing:
                    closing.start_soon(server.shutdown, SHUTDOWN_GRACE)
                    closing.start_soon(uplink.aclose)
                nursery.cancel_scope.cancel()
    log.info("relay %s stopped", config.domain)


async def run_hub(config: HubConfig, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED) -> None:
    path = state_dir(config.state_dir) / "hub.db"
    async with Store.open(path, hub_store.MIGRATIONS) as store:
        hub = Hub(config, store)
        with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
            async with trio.open_nursery(strict_exception_groups=True) as nursery:
                listeners = await nursery.start(hub.serve)
                nursery.start_soon(watchdog)
                notify("READY=1", f"STATUS=hub {config.name} serving")
                task_status.started(listeners)
                async for signum in signals:
                    log.info("received %s: shutting down", signal.Signals(signum).name)
                    break
                notify("STOPPING=1")
                await hub.shutdown()
                nursery.cancel_scope.cancel()
    log.info("hub %s stopped", config.name)


def _names(listeners: list[trio.SocketListener]) -> str:
    return ", ".join("%s:%s" % l.socket.getsockname()[:2] for l in listeners)

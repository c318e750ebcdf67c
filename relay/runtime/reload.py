"""Reloading a running daemon: SIGHUP, and renewed certificate files.

Theory of operation
-------------------
Nothing restarts.  A `Reloader` reads the configuration file again, checks
everything it can before touching anything (the file itself, each
certificate against its key, CA and name, every TLS context it will need),
and only then hands the new configuration to the parts, each of which swaps
it in: the uplink (which rolls its connection over when its certificate or
the way to the hub changed), the local API (tokens, users), the local API's
TLS certificate (reloaded into the live context), housekeeping, the
webhooks (started, changed or stopped), the log level.  Queued work is in
the store and never depends on the configuration object, so nothing queued
is dropped.  If any check fails the old configuration stays in force, every
error is logged, and ``eimis-relay status`` shows them.

The relay's domain and ``state_dir`` cannot change under a running
daemon: a reload that changes them is refused.  Listener settings
(``[local_api].listen``, ``[metrics].listen``, the hub's ``listen``...)
need a restart too: a change there is logged as such and the running value
is kept, while the rest is applied.

Certificate files are also watched (`WATCH_INTERVAL`): a renewed file is
picked up by itself, once it has stopped changing for one interval, so that
a certificate and its key written one after the other are read as a pair.
"""

from __future__ import annotations

import logging
import signal
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, Generic, TypeVar

import trio

from relay.appliance.webhook import WebhookPusher
from relay.config.model import HubConfig, LocalSystem, RelayConfig
from relay.config.reader import ConfigError
from relay.config.stamps import files_stamp
from relay.core.errors import describe_error
from relay.net.tls import hub_server_context, local_server_context, relay_client_context
from relay.net.wakeup import Signal
from relay.pki import identity
from relay.store.engine import Store

log = logging.getLogger(__name__)

# How often watched files are looked at: a few stat() calls, and a renewed
# certificate in use within seconds.
WATCH_INTERVAL = 2.0

C = TypeVar("C", RelayConfig, HubConfig)


class ReloadRefused(Exception):
    """The new configuration cannot be used; ``problems`` says why, one per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class Reloader(Generic[C]):
    """Reloads ``config`` on SIGHUP and when a file of ``files(config)``
    changes; `prepare` checks a new configuration (raising `ConfigError` or
    `ReloadRefused`), `apply` swaps it in."""

    def __init__(self, config: C, *, load: Callable[[Path], C], prepare: Callable[[C, C], C],
                 apply: Callable[[C], Awaitable[None]], files: Callable[[C], Iterable[Path | None]]) -> None:
        self.config: C = config
        self._load: Callable[[Path], C] = load
        self._prepare: Callable[[C, C], C] = prepare
        self._apply: Callable[[C], Awaitable[None]] = apply
        self._files: Callable[[C], Iterable[Path | None]] = files
        self.reloaded = Signal()
        self.last: dict[str, Any] = {"at": None, "trigger": None, "ok": None, "errors": []}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reload on SIGHUP and on changed files; started once SIGHUP is
        handled, so that a daemon that says READY only after this is never
        killed by a reload (SIGHUP's default action ends the process)."""
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            async with trio.open_nursery(strict_exception_groups=True) as nursery:
                nursery.start_soon(self._on_sighup, signals)
                nursery.start_soon(self._watch_files)
                task_status.started()

    async def _on_sighup(self, signals) -> None:
        async for _ in signals:
            await self.reload("SIGHUP")

    async def _watch_files(self) -> None:
        applied = seen = self._stamp()
        while True:
            await trio.sleep(WATCH_INTERVAL)
            stamp = self._stamp()
            if stamp == applied or stamp != seen:  # unchanged, or still being written
                seen = stamp
                continue
            await self.reload("a certificate file changed on disk")
            applied = seen = self._stamp()

    def _stamp(self) -> tuple:
        return files_stamp(self._files(self.config))

    async def reload(self, trigger: str) -> bool:
        """Load, check and apply the configuration file; True when applied."""
        log.info("reloading %s (%s)", self.config.path, trigger)
        self.last = {"at": time.time(), "trigger": trigger, "ok": False, "errors": []}
        try:
            new = self._prepare(self.config, self._load(self.config.path))
        except (ConfigError, ReloadRefused) as exc:
            self.last["errors"] = exc.problems
            for problem in exc.problems:
                log.error("reload refused: %s", problem)
            log.error("reload refused: %d problem(s); the previous configuration stays in force", len(exc.problems))
            return False
        try:
            await self._apply(new)
        except (OSError, ssl.SSLError, ValueError) as exc:  # a file changed again since the checks
            self.last["errors"] = [describe_error(exc)]
            log.error("reload failed while applying (%s); it is tried again when the files change",
                      describe_error(exc))
            return False
        self.config = new
        self.last["ok"] = True
        self.reloaded.fire()
        log.info("reloaded %s", new.path)
        return True


# -- the relay ---------------------------------------------------------------------


def relay_files(config: RelayConfig) -> list[Path | None]:
    up, local = config.uplink, config.local_api
    return [up.cert_file, up.key_file, up.ca_file, *up.tls.crl_files, local.tls_cert_file, local.tls_key_file]


def prepare_relay(old: RelayConfig, new: RelayConfig) -> RelayConfig:
    """Check ``new`` in full; return it, with what needs a restart kept from ``old``."""
    problems = [f.message for f in identity.check_identity(new.uplink.cert_file, new.uplink.key_file,
                                                           new.uplink.ca_file, new.domain) if f.level == "error"]
    up, local = new.uplink, new.local_api
    problems += _loads(lambda: relay_client_context(up.cert_file, up.key_file, up.ca_file, up.tls), "[uplink]")
    if local.tls_cert_file is not None:
        cert_file, key_file = local.tls_cert_file, local.tls_key_file
        assert key_file is not None  # the config requires both
        problems += _loads(lambda: local_server_context(cert_file, key_file, local.tls_client_ca_file), "[local_api]")
    for key, before, after in [("[relay].domain", old.domain, new.domain),
                               ("[relay].state_dir", old.state_dir, new.state_dir)]:
        if before != after:
            problems.append(f"{key} cannot change under a running relay: restart it to use the new value")
    if problems:
        raise ReloadRefused(problems)
    def fixed(config: RelayConfig) -> object:  # what of the local API a reload cannot change
        return replace(config.local_api, tls_cert_file=None, tls_key_file=None), config.local_api.tls_cert_file is None

    if not _restart_only({"[local_api] listen, limits or TLS": (fixed(old), fixed(new)),
                          "[metrics].listen": (old.metrics, new.metrics)}):
        return new
    local = old.local_api
    if local.tls_cert_file is not None:  # and so is the new one: its files are reloaded
        local = replace(local, tls_cert_file=new.local_api.tls_cert_file, tls_key_file=new.local_api.tls_key_file)
    return replace(new, local_api=local, metrics=old.metrics)


def _loads(build: Callable[[], ssl.SSLContext], where: str) -> list[str]:
    try:
        build()
    except (OSError, ssl.SSLError, ValueError) as exc:
        return [f"{where}: the TLS certificate, key or CA do not load: {describe_error(exc)}"]
    return []


def _restart_only(fields: dict[str, tuple[Any, Any]]) -> list[str]:
    changed = [name for name, (before, after) in fields.items() if before != after]
    for name in changed:
        log.warning("reload: %s changed, which takes a restart; the running value is kept until then", name)
    return changed


def reload_local_tls(context: ssl.SSLContext | None, config: RelayConfig) -> None:
    """Put a renewed local API certificate into the live context: every
    handshake from now on presents it, connections open stay as they are.
    (`prepare_relay` has loaded the pair once already, so this cannot
    leave the context half-changed.)"""
    local = config.local_api
    if context is not None and local.tls_cert_file is not None:
        context.load_cert_chain(local.tls_cert_file, local.tls_key_file)


def apply_log_level(config: RelayConfig | HubConfig) -> None:
    logging.getLogger().setLevel(config.log_level.upper())


class WebhookSet:
    """The webhook pushers of the local systems that have a webhook_url:
    one task each in `run`'s nursery, started, updated in place or stopped
    as the configuration says (`apply`, once `run` has started)."""

    def __init__(self, store: Store, signal_of: Callable[[str], Signal]) -> None:
        self._store = store
        self._signal_of = signal_of
        self._nursery: trio.Nursery | None = None
        self._running: dict[str, tuple[WebhookPusher, trio.CancelScope]] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery(strict_exception_groups=True) as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    @property
    def pushers(self) -> list[WebhookPusher]:
        return [pusher for pusher, _ in self._running.values()]

    def apply(self, systems: Iterable[LocalSystem]) -> None:
        if self._nursery is None:
            raise RuntimeError("WebhookSet.apply before run has started")
        wanted = {s.name: s for s in systems if s.webhook_url is not None}
        for name in set(self._running) - set(wanted):
            self._running.pop(name)[1].cancel()
            log.info("webhook of %s stopped", name)
        for name, system in wanted.items():
            if name in self._running:
                self._running[name][0].system = system  # its next attempt uses the new URL, secret, timeout
            else:
                pusher = WebhookPusher(system, self._store, self._signal_of(name))
                scope = trio.CancelScope()
                self._running[name] = (pusher, scope)
                self._nursery.start_soon(_run_in, scope, pusher.run)


async def _run_in(scope: trio.CancelScope, run: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await run()


# -- the hub -----------------------------------------------------------------------


def hub_files(config: HubConfig) -> list[Path | None]:
    return [config.cert_file, config.key_file, config.ca_file, *config.tls.crl_files]


def prepare_hub(old: HubConfig, new: HubConfig) -> HubConfig:
    problems = [f.message for f in identity.check_identity(new.cert_file, new.key_file, new.ca_file, new.name)
                if f.level == "error"]
    problems += _loads(lambda: hub_server_context(new.cert_file, new.key_file, new.ca_file, new.tls), "[hub]")
    if problems:
        raise ReloadRefused(problems)
    if _restart_only({"[hub].listen": (old.listen, new.listen),
                      "[hub].state_dir": (old.state_dir, new.state_dir),
                      "[metrics].listen": (old.metrics, new.metrics)}):
        return replace(new, listen=old.listen, state_dir=old.state_dir, metrics=old.metrics)
    return new

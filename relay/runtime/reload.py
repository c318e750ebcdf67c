"""Reloading a running daemon: SIGHUP, and renewed certificate files.

Theory of operation
-------------------
Nothing restarts, and a reload is all or nothing.  A `Reloader` reads the
configuration file again and checks it (`prepare`: the file itself, each
certificate against its key, CA and name), then *stages* it: everything
the new configuration needs is built while the old one stays in force
(the uplink's TLS context, the local API's new TLS context, the webhook
pushers of new systems) and the reload is recorded in the audit trail.
Only then comes the swap, which is plain assignments with no await in
between: the uplink (which rolls its connection over when its certificate
or the way to the hub changed), the local API (tokens, users, limits),
the local API's TLS context (new handshakes use the new one, connections
open stay as they are), housekeeping, the webhooks (started, changed or
stopped), the log level.  A swap cannot fail half-way, so either every
part runs the new configuration or none does: when a check or a build
fails (a file rewritten between the check and the build, a store that
cannot record the reload) nothing has changed, every problem is logged,
and ``eimis-relay status`` shows them with the old configuration kept.
Queued work is in the store and never depends on the configuration
object, so nothing queued is dropped.  One reload runs at a time.

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
import sqlite3
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
from relay.runtime.permissions import exposed_secrets
from relay.store import audit
from relay.store.engine import Store, StoreUnavailable

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
    `ReloadRefused`), `stage` builds what it needs and returns the swap to
    it, which must not fail (see the module docstring)."""

    def __init__(self, config: C, *, load: Callable[[Path], C], prepare: Callable[[C, C], C],
                 stage: Callable[[C], Awaitable[Callable[[], None]]],
                 files: Callable[[C], Iterable[Path | None]]) -> None:
        self.config: C = config
        self._load: Callable[[Path], C] = load
        self._prepare: Callable[[C, C], C] = prepare
        self._stage: Callable[[C], Awaitable[Callable[[], None]]] = stage
        self._files: Callable[[C], Iterable[Path | None]] = files
        self._one_at_a_time = trio.Lock()
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
        """Load, check, stage and swap in the configuration file; True when
        applied, False when the configuration in force stays, unchanged."""
        async with self._one_at_a_time:
            log.info("reloading %s (%s)", self.config.path, trigger)
            self.last = {"at": time.time(), "trigger": trigger, "ok": None, "errors": []}
            try:
                new = self._prepare(self.config, self._load(self.config.path))
                swap = await self._stage(new)
            except (ConfigError, ReloadRefused) as exc:
                problems = exc.problems
            except (OSError, ssl.SSLError, ValueError) as exc:  # a file changed again since the checks
                problems = [f"a file changed while the reload read it ({describe_error(exc)}); "
                            "it is tried again when the files change"]
            except StoreUnavailable as exc:
                problems = [f"the reload cannot be recorded in the audit trail ({exc})"]
            else:
                swap()
                self.config = new
                self.last["ok"] = True
                self.reloaded.fire()
                log.info("reloaded %s", new.path)
                return True
            self.last.update(ok=False, errors=problems)
            for problem in problems:
                log.error("reload refused: %s", problem)
            log.error("reload refused: %d problem(s); the previous configuration stays in force, in every part",
                      len(problems))
            return False


async def record_reload(store: Store, record: Callable[[sqlite3.Connection], Any] | None = None) -> Any:
    """Write the audit record of a reload (with ``record``'s writes, in the
    same transaction): the last step of staging that can fail.  Shielded,
    so that a reload once recorded is swapped in (the swap follows with no
    await in between); raises `StoreUnavailable` when it cannot commit."""

    def unit(conn: sqlite3.Connection) -> object:
        audit.record(conn, "admin", "reload", None, None, "applied", now=time.time())
        return record(conn) if record is not None else None

    with trio.CancelScope(shield=True):
        return await store.run("audit_reload", unit)


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
    problems += exposed_secrets(new)  # as at the start: a key others can read may have leaked
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


def local_tls(config: RelayConfig) -> ssl.SSLContext | None:
    """A new TLS context for the local API, or None when it serves HTTP.

    A reload swaps the new context in whole rather than loading the new
    pair into the live one, which a failure between the certificate and
    the key would leave half-changed (every handshake then failing)."""
    local = config.local_api
    if local.tls_cert_file is None:
        return None
    assert local.tls_key_file is not None  # the config requires both
    return local_server_context(local.tls_cert_file, local.tls_key_file, local.tls_client_ca_file)


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

    def stage(self, systems: Iterable[LocalSystem]) -> Callable[[], None]:
        """Build the pushers of the systems that gain a webhook; return the
        swap that starts, changes and stops them as ``systems`` says (once
        `run` has started), which cannot fail."""
        if self._nursery is None:
            raise RuntimeError("WebhookSet.stage before run has started")
        nursery = self._nursery
        wanted = {s.name: s for s in systems if s.webhook_url is not None}
        added = {name: WebhookPusher(system, self._store, self._signal_of(name))
                 for name, system in wanted.items() if name not in self._running}

        def swap() -> None:
            for name in set(self._running) - set(wanted):
                self._running.pop(name)[1].cancel()
                log.info("webhook of %s stopped", name)
            for name, (pusher, _) in self._running.items():
                pusher.system = wanted[name]  # its next attempt uses the new URL, secret, timeout
            for name, pusher in added.items():
                scope = trio.CancelScope()
                self._running[name] = (pusher, scope)
                nursery.start_soon(_run_in, scope, pusher.run)

        return swap


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
    problems += exposed_secrets(new)
    if problems:
        raise ReloadRefused(problems)
    if _restart_only({"[hub].listen": (old.listen, new.listen),
                      "[hub].state_dir": (old.state_dir, new.state_dir),
                      "[metrics].listen": (old.metrics, new.metrics)}):
        return replace(new, listen=old.listen, state_dir=old.state_dir, metrics=old.metrics)
    return new

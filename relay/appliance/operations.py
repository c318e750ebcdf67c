"""What the operations tools see of a running relay, and what they may do to it.

Theory of operation
-------------------
`RelayOperations` lives in the daemon, next to the uplink, the local API
and the store, and is what the admin channel (`relay.net.admin_socket`) serves:

* ``status``: one snapshot (version, uplink state and since when, queue
  depths, oldest queued message, certificates) plus its assessment: the
  *problems* that make the relay unhealthy (the exit code of ``eimis-relay
  status``) and the *warnings* that do not.  ``health`` sums them up:
  "healthy", "degraded" (connected, but a lane gets no answers from the
  hub: `stall_reasons`) or "unhealthy".
* ``queue.*``: `QueueTools`, a thin layer over `relay_store`'s units.  The
  same class serves a command that works on the store directly when no
  daemon runs (it then holds the state directory's lock).

Two tasks run beside the relay: `StatusReporter` sends systemd a
``STATUS=`` line whenever what it says changes (uplink state, queue depth;
at most once a second), and `CertificateWatch` warns in the log at 30, 7
and 1 day(s) before the relay's, the local API's or the hub's certificate
expires.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives.serialization import Encoding

from relay import __version__
from relay.appliance.uplink import Uplink, UplinkState
from relay.config.model import RelayConfig, cleartext_listeners
from relay.core import timeformat
from relay.core.errors import describe_error
from relay.core.timeformat import span
from relay.net.admin_socket import AdminError, Handler
from relay.net.sdnotify import notify
from relay.net.wakeup import Signal
from relay.pki import identity
from relay.store import relay_admin, relay_queue
from relay.store.engine import Store, StoreUnavailable

log = logging.getLogger(__name__)

# Certificates: a warning in the log when this many days are left, once each.
WARN_DAYS = (30, 7, 1)
# ...and a problem for `status` (exit code 1) from this many days on.
UNHEALTHY_DAYS = 7
CERT_CHECK_INTERVAL = 3600.0
# STATUS= lines: the queue is looked at this often when nothing wakes the
# reporter, and at most once per STATUS_MIN_INTERVAL when things do.
STATUS_REFRESH = 5.0
STATUS_MIN_INTERVAL = 1.0
# `queue list` shows this many messages unless told otherwise.
DEFAULT_LIMIT = 100


class QueueTools:
    """``eimis-relay queue``: list, show, retry and purge sent messages.

    ``on_requeued`` is told when retried envelopes are back in the outbox,
    ``on_events`` which local systems got a notice, ``retry_now`` cuts the
    uplink's wait short and ``in_flight`` names the messages of the
    transaction on the wire: the daemon's; a command working on the store
    directly leaves the defaults."""

    def __init__(
        self,
        store: Store,
        message_ttl: Callable[[], float],
        *,
        on_requeued: Callable[[], None] = lambda: None,
        on_events: Callable[[Iterable[str]], None] = lambda systems: None,
        retry_now: Callable[[], None] = lambda: None,
        in_flight: Callable[[], set[str]] = set,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.clock = clock
        self._ttl = message_ttl
        self._on_requeued, self._on_events = on_requeued, on_events
        self._retry_now, self._in_flight = retry_now, in_flight

    async def list(self, args: dict[str, Any]) -> list[dict]:
        state, to, limit = args.get("state"), args.get("to"), int(args.get("limit") or DEFAULT_LIMIT)
        if state not in (None, *relay_admin.QUEUE_STATES):
            raise AdminError(f"--state: expected one of {', '.join(relay_admin.QUEUE_STATES)}")
        return await self.store.run("queue_list", lambda c: relay_admin.queue_messages(c, state, to, limit))

    async def show(self, args: dict[str, Any]) -> dict:
        ident, body = str(args.get("id")), bool(args.get("body"))
        found = await self.store.run("queue_show", lambda c: relay_admin.queue_message(c, ident, body))
        if found is None:
            raise AdminError(f"no message {ident} was sent from this relay (or it was forgotten after the retention)")
        found["in_flight"] = self._is_in_flight(ident)
        return found

    async def retry(self, args: dict[str, Any]) -> dict[str, str]:
        idents = None if args.get("all_failed") else [str(args.get("id"))]
        ttl, now = self._ttl(), self.clock()
        results = await self.store.run("queue_retry", lambda c: relay_admin.retry_failed(c, idents, ttl, now))
        if relay_admin.RETRIED in results.values():
            self._on_requeued()
        if idents is not None and results.get(idents[0]) == "no failed recipient":
            queued = await self.store.run("queue_show", lambda c: relay_admin.queue_message(c, idents[0], False))
            if queued and "queued" in (r["status"] for r in queued["recipients"].values()):
                results[idents[0]] = "queued: the relay dials the hub now rather than after its backoff"
        self._retry_now()
        return results

    async def purge(self, args: dict[str, Any]) -> dict[str, Any]:
        ident, now = str(args.get("id")), self.clock()
        outcome = await self.store.run("queue_purge", lambda c: relay_admin.purge(c, ident, now=now))
        if outcome is None:
            raise AdminError(f"no message {ident} was sent from this relay")
        purged, notified = outcome
        self._on_events(notified)
        return {"id": ident, "purged": purged, "in_flight": self._is_in_flight(ident)}

    def _is_in_flight(self, ident: str) -> bool:
        return ident in {relay_queue.message_id_of(envelope) for envelope in self._in_flight()}


@dataclass
class Certificate:
    """A certificate the relay depends on: name, file (None: seen on the wire), expiry."""

    name: str
    expires: float
    file: str | None = None

    def days_left(self, now: float) -> float:
        return (self.expires - now) / 86400


def certificates(config: RelayConfig, hub_expires: float | None) -> list[Certificate]:
    """The relay's own certificate, the local API's if any, and the hub's
    as last seen; files that cannot be read are left out (doctor says why)."""
    found = []
    files = [("relay", config.uplink.cert_file), ("local_api", config.local_api.tls_cert_file)]
    for name, path in files:
        if path is None:
            continue
        try:
            cert = identity.load_certificates(path)[0]
        except (OSError, ValueError, IndexError):
            continue
        expires = identity.peer_identity(cert.public_bytes(Encoding.DER)).not_after.timestamp()
        found.append(Certificate(name, expires, str(path)))
    if hub_expires is not None:
        found.append(Certificate("hub", hub_expires))
    return found


@dataclass
class CertificateWatch:
    """Warns once per threshold of `WARN_DAYS` (and when expired) per
    certificate; a renewed certificate (a new expiry) starts afresh."""

    warned: dict[tuple[str, float], set[int]] = field(default_factory=dict)

    def check(self, found: list[Certificate], now: float) -> None:
        for cert in found:
            threshold = due_warning(cert.days_left(now), self.warned.setdefault((cert.name, cert.expires), set()))
            if threshold is None:
                continue
            where = f" ({cert.file})" if cert.file else ""
            when = timeformat.minute(cert.expires)
            if threshold == 0:
                log.error("certificate %s%s EXPIRED on %s: renew it now (docs/operations.md, "
                          "'Renew a certificate')", cert.name, where, when)
            else:
                log.warning("certificate %s%s expires in %.0f day(s), on %s: renew it (docs/operations.md, "
                            "'Renew a certificate')", cert.name, where, max(cert.days_left(now), 0), when)


def due_warning(days_left: float, warned: set[int]) -> int | None:
    """The threshold to warn about now (0: expired), or None; marks it, and
    every larger one, as warned so that each is said once."""
    due = [t for t in (*WARN_DAYS, 0) if days_left <= t and t not in warned]
    if not due:
        return None
    threshold = min(due)
    warned.update(t for t in (*WARN_DAYS, 0) if t >= threshold)
    return threshold


def stall_reasons(stalls: list[dict[str, Any]], timeout: float, now: float) -> list[str]:
    """The lanes that get no answers from the hub (`Uplink.stalls`), in words."""
    return [f"degraded: {s['what']} got no answer from the hub for {span(now - s['since'])}"
            f" ({s['unanswered']} unanswered within {timeout:g} s, {s['timeouts']} time(s);"
            " the relay reconnects and sends it again)" for s in stalls]


def health(problems: list[str], stalls: list[str]) -> str:
    """"healthy", "degraded" (only lanes stalled) or "unhealthy"."""
    if any(p not in stalls for p in problems):
        return "unhealthy"
    return "degraded" if stalls else "healthy"


def assess(snapshot: dict[str, Any], config: RelayConfig, now: float) -> tuple[list[str], list[str]]:
    """The problems (unhealthy, or degraded) and warnings of a status snapshot."""
    problems: list[str] = []
    warnings: list[str] = []
    uplink = snapshot["uplink"]
    if uplink["state"] != UplinkState.CONNECTED.value:
        since = span(now - uplink["since"])
        problems.append(f"not connected to the hub ({uplink['state']} for {since})"
                        + (f": {uplink['last_error']}" if uplink["last_error"] else ""))
    problems += stall_reasons(uplink["stalls"], config.uplink.request_timeout, now)
    for cert in snapshot["certificates"]:
        days = (cert["expires"] - now) / 86400
        what = f"certificate {cert['name']}" + (f" ({cert['file']})" if cert["file"] else "")
        if days <= 0:
            problems.append(f"{what} has expired")
        elif days <= UNHEALTHY_DAYS:
            problems.append(f"{what} expires in {days:.1f} day(s): renew it")
        elif days <= WARN_DAYS[0]:
            warnings.append(f"{what} expires in {days:.0f} days: renew it")
    store = snapshot["store"]
    if store["error"]:
        problems.append(f"{store['error']} (disk full? the queue figures shown are the last ones read)")
    if store["used_bytes"] >= store["max_bytes"]:
        problems.append("the store is full: messages are refused (see [store] max_size)")
    elif store["used_bytes"] >= store["high_water"] * store["max_bytes"]:
        warnings.append("the store is above its high-water mark: only urgent messages are taken")
    oldest = snapshot["queues"]["oldest_queued_at"]
    if oldest is not None and now - oldest > config.delivery.delay_warning:
        warnings.append(f"the oldest queued message has waited {span(now - oldest)}")
    if snapshot["reload"]["errors"]:
        warnings.append("the last reload failed; the previous configuration is in force")
    warnings.extend(f"{listener} serves HTTP without TLS on the network (allow_cleartext_on_network = true):"
                    " anyone on the path can read what it carries" for listener in snapshot["cleartext"])
    return problems, warnings


class RelayOperations:
    """The daemon's side of the admin channel; see the module docstring.

    ``config`` is read through a getter since a reload swaps it."""

    def __init__(self, config: Callable[[], RelayConfig], store: Store, uplink: Uplink, queue: QueueTools,
                 reload_state: Callable[[], dict[str, Any]]) -> None:
        self._config = config
        self.store = store
        self.uplink = uplink
        self.queue = queue
        self._reload_state = reload_state
        self.started = time.time()
        # The last queue figures read: what status shows while the store
        # cannot commit (a full disk), which is when it is needed most.
        self._queues: dict[str, Any] = {"outbound": {"urgent": 0, "normal": 0}, "oldest_queued_at": None,
                                        "recipients": dict.fromkeys(relay_admin.QUEUE_STATES, 0), "unread": {},
                                        "webhook_backlog": {}}

    def handlers(self) -> dict[str, Handler]:
        return {"status": self.status, "queue.list": self.queue.list, "queue.show": self.queue.show,
                "queue.retry": self.queue.retry, "queue.purge": self.queue.purge}

    async def status(self, args: dict[str, Any] | None = None) -> dict[str, Any]:
        config, now = self._config(), time.time()
        store_error = None
        try:
            self._queues = await self.store.read("queue_summary", relay_admin.queue_summary)
        except StoreUnavailable as exc:
            store_error = str(exc)
        up = self.uplink
        snapshot: dict[str, Any] = {
            "version": __version__, "domain": config.domain, "pid": os.getpid(), "started": self.started,
            "config": str(config.path),
            "uplink": {"state": up.state.value, "since": up.since, "hub_url": config.uplink.hub_url,
                       "last_error": up.last_error, "reconnects": max(0, up.attempts - 1),
                       "stalls": up.stalls()},
            "queues": self._queues,
            "store": {"path": str(self.store.path), "used_bytes": self.store.used_bytes, "error": store_error,
                      "max_bytes": config.store.max_bytes, "high_water": config.store.high_water},
            "certificates": [vars(c) for c in certificates(config, up.hub_cert_expires)],
            "reload": self._reload_state(),
            # Listeners serving HTTP without TLS beyond loopback (allow_cleartext_on_network = true).
            "cleartext": [f"{table} {address.host}:{address.port}"
                          for table, address, _ in cleartext_listeners(config)],
        }
        problems, warnings = assess(snapshot, config, now)
        stalls = stall_reasons(snapshot["uplink"]["stalls"], config.uplink.request_timeout, now)
        snapshot.update(healthy=not problems, health=health(problems, stalls), problems=problems,
                        warnings=warnings)
        return snapshot


def status_line(config: RelayConfig, uplink: Uplink, queues: dict[str, Any] | None) -> str:
    """What systemd shows as the service's status: the hub link, the lanes
    that get no answers, and the queue."""
    if uplink.state is UplinkState.CONNECTED:
        link = f"connected to {config.uplink.server_name}"
    else:
        link = f"hub {uplink.state.value}" + (f" ({uplink.last_error})" if uplink.last_error else "")
    if stalls := uplink.stalls():
        link += "; DEGRADED: no answer from the hub for " + ", ".join(s["what"] for s in stalls)
    if queues is None:
        return link
    out = queues["outbound"]
    return f"{link}; outbound queue {out['urgent'] + out['normal']} ({out['urgent']} urgent)"


class StatusReporter:
    """Tells systemd (``STATUS=``) what the relay is doing, as it changes,
    and runs the certificate checks; see the module docstring."""

    def __init__(self, config: Callable[[], RelayConfig], store: Store, uplink: Uplink, outbox_changed: Signal,
                 reloaded: Signal) -> None:
        self._config = config
        self.store = store
        self.uplink = uplink
        self.outbox_changed = outbox_changed
        self.reloaded = reloaded
        self.watch = CertificateWatch()
        self.line = ""

    async def run(self) -> None:
        next_check, hub_seen = 0.0, None
        while True:
            wakers = [self.uplink.changed.watch(), self.outbox_changed.watch(), self.reloaded.watch()]
            config = self._config()
            try:
                queues = await self.store.read("queue_summary", relay_admin.queue_summary)
                line = status_line(config, self.uplink, queues)
            except StoreUnavailable as exc:
                line = f"{status_line(config, self.uplink, None)}; {exc}"
            if line != self.line:
                self.line = line
                notify(f"STATUS={line}")
            if trio.current_time() >= next_check or self.uplink.hub_cert_expires != hub_seen:
                hub_seen = self.uplink.hub_cert_expires
                self.watch.check(certificates(config, hub_seen), time.time())
                next_check = trio.current_time() + CERT_CHECK_INTERVAL
            await trio.sleep(STATUS_MIN_INTERVAL)
            with trio.move_on_after(STATUS_REFRESH):
                await _first_of(wakers)
            if self.reloaded.watch() is not wakers[2]:
                next_check = 0.0  # new files: look at the certificates again


async def _first_of(events: list[trio.Event]) -> None:
    async with trio.open_nursery(strict_exception_groups=True) as nursery:
        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(wait, event)


async def watch_own_certificate(name: str, cert_file: Callable[[], Path], reloaded: Signal) -> None:
    """The hub's `CertificateWatch` of its own certificate: hourly, and
    after each reload."""
    watch = CertificateWatch()
    while True:
        changed = reloaded.watch()
        path = cert_file()
        try:
            expires = identity.peer_identity(identity.load_certificates(path)[0].public_bytes(Encoding.DER)).not_after
            watch.check([Certificate(name, expires.timestamp(), str(path))], time.time())
        except (OSError, ValueError, IndexError) as exc:
            log.error("certificate %s: cannot read %s: %s", name, path, describe_error(exc))
        with trio.move_on_after(CERT_CHECK_INTERVAL):
            await changed.wait()

"""Push delivery: POST each event of a local system to its webhook.

Theory of operation
-------------------
One `WebhookPusher` per local system that has a ``webhook_url``, each its
own task, so a slow or dead receiver of one system never holds back another
system or the uplink.  A pusher walks the system's events in cursor order,
one at a time (so the receiver sees them in order), and retries an event
with exponential backoff and jitter until the receiver answers 2xx.  Its
position is stored after each success: after a restart it resumes there,
which may send the last event again -- delivery is at-least-once, and the
``Event-Id`` header (the event's cursor) lets the receiver drop repeats.

Each POST carries ``Eimis-Signature: sha256=<hex>``, the HMAC-SHA256 of the
exact body bytes under the system's secret (docs/local-api.md shows how a
receiver checks it).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import ssl
from urllib.parse import urlsplit

import h11
import trio

from relay import __version__
from relay.config.model import LocalSystem
from relay.core.backoff import RetryPolicy
from relay.net.wakeup import Signal
from relay.store import relay_inbox
from relay.store.engine import Store

log = logging.getLogger(__name__)

RETRY = RetryPolicy(initial=1.0, maximum=300.0)
PAGE = 100


class WebhookFailed(Exception):
    """One delivery attempt failed; the message says why, for the log."""


class WebhookPusher:
    def __init__(self, system: LocalSystem, store: Store, arrived: Signal, *, retry: RetryPolicy = RETRY) -> None:
        assert system.webhook_url is not None and system.webhook_secret is not None
        self._url, self._secret = system.webhook_url, system.webhook_secret
        self.system = system
        self.store = store
        self.arrived = arrived
        self.retry = retry
        self.failures = 0
        self._tls = ssl.create_default_context()

    async def run(self) -> None:
        name = self.system.name
        cursor = await self.store.run_patiently("webhook_position", lambda c: relay_inbox.webhook_position(c, name))
        while True:
            arrived = self.arrived.watch()
            page = await self.store.run_patiently("events", lambda c: relay_inbox.events(c, name, cursor, PAGE))  # noqa: B023 -- awaited
            if not page:
                await arrived.wait()
                continue
            for event in page:
                await self._deliver(event)
                cursor = event["cursor"]
                await self.store.run_patiently(
                    "webhook_advance", lambda c: relay_inbox.set_webhook_position(c, name, cursor)  # noqa: B023 -- awaited
                )

    async def _deliver(self, event: dict) -> None:
        body = json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()
        signature = hmac.new(self._secret, body, hashlib.sha256).hexdigest()
        headers = [
            ("content-type", "application/json"),
            ("event-id", str(event["cursor"])),
            ("eimis-signature", f"sha256={signature}"),
            ("user-agent", f"eimis-relay/{__version__}"),
        ]
        attempt = 0
        while True:
            try:
                with trio.fail_after(self.system.webhook_timeout):
                    status = await post(self._url, body, headers, self._tls)
                if 200 <= status < 300:
                    return
                reason = f"answered {status}"
            except (OSError, ssl.SSLError, trio.BrokenResourceError, trio.TooSlowError, h11.ProtocolError,
                    WebhookFailed) as exc:
                reason = str(exc) or exc.__class__.__name__
            self.failures += 1
            delay = self.retry.delay(attempt)
            attempt += 1
            log.warning("webhook of %s: event %s not delivered (%s); retry %d in %.1f s",
                        self.system.name, event["cursor"], reason, attempt, delay)
            await trio.sleep(delay)


async def post(url: str, body: bytes, headers: list[tuple[str, str]], tls: ssl.SSLContext) -> int:
    """One HTTP/1.1 POST on a fresh connection; returns the status code."""
    parts = urlsplit(url)
    assert parts.hostname is not None  # [local_system].webhook_url was checked
    port = parts.port or (443 if parts.scheme == "https" else 80)
    stream: trio.abc.Stream = await trio.open_tcp_stream(parts.hostname, port)
    try:
        if parts.scheme == "https":
            stream = trio.SSLStream(stream, tls, server_hostname=parts.hostname)
        conn = h11.Connection(our_role=h11.CLIENT)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        request = h11.Request(method="POST", target=target, headers=[
            ("host", parts.netloc), ("content-length", str(len(body))), ("connection", "close"), *headers])
        await stream.send_all(conn.send(request) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(16384)
                if not data:
                    raise WebhookFailed("connection closed before an answer")
                conn.receive_data(bytes(data))
            elif isinstance(event, h11.Response):
                return event.status_code
    finally:
        await trio.aclose_forcefully(stream)

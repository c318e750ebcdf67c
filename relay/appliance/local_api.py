"""The local API: the contract hospital messaging vendors integrate with.

Routes (docs/local-api.md has the full contract):

  POST /v1/messages            submit; 202 only once the message is committed
  GET  /v1/messages/{id}       per-recipient status, for the system that sent it
  POST /v1/messages/{id}/read  a user read a message this system received
  GET  /v1/events              long-poll for messages to this system's users
  GET  /healthz                liveness and uplink state, no token

Every request but ``/healthz`` carries ``Authorization: Bearer <token>``;
the token selects the local system (config stores only its SHA-256).
Errors are ``{"error": {"code", "message"}}`` and name the offending field.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import trio

from relay.config.model import LocalSystem, RelayConfig
from relay.core import protocol
from relay.core.addresses import domain_of, is_address
from relay.core.priority import PRIORITIES
from relay.core.ratelimit import TokenBucket
from relay.net.local_server import Request, Response
from relay.net.wakeup import Signal, Signals
from relay.store import audit, relay_inbox, relay_queue
from relay.store.engine import Store, StoreUnavailable
from relay.store.relay_queue import Submission

log = logging.getLogger(__name__)

MAX_WAIT = 60.0
EVENTS_PAGE = 100
RETRY_AFTER_SECONDS = "5"
_MESSAGE_PATH = re.compile(r"/v1/messages/([A-Za-z0-9_-]{1,64})(/read)?")
# (fullmatch: "$" would let a trailing newline through.)
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,128}")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status, self.code, self.headers = status, code, list(headers)

    def response(self) -> Response:
        return Response.json(self.status, {"error": {"code": self.code, "message": str(self)}}, self.headers)


def too_large(limit: int) -> Callable[[], Response]:
    return lambda: ApiError(413, "too_large", f"request body larger than {limit} bytes").response()


class LocalApi:
    """The routes above; ``events`` has a local system's signal fired when
    it has new events (long-polls wait on it), ``uplink_state`` says how
    the link to the hub is (``/healthz``), and ``on_accepted`` is told the
    priority of each submission answered 202 (the metrics).  ``clock``
    stamps what the API stores (a test passes its own); the rate limit and
    the long-poll deadline run on trio's clock."""

    def __init__(self, config: RelayConfig, store: Store, outbox_changed: Signal, events: Signals,
                 uplink_state: Callable[[], str], on_accepted: Callable[[str], None],
                 *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.store = store
        self.outbox_changed = outbox_changed
        self.events = events
        self._uplink_state = uplink_state
        self._on_accepted = on_accepted
        self._buckets: dict[tuple[str, float, int], TokenBucket] = {}

    async def __call__(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except ApiError as exc:
            # Refusals of an authenticated system's writes are audited; the
            # anonymous and the throttled are only logged, or they could
            # fill the store with audit entries.
            if request.method == "POST" and exc.status not in (401, 429):
                await self._audit_refusal(request, exc)
            elif exc.status in (401, 429):
                log.info("local API: %s %s refused: %s %s", request.method, request.path[:100], exc.status, exc.code)
            return exc.response()
        except StoreUnavailable:
            log.error("local API: store unavailable, answering 503")
            return ApiError(503, "unavailable", "the relay cannot store messages right now; retry later",
                            [("retry-after", RETRY_AFTER_SECONDS)]).response()

    async def _audit_refusal(self, request: Request, exc: ApiError) -> None:
        """A refused write goes into the audit trail (metadata only)."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        system = self.config.system_for_token(token.strip()) if scheme.lower() == "bearer" else None
        actor = f"system:{system.name}" if system else "unauthenticated"
        outcome = f"{exc.status} {exc.code}"
        path, now = request.path[:100], self.clock()
        try:
            await self.store.run("audit_refusal",
                                 lambda c: audit.record(c, actor, "refused", None, path, outcome, now=now))
        except StoreUnavailable:
            pass  # the refusal itself is still answered; the log has it

    async def _route(self, request: Request) -> Response:
        if request.path == "/healthz":
            _method(request, "GET")
            return Response.json(200, {"status": "ok", "uplink": self._uplink_state()})
        system = self._authenticate(request)
        self._throttle(system)
        if request.path == "/v1/messages":
            _method(request, "POST")
            return await self._submit(system, request)
        if request.path == "/v1/events":
            _method(request, "GET")
            return await self._events_page(system, request)
        if match := _MESSAGE_PATH.fullmatch(request.path):
            if match.group(2):
                _method(request, "POST")
                return await self._read(system, match.group(1))
            _method(request, "GET")
            return await self._status(system, match.group(1))
        raise ApiError(404, "not_found", f"no such endpoint: {request.path}")

    def _authenticate(self, request: Request) -> LocalSystem:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "missing bearer token", [("www-authenticate", "Bearer")])
        system = self.config.system_for_token(token.strip())
        if system is None:
            raise ApiError(401, "unauthorized", "invalid token", [("www-authenticate", "Bearer")])
        return system

    def _throttle(self, system: LocalSystem) -> None:
        if not system.rate_limit:
            return
        # Keyed by the limits too: a reload that changes them starts afresh.
        key = (system.name, system.rate_limit, system.rate_burst)
        bucket = self._buckets.setdefault(key, TokenBucket(system.rate_limit, system.rate_burst))
        if wait := bucket.take(trio.current_time()):
            raise ApiError(429, "rate_limited", f"more than {system.rate_limit:g} requests per second from this "
                           "system", [("retry-after", str(max(1, round(wait))))])

    # -- POST /v1/messages ------------------------------------------------------------

    async def _submit(self, system: LocalSystem, request: Request) -> Response:
        document = _json_body(request)
        submission = self._validate(system, document, request.headers.get("idempotency-key"))
        now = self.clock()
        try:
            ident, status = await self.store.run(
                "submit", lambda c: relay_queue.submit(c, submission, self._has_room, now=now),
                urgent=submission.priority == "urgent")
        except relay_queue.StoreFull:
            log.warning("store at %d of %d bytes: refusing a %s message",
                        self.store.used_bytes, self.config.store.max_bytes, submission.priority)
            raise ApiError(503, "store_full", "the relay's store is full; retry later (urgent messages are "
                           "still taken until the hard ceiling)", [("retry-after", RETRY_AFTER_SECONDS)]) from None
        if ident == submission.id:
            self.outbox_changed.fire()
            # DEBUG: at thousands per second this line was 9% of ingress CPU,
            # and the audit trail already records every acceptance.
            log.debug("accepted message %s from %s (%s) for %d recipient(s)",
                     ident, submission.sender, system.name, len(submission.to), extra={"message_id": ident})
        self._on_accepted(submission.priority)
        return Response.json(202, {"id": ident, "status": status})

    def _has_room(self, priority: str) -> bool:
        """Back-pressure: above the high-water mark only urgent messages are
        taken, and none above the ceiling; nothing accepted is ever dropped
        to make room.  (Runs in the store's thread, inside the submission.)"""
        limits = self.config.store
        used = self.store.used_bytes
        return used < limits.max_bytes and (priority == "urgent" or used < limits.high_water * limits.max_bytes)

    def _validate(self, system: LocalSystem, doc: dict[str, Any], idem_key: str | None) -> Submission:
        unknown = set(doc) - {"from", "to", "body", "thread", "priority"}
        if unknown:
            raise _invalid(min(unknown), "unknown field")
        sender = doc.get("from")
        if not is_address(sender):
            raise _invalid("from", "expected an address like alice@" + self.config.domain)
        if domain_of(sender) != self.config.domain:
            raise ApiError(403, "forbidden", f"from: {sender} is not an address of this relay's domain "
                                             f"({self.config.domain})")
        if not system.may_send_as(sender):
            raise ApiError(403, "forbidden", f"from: this system may not send as {sender}")
        to = doc.get("to")
        if not isinstance(to, list) or not 1 <= len(to) <= protocol.MAX_RECIPIENTS:
            raise _invalid("to", f"expected a list of 1 to {protocol.MAX_RECIPIENTS} addresses")
        for index, address in enumerate(to):
            if not is_address(address):
                raise _invalid(f"to[{index}]", "expected an address like bob@clinique-sud.test")
        if len(set(to)) != len(to):
            raise _invalid("to", "duplicate recipient")
        body = doc.get("body")
        if not isinstance(body, str):
            raise _invalid("body", "expected a string")
        if len(body.encode()) > system.max_message_bytes:
            raise ApiError(413, "too_large", f"body: larger than {system.max_message_bytes} bytes")
        thread = doc.get("thread")
        if thread is not None and (not isinstance(thread, str) or len(thread) > protocol.MAX_THREAD_CHARS):
            raise _invalid("thread", f"expected a string of at most {protocol.MAX_THREAD_CHARS} characters")
        priority = doc.get("priority", "normal")
        if priority not in PRIORITIES:
            raise _invalid("priority", "expected 'normal' or 'urgent'")
        if idem_key is not None and not _IDEMPOTENCY_KEY.fullmatch(idem_key):
            raise _invalid("Idempotency-Key", "expected 1 to 128 printable ASCII characters")
        return Submission(
            # Hex, so never starting with "-", which an admin's
            # `eimis-relay queue show ID` would take for an option.
            id=protocol.new_message_id(),
            domain=self.config.domain,
            system=system.name,
            idem_key=idem_key,
            sender=sender,
            to=tuple(to),
            thread=thread,
            priority=priority,
            body=body,
            ttl=self.config.delivery.message_ttl,
        )

    # -- GET /v1/messages/{id} ----------------------------------------------------------

    async def _status(self, system: LocalSystem, ident: str) -> Response:
        document = await self.store.read("message_status", lambda c: relay_queue.message_status(c, ident, system.name))
        if document is None:
            raise ApiError(404, "not_found", f"no message {ident} sent by this system")
        return Response.json(200, document)

    # -- POST /v1/messages/{id}/read -------------------------------------------------

    async def _read(self, system: LocalSystem, ident: str) -> Response:
        domain, now = self.config.domain, self.clock()
        marked = await self.store.run(
            "mark_read", lambda c: relay_inbox.mark_read(c, domain, system.name, ident, system.serves, now=now)
        )
        if marked is None:
            raise ApiError(404, "not_found", f"no message {ident} received by this system")
        if marked:
            self.outbox_changed.fire()
        return Response.json(202, {"id": ident, "status": "read"})

    # -- GET /v1/events -------------------------------------------------------------------

    async def _events_page(self, system: LocalSystem, request: Request) -> Response:
        after = _int_param(request, "after", 0, minimum=0)
        wait = _float_param(request, "wait", 0.0, maximum=MAX_WAIT)
        signal = self.events.signal(system.name)
        deadline = trio.current_time() + wait
        while True:
            arrived = signal.watch()
            page = await self.store.read(
                "events", lambda c: relay_inbox.events(c, system.name, after, EVENTS_PAGE)
            )
            if page:
                break
            with trio.move_on_at(deadline) as waiting:
                await arrived.wait()
            if waiting.cancelled_caught:
                break
        return Response.json(200, {"events": page, "next": page[-1]["cursor"] if page else after})


def _method(request: Request, allowed: str) -> None:
    if request.method != allowed:
        raise ApiError(405, "method_not_allowed", f"{request.path} accepts {allowed} only", [("allow", allowed)])


def _json_body(request: Request) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "expected Content-Type: application/json")
    try:
        document = json.loads(request.body)
        # JSON may escape lone surrogates ("\ud800"), which are not text, and
        # json.loads lets UTF-8-encoded ones through.  Neither is possible
        # without a backslash or a non-ASCII byte: the common case skips the check.
        if not request.body.isascii() or b"\\" in request.body:
            json.dumps(document, ensure_ascii=False).encode()
    except (UnicodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"body is not valid JSON text: {exc}") from None
    if not isinstance(document, dict):
        raise ApiError(400, "invalid_json", "body must be a JSON object")
    return document


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(400, "invalid", f"{field}: {message}")


def _int_param(request: Request, name: str, default: int, *, minimum: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,18}", raw) or int(raw) < minimum:
        raise _invalid(name, f"expected an integer >= {minimum}")
    return int(raw)


def _float_param(request: Request, name: str, default: float, *, maximum: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= maximum:
        raise _invalid(name, f"expected seconds between 0 and {maximum:g}")
    return value

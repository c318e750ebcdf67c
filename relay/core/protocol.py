"""The national protocol, version 1: what relay and hub say to each other.

Pure data and codecs, no I/O: the hub and the uplink both build on this
module, and `docs/protocol.md` is its prose twin (keep them in step).

Every body is one msgpack map.  Decoding never trusts the peer: sizes are
bounded before unpacking, types are checked field by field, and any
violation raises `ProtocolViolation` naming the field, which the receiver
turns into a 400 (or a closed stream) without touching its store.
"""

from __future__ import annotations

import math
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import msgpack

from relay.core.addresses import domain_of, is_address
from relay.core.priority import PRIORITIES

VERSION = 1
ALPN = "h2"
MSGPACK = b"application/msgpack"

# -- stated limits (docs/protocol.md §Limits) --------------------------------

# Largest message body, in UTF-8 bytes: ample for clinical text, small
# enough that a batch stays in memory comfortably.
MAX_BODY_BYTES = 256 * 1024
MAX_RECIPIENTS = 100
MAX_THREAD_CHARS = 256
# Envelopes per transaction, and the largest transaction body.
MAX_BATCH = 500
MAX_TRANSACTION_BYTES = 32 * 1024 * 1024
# An ack names at most this many queue positions.
MAX_ACK = 5000
# Largest single item the hub writes on the inbox stream.
# (a body plus up to 100 recipients twice, at 320 characters each).
MAX_ITEM_BYTES = MAX_BODY_BYTES + 128 * 1024
# ``sent_at`` must fit an ISO 8601 UTC timestamp (years 1970 to 9999): the
# receiving relay stores it as a REAL (NaN would become NULL) and renders it
# with time.gmtime (which overflows on inf or 1e300), so an unbounded value
# from one peer would poison every other relay it reaches.
MAX_SENT_AT = 253402300800.0  # 10000-01-01T00:00:00Z

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{8,64}$")

# Machine-readable reasons in per-envelope answers and `failed` receipts.
UNKNOWN_DOMAIN = "unknown_domain"
UNKNOWN_RECIPIENT = "unknown_recipient"
SENDER_NOT_AUTHENTICATED = "sender_not_authenticated"
INVALID_ENVELOPE = "invalid_envelope"
EXPIRED = "expired"
MISROUTED = "misrouted"
# Expired items are no longer sent, but only swept (failed with "expired")
# a grace period later: an exchange that started just before the deadline
# ends long before, so nothing is both delivered and reported expired.
EXPIRY_GRACE = 120.0


def sweep_time(sent_at: float, expires_at: float) -> float:
    """When an item that expires at ``expires_at`` is failed as expired:
    after `EXPIRY_GRACE`, or a tenth of its time-to-live if that is shorter."""
    return expires_at + min(EXPIRY_GRACE, (expires_at - sent_at) / 10)
UNKNOWN_MESSAGE = "unknown_message"
RECEIPT_STATUSES = ("delivered", "failed", "read")


class ProtocolViolation(ValueError):
    """A peer sent something v1 does not allow; the message names the field."""


def new_message_id() -> str:
    """A fresh message id: the time in microseconds, then 72 random bits, in
    hex.  Ids in time order keep every store's inserts and updates (keyed by
    message id) on the few B-tree pages of recent messages, instead of all
    over a table of 100,000; the time they show is no more than the
    envelope's ``sent_at`` already says."""
    return f"{time.time_ns() // 1000:014x}{secrets.token_hex(9)}"


def is_token(text: object) -> bool:
    """Ids of messages and transactions: opaque, URL-safe, bounded."""
    return isinstance(text, str) and _TOKEN.fullmatch(text) is not None


@dataclass(frozen=True)
class Envelope:
    """One message on its way to one destination domain.

    ``to`` is every recipient of the message (what the reader sees);
    ``rcpt`` the ones at ``dest``, the domain this envelope is routed to.
    ``origin`` is stamped by the hub from the sending relay's certificate
    and is empty on the way up.
    """

    id: str
    sender: str
    to: tuple[str, ...]
    rcpt: tuple[str, ...]
    body: str
    thread: str | None
    priority: str
    sent_at: float
    origin: str = ""
    # After this moment (seconds since 1970) nobody delivers it any more:
    # it fails with reason "expired".  None: it never expires.
    expires_at: float | None = None
    # Stamped by the hub beside ``origin``: the organisation identifier
    # (subject OU: 1 + FINESS or 3 + SIRET) of the sending relay's certificate.
    origin_org: str = ""
    # Set by the sending relay on a retry (`eimis-relay queue retry`): the
    # id of the message this envelope carries again under a new envelope id
    # (the hub drops an envelope id it has seen).  The destination relay
    # files it under that id, so a copy it already has is not shown twice.
    retry_of: str = ""

    @property
    def dest(self) -> str:
        return domain_of(self.rcpt[0])

    def to_wire(self) -> dict[str, Any]:
        wire = {
            "id": self.id,
            "from": self.sender,
            "to": list(self.to),
            "rcpt": list(self.rcpt),
            "body": self.body,
            "thread": self.thread,
            "priority": self.priority,
            "sent_at": self.sent_at,
        }
        if self.origin:
            wire["origin"] = self.origin
        if self.expires_at is not None:
            wire["expires_at"] = self.expires_at
        if self.origin_org:
            wire["origin_org"] = self.origin_org
        if self.retry_of:
            wire["retry_of"] = self.retry_of
        return wire

    @classmethod
    def from_wire(cls, obj: object) -> Envelope:
        m = _map(obj, "envelope")
        rcpt = _addresses(m, "rcpt")
        dest = domain_of(rcpt[0])
        if any(domain_of(a) != dest for a in rcpt):
            raise ProtocolViolation("envelope.rcpt: recipients of more than one domain")
        to = _addresses(m, "to")
        if not set(rcpt) <= set(to):
            raise ProtocolViolation("envelope.rcpt: not a subset of envelope.to")
        body = _field(m, "body", str)
        if len(body.encode()) > MAX_BODY_BYTES:
            raise ProtocolViolation(f"envelope.body: larger than {MAX_BODY_BYTES} bytes")
        thread = m.get("thread")
        if thread is not None and (not isinstance(thread, str) or len(thread) > MAX_THREAD_CHARS):
            raise ProtocolViolation(f"envelope.thread: expected a string of at most {MAX_THREAD_CHARS} characters")
        priority = _field(m, "priority", str)
        if priority not in PRIORITIES:
            raise ProtocolViolation("envelope.priority: expected 'normal' or 'urgent'")
        sender = _field(m, "from", str)
        if not is_address(sender):
            raise ProtocolViolation("envelope.from: expected an address")
        ident = _field(m, "id", str)
        if not is_token(ident):
            raise ProtocolViolation("envelope.id: expected 8-64 characters of [A-Za-z0-9_-]")
        sent_at = _timestamp(m.get("sent_at"), "envelope.sent_at")
        expires_at = m.get("expires_at")
        if expires_at is not None:
            expires_at = _timestamp(expires_at, "envelope.expires_at")
        origin = m.get("origin", "")
        if not isinstance(origin, str):
            raise ProtocolViolation("envelope.origin: expected a string")
        origin_org = m.get("origin_org", "")
        if not isinstance(origin_org, str) or len(origin_org) > 64:
            raise ProtocolViolation("envelope.origin_org: expected a string of at most 64 characters")
        retry_of = m.get("retry_of", "")
        if retry_of != "" and not is_token(retry_of):
            raise ProtocolViolation("envelope.retry_of: expected 8-64 characters of [A-Za-z0-9_-]")
        return cls(ident, sender, to, rcpt, body, thread, priority, sent_at, origin, expires_at, origin_org, retry_of)


@dataclass(frozen=True)
class Receipt:
    """News about a message, for the relay that sent it.

    ``status`` is ``delivered`` (the destination relay committed it),
    ``read`` (a recipient's system reported it read) or ``failed`` (with
    ``reason``), for the listed recipients.  On its way up, from the
    destination relay to the hub, ``origin`` names the domain the message
    came from, which is where the hub routes the receipt.
    """

    id: str
    rcpt: tuple[str, ...]
    status: str
    reason: str | None = None
    origin: str = ""

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"id": self.id, "rcpt": list(self.rcpt), "status": self.status}
        if self.reason:
            wire["reason"] = self.reason
        if self.origin:
            wire["origin"] = self.origin
        return wire

    @classmethod
    def from_wire(cls, obj: object) -> Receipt:
        m = _map(obj, "receipt")
        status = _field(m, "status", str)
        if status not in RECEIPT_STATUSES:
            raise ProtocolViolation("receipt.status: expected 'delivered', 'read' or 'failed'")
        reason = m.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise ProtocolViolation("receipt.reason: expected a string")
        ident = _field(m, "id", str)
        if not is_token(ident):
            raise ProtocolViolation("receipt.id: expected a message id")
        origin = m.get("origin", "")
        if not isinstance(origin, str):
            raise ProtocolViolation("receipt.origin: expected a string")
        return cls(ident, _addresses(m, "rcpt"), status, reason, origin)


@dataclass(frozen=True)
class InboxItem:
    """One entry of a relay's inbox stream, at queue position ``seq``."""

    seq: int
    envelope: Envelope | None = None
    receipt: Receipt | None = None

    def to_wire(self) -> dict[str, Any]:
        if self.envelope is not None:
            return {"seq": self.seq, "kind": "message", "envelope": self.envelope.to_wire()}
        assert self.receipt is not None
        return {"seq": self.seq, "kind": "receipt", "receipt": self.receipt.to_wire()}

    @classmethod
    def from_wire(cls, obj: object) -> InboxItem:
        m = _map(obj, "item")
        seq = _field(m, "seq", int)
        kind = _field(m, "kind", str)
        if kind == "message":
            return cls(seq, envelope=Envelope.from_wire(m.get("envelope")))
        if kind == "receipt":
            return cls(seq, receipt=Receipt.from_wire(m.get("receipt")))
        raise ProtocolViolation(f"item.kind: unknown kind {kind!r}")


@dataclass(frozen=True)
class Outcome:
    """The hub's answer about one envelope of a transaction."""

    accepted: bool
    reason: str | None = None
    detail: str | None = None

    def to_wire(self) -> dict[str, Any]:
        if self.accepted:
            return {"ok": True}
        return {"ok": False, "reason": self.reason, "detail": self.detail or ""}

    @classmethod
    def from_wire(cls, obj: object) -> Outcome:
        m = _map(obj, "result")
        if _field(m, "ok", bool):
            return cls(True)
        detail = m.get("detail")
        if detail is not None and not isinstance(detail, str):
            raise ProtocolViolation("result.detail: expected a string")
        return cls(False, _field(m, "reason", str), detail or None)


@dataclass(frozen=True)
class Failure:
    """In an ack: recipients of an acknowledged message the relay cannot serve."""

    seq: int
    rcpt: tuple[str, ...]
    reason: str

    def to_wire(self) -> dict[str, Any]:
        return {"seq": self.seq, "rcpt": list(self.rcpt), "reason": self.reason}

    @classmethod
    def from_wire(cls, obj: object) -> Failure:
        m = _map(obj, "failure")
        return cls(_field(m, "seq", int), _addresses(m, "rcpt"), _field(m, "reason", str))


# -- bodies -----------------------------------------------------------------------


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes, what: str) -> Any:
    """Decode one msgpack body, refusing anything that is not plain data."""
    # Extension types are refused by size (max_ext_len=0) as well as by hook:
    # msgpack decodes the timestamp type (-1) itself, without calling ext_hook.
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_no_ext, max_ext_len=0)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError) as exc:
        raise ProtocolViolation(f"{what}: not a valid msgpack body ({exc.__class__.__name__})") from None


def stream_unpacker() -> msgpack.Unpacker:
    """An incremental decoder for the inbox stream, bounded per item."""
    return msgpack.Unpacker(
        raw=False, strict_map_key=True, ext_hook=_no_ext, max_ext_len=0, max_buffer_size=2 * MAX_ITEM_BYTES
    )


def encode_transaction(envelopes: list[Envelope]) -> bytes:
    return pack({"v": VERSION, "envelopes": [e.to_wire() for e in envelopes]})


def decode_transaction(data: bytes) -> list[object]:
    """The raw envelopes of a transaction: each is validated on its own, so
    one bad envelope is rejected without refusing its neighbours."""
    m = _versioned(unpack(data, "transaction"), "transaction")
    envelopes = m.get("envelopes")
    if not isinstance(envelopes, list) or not envelopes:
        raise ProtocolViolation("transaction.envelopes: expected a non-empty array")
    if len(envelopes) > MAX_BATCH:
        raise ProtocolViolation(f"transaction.envelopes: more than {MAX_BATCH} envelopes")
    return envelopes


def encode_outcomes(outcomes: list[Outcome]) -> bytes:
    return pack({"v": VERSION, "results": [o.to_wire() for o in outcomes]})


def decode_outcomes(data: bytes, expected: int) -> list[Outcome]:
    m = _versioned(unpack(data, "results"), "results")
    results = m.get("results")
    if not isinstance(results, list) or len(results) != expected:
        raise ProtocolViolation(f"results: expected an array of {expected} results")
    return [Outcome.from_wire(r) for r in results]


def encode_ack(seqs: list[int], failures: list[Failure]) -> bytes:
    return pack({"v": VERSION, "seqs": seqs, "failed": [f.to_wire() for f in failures]})


def decode_ack(data: bytes) -> tuple[list[int], list[Failure]]:
    m = _versioned(unpack(data, "ack"), "ack")
    seqs = m.get("seqs")
    if not isinstance(seqs, list) or len(seqs) > MAX_ACK or not all(type(s) is int for s in seqs):
        raise ProtocolViolation(f"ack.seqs: expected an array of at most {MAX_ACK} integers")
    failed = m.get("failed", [])
    if not isinstance(failed, list) or len(failed) > MAX_ACK:
        raise ProtocolViolation("ack.failed: expected an array")
    return seqs, [Failure.from_wire(f) for f in failed]


def encode_receipts(receipts: list[Receipt]) -> bytes:
    return pack({"v": VERSION, "receipts": [r.to_wire() for r in receipts]})


def decode_receipts(data: bytes) -> list[object]:
    """The raw receipts a relay sends up; each is checked on its own."""
    m = _versioned(unpack(data, "receipts"), "receipts")
    receipts = m.get("receipts")
    if not isinstance(receipts, list) or not receipts or len(receipts) > MAX_BATCH:
        raise ProtocolViolation(f"receipts.receipts: expected an array of 1 to {MAX_BATCH} receipts")
    return receipts


def encode_error(reason: str, detail: str) -> bytes:
    return pack({"v": VERSION, "error": reason, "detail": detail})


# -- field helpers ------------------------------------------------------------------


def _timestamp(value: object, name: str) -> float:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not (math.isfinite(value) and 0 <= value < MAX_SENT_AT)
    ):
        raise ProtocolViolation(f"{name}: expected a number of seconds since 1970, before year 10000")
    return float(value)


def _no_ext(code: int, data: bytes) -> None:
    raise ValueError(f"msgpack extension type {code} not allowed")


def _map(obj: object, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ProtocolViolation(f"{what}: expected a map")
    return obj


def _versioned(obj: object, what: str) -> dict[str, Any]:
    m = _map(obj, what)
    if m.get("v") != VERSION:
        raise ProtocolViolation(f"{what}.v: expected protocol version {VERSION}")
    return m


def _field(m: dict[str, Any], name: str, kind: type) -> Any:
    value = m.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolViolation(f"{name}: expected {kind.__name__}")
    return value


def _addresses(m: dict[str, Any], name: str) -> tuple[str, ...]:
    value = m.get(name)
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_RECIPIENTS:
        raise ProtocolViolation(f"{name}: expected 1 to {MAX_RECIPIENTS} addresses")
    if not all(is_address(a) for a in value):
        raise ProtocolViolation(f"{name}: expected addresses like user@domain")
    if len(set(value)) != len(value):
        raise ProtocolViolation(f"{name}: duplicate address")
    return tuple(value)

"""The relay<->hub routes: what each request of the national protocol looks
like on the wire, and how its answer is read.

Theory of operation
-------------------
`relay.core.protocol` says what the bodies contain; this module says which
request carries which body (docs/protocol.md §Endpoints is its prose twin).
It is sans-I/O: builders return methods, paths, headers and bodies, parsers
take a status and bytes.  The uplink (`relay.appliance`) sends through it,
the hub (`relay.hub.server`) routes and answers through it, and the tests'
hub client speaks it, so that the contract is written once.

The relay dials and asks; the hub only answers:

* ``POST /v1/transactions/{id}``: a batch of envelopes (`transaction`);
* ``GET /v1/inbox``: the long-lived stream of items (`inbox_headers`),
  framed as a concatenation of msgpack maps (`inbox_frame` on the hub's
  side, `InboxDecoder` on the relay's);
* ``POST /v1/ack``: positions the relay has committed (`ack`);
* ``POST /v1/receipts``: read receipts (`receipts`).

Answers.  A 200 carries the answer's body.  Anything else carries an error
body ``{v, error, detail}`` (`ErrorKind`), and means that nothing of the
request was stored; the reference relay treats every such status alike
(`HubAnswerError`): it closes the connection, backs off, reconnects and
sends the same request again, since every request is idempotent.  A 503
(the hub's store cannot commit) goes away by itself; a 400, 404 or 413 is
a bug on one side, which the relay reports in its status (``last_error``)
while it keeps retrying.  A relay the hub will not serve at all (unknown
domain, revoked certificate) is refused at the TLS level, before any
request: no status says it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from relay.core import protocol
from relay.core.protocol import InboxItem, ProtocolViolation

PATH_TRANSACTION = "/v1/transactions/"  # + transaction id
PATH_INBOX = "/v1/inbox"
PATH_ACK = "/v1/ack"
PATH_RECEIPTS = "/v1/receipts"

# The largest answer the relay reads to a transaction, an ack or a receipts
# request: 500 results are a few tens of KiB; this bounds a hostile hub.
ANSWER_LIMIT = 4 * 1024 * 1024

Headers = list[tuple[bytes, bytes]]


# -- requests (relay side) -----------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A whole request with a msgpack body, answered with a msgpack body of
    at most `ANSWER_LIMIT` bytes."""

    method: str
    path: str
    body: bytes
    content_type: bytes = protocol.MSGPACK


def transaction(txn_id: str, envelopes: list[protocol.Envelope]) -> Request:
    """A batch of envelopes under ``txn_id``.  The same id must always carry
    the same envelopes: the hub answers a replay from its record of the first."""
    return Request("POST", PATH_TRANSACTION + txn_id, protocol.encode_transaction(envelopes))


def ack(seqs: list[int], failures: list[protocol.Failure]) -> Request:
    """Inbox positions committed here, with the recipients that cannot be served."""
    return Request("POST", PATH_ACK, protocol.encode_ack(seqs, failures))


def receipts(items: list[protocol.Receipt]) -> Request:
    """Read receipts for the hub to route to the messages' origins."""
    return Request("POST", PATH_RECEIPTS, protocol.encode_receipts(items))


def inbox_headers(authority: str) -> Headers:
    """The HEADERS of ``GET /v1/inbox``, sent with END_STREAM: the stream
    then carries the hub's items until one side resets it."""
    return [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", authority.encode()),
        (b":path", PATH_INBOX.encode()),
        (b"accept", protocol.MSGPACK),
    ]


# -- answers (relay side) ------------------------------------------------------------


class HubAnswerError(Exception):
    """The hub answered a request with a status other than 200: the relay
    closes the connection and sends the request again on the next one."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def answer_body(request: Request, status: int, body: bytes) -> bytes:
    """The body of the hub's answer to ``request``; raises `HubAnswerError`
    unless the status is 200."""
    if status != 200:
        raise HubAnswerError(status, f"hub answered {status} to {request.path}: {error_text(body)}")
    return body


def check_inbox_status(status: int) -> None:
    """Raises `HubAnswerError` unless the inbox stream was answered 200."""
    if status != 200:
        raise HubAnswerError(status, f"hub answered {status} to the inbox request")


# What of an error answer reaches the relay's log and status: the hub words
# its details in a line; anything longer is cut, whoever wrote it.
ERROR_TEXT_CHARS = 300


def error_text(body: bytes) -> str:
    """An error body, for the log and the relay's status: ``reason: detail``."""
    try:
        answer = protocol.unpack(body, "error")
        text = f"{answer.get('error')}: {answer.get('detail')}"
        return text if len(text) <= ERROR_TEXT_CHARS else text[:ERROR_TEXT_CHARS] + "…"
    except (ProtocolViolation, AttributeError):
        return f"{len(body)} bytes of unreadable answer"


class InboxDecoder:
    """The relay's incremental decoder of the inbox stream: fed the DATA as
    it comes, it returns the items completed so far (an item may span
    several DATA frames, a frame may hold several items).

    Error handling: anything undecodable, or an item larger than the
    decoder's bound (`protocol.stream_unpacker`), raises `ProtocolViolation`;
    the decoder is then unusable, and the relay closes the connection."""

    def __init__(self) -> None:
        self._unpacker = protocol.stream_unpacker()

    def feed(self, data: bytes) -> list[InboxItem]:
        items: list[InboxItem] = []
        view = memoryview(data)
        try:
            for start in range(0, len(view), protocol.MAX_ITEM_BYTES):  # within the unpacker's bound
                self._unpacker.feed(view[start:start + protocol.MAX_ITEM_BYTES])
                items += [InboxItem.from_wire(obj) for obj in self._unpacker]
        except ProtocolViolation:
            raise
        except Exception as exc:  # noqa: BLE001 -- msgpack's own errors: BufferFull, ExtraData, ...
            raise ProtocolViolation(f"inbox stream: undecodable item ({exc.__class__.__name__})") from None
        return items


# -- routing and answers (hub side) --------------------------------------------------


class Route(enum.Enum):
    TRANSACTION = "transaction"
    INBOX = "inbox"
    ACK = "ack"
    RECEIPTS = "receipts"


def match(method: bytes | None, path: str) -> tuple[Route, str] | None:
    """The route of a request, and the transaction id for a transaction
    ("" otherwise); None when no route takes it (a 404).  Raises
    `ProtocolViolation` (a 400) for a transaction id that is not a token."""
    if method == b"POST" and path.startswith(PATH_TRANSACTION):
        txn_id = path[len(PATH_TRANSACTION):]
        if not protocol.is_token(txn_id):
            raise ProtocolViolation("transaction id: expected 8-64 characters of [A-Za-z0-9_-]")
        return Route.TRANSACTION, txn_id
    if method == b"GET" and path == PATH_INBOX:
        return Route.INBOX, ""
    if method == b"POST" and path == PATH_ACK:
        return Route.ACK, ""
    if method == b"POST" and path == PATH_RECEIPTS:
        return Route.RECEIPTS, ""
    return None


@dataclass(frozen=True)
class ErrorKind:
    """A refused request: its status and the machine-readable ``error``."""

    status: int
    reason: str

    def answer(self, detail: str) -> tuple[int, bytes]:
        """The status and body of the answer; ``detail`` is for humans."""
        return self.status, protocol.encode_error(self.reason, detail)


BAD_REQUEST = ErrorKind(400, "bad_request")  # breaks v1: nothing was stored
NOT_FOUND = ErrorKind(404, "not_found")  # no such method and path
TIMEOUT = ErrorKind(408, "timeout")  # the body did not arrive in time
TOO_LARGE = ErrorKind(413, "too_large")  # a body over its limit
UNAVAILABLE = ErrorKind(503, "unavailable")  # the hub's store cannot commit


def inbox_frame(seq: int, kind: str, payload: bytes) -> bytes:
    """One item of the inbox stream, built around the stored, already packed
    envelope or receipt (``kind`` "message" or "receipt") without decoding it."""
    return b"".join((_ITEM_START, protocol.pack(seq), _ITEM_KIND[kind], payload))


# The constant parts of an inbox frame: a msgpack map of three entries, and
# per kind the "kind" entry and the key of the payload.
_ITEM_START = b"\x83" + protocol.pack("seq")
_ITEM_KIND = {
    kind: protocol.pack("kind") + protocol.pack(kind) + protocol.pack(key)
    for kind, key in (("message", "envelope"), ("receipt", "receipt"))
}

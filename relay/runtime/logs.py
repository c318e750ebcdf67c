"""Log lines for journald and log collectors: one event per line, as
``key=value`` pairs (logfmt) or JSON, to stderr.

A line carries the time, the level, the logger, the message and any
fields the call passed as ``extra`` (``message_id`` above all, so that
every line about a message can be found by its id).  Message bodies,
tokens and keys are never passed to the logger in the first place.
"""

from __future__ import annotations

import json
import logging
import sys

from relay.core import timeformat
from relay.net.peerlog import PeerLogLimit

# Attributes every LogRecord has; anything else came from ``extra``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    fields: dict[str, object] = {
        "time": timeformat.iso(record.created),
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    fields.update((k, v) for k, v in vars(record).items() if k not in _STANDARD)
    if record.exc_info:
        fields["error"] = logging.Formatter().formatException(record.exc_info)
    return fields


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{key}={_logfmt_value(value)}" for key, value in _fields(record).items())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), ensure_ascii=False, default=str)


def _logfmt_value(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' ="\\\n'):
        return text
    return json.dumps(text, ensure_ascii=False)


def setup(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    handler.addFilter(PeerLogLimit())  # what a network peer can make us log is bounded
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())

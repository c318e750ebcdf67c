"""Log lines are structured: logfmt or JSON, one event per line."""

from __future__ import annotations

import json
import logging

from relay.runtime.logs import JsonFormatter, LogfmtFormatter


def _record(msg: str, *args, **extra) -> logging.LogRecord:
    record = logging.LogRecord("relay.local_api", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_logfmt_quotes_what_needs_it_and_carries_extra_fields() -> None:
    line = LogfmtFormatter().format(_record("accepted message %s from %s", "abc123", "alice@chu-nord.test",
                                           message_id="abc123"))
    assert line.startswith("time=") and "\n" not in line
    assert ' level=info logger=relay.local_api msg="accepted message abc123 from alice@chu-nord.test"' in line
    assert line.endswith(" message_id=abc123")


def test_json_lines_parse_back() -> None:
    line = JsonFormatter().format(_record('a "quoted"\nmessage', message_id="m-1"))
    event = json.loads(line)
    assert "\n" not in line
    assert (event["level"], event["logger"], event["msg"], event["message_id"]) == (
        "info", "relay.local_api", 'a "quoted"\nmessage', "m-1")

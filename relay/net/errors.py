"""Why a connection failed, in words: for the uplink's and the hub's logs,
``eimis-relay status`` and ``eimis-relay doctor``.

trio reports a TLS failure as a `trio.BrokenResourceError` whose cause is
the `ssl.SSLError`, and a deadline as a `trio.TooSlowError` with no message:
both are unwrapped or named here, once, so that every place that reports a
failed connection says the same thing about it.
"""

from __future__ import annotations

import ssl

import trio

from relay.core.errors import describe_error


def reason(exc: BaseException) -> str:
    """One line saying why a network operation failed."""
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: the peer's certificate was refused ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    return describe_error(exc)

"""Exceptions in words, for a log line, a status report or a CLI message.

One line each, without Python's ``[Errno N]`` noise: an operator reads
"ca.pem: No such file or directory", not a repr.  The network's own
exceptions (trio's, TLS's) are put in words by `relay.net.errors`, on top of
this.
"""

from __future__ import annotations


def describe_error(exc: BaseException) -> str:
    """The file and the system's reason for an `OSError`; else the message, or the exception's name if it has none."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc) or exc.__class__.__name__

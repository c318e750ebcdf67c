"""The values of the configuration's vocabulary: secrets that are never
printed, listen addresses and proxies, and the parsers that turn a TOML
value into one of them (names, addresses, URLs, token hashes), each raising
`Invalid` saying what was expected without repeating a secret.  The generic
parsers (numbers, durations, sizes) are in `relay.config.reader`; the
settings built from these are in `relay.config.model`.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from typing import Generic, TypeVar
from urllib.parse import SplitResult, unquote, urlsplit

from relay.config.reader import Invalid, Parser, expected, string
from relay.core.addresses import domain_of, is_address, is_domain, is_host

LOG_LEVELS = ("debug", "info", "warning", "error")


_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


_SYSTEM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


# What a `Secret` hides: a password (text) or a signing key (bytes).
Hidden = TypeVar("Hidden", str, bytes)


class Secret(Generic[Hidden]):
    """A value that must never be printed (a password, a signing key).

    Its repr and str are redacted, so that a configuration object, a log
    line or an exception message that happens to include it shows
    ``<redacted>``; the one way to the value is `reveal`, which the code
    that sends or uses it calls at the last moment."""

    __slots__ = ("_value",)

    def __init__(self, value: Hidden) -> None:
        self._value: Hidden = value

    def reveal(self) -> Hidden:
        return self._value

    def __repr__(self) -> str:
        return "Secret(<redacted>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(_as_bytes(self._value), _as_bytes(other.reveal()))

    def __hash__(self) -> int:
        return hash(self._value)


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def wrap_secret(instance: object, name: str) -> None:
    """Wrap a field given as a plain value (objects built by hand) in `Secret`."""
    value = getattr(instance, name)
    if value is not None and not isinstance(value, Secret):
        object.__setattr__(instance, name, Secret(value))


@dataclass(frozen=True)
class Address:
    """A TCP host and port; port 0 asks the system for any free port (tests use it)."""

    host: str
    port: int


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy reached with CONNECT, with optional Basic credentials."""

    host: str
    port: int
    username: str | None
    password: Secret[str] | None  # a plain str given here is wrapped

    def __post_init__(self) -> None:
        wrap_secret(self, "password")


domain = string("a DNS name", is_domain, fold_case=True)


host = string("a host name or IP address", is_host, fold_case=True)


log_level = string(f"one of {', '.join(LOG_LEVELS)}", LOG_LEVELS.__contains__)


log_format = string('"logfmt" or "json"', ("logfmt", "json").__contains__)


system_name = string("a name of letters, digits, '.', '_' and '-'", _SYSTEM_NAME.fullmatch)


def user_parser(domain: str | None) -> Parser[str]:
    """A parser of the users of a local system: addresses of the relay's domain, or "*".

    When the domain is itself invalid (None), any domain is accepted, so
    that the addresses are still checked for syntax.
    """

    def accept(text: str) -> bool:
        return text == "*" or (is_address(text) and domain in (None, domain_of(text)))

    where = f" at {domain}" if domain else ""
    return string(f'an address{where} or "*"', accept, fold_case=True)


def sha256_hex(value: object) -> bytes:
    if isinstance(value, str) and _SHA256_HEX.fullmatch(value):
        return bytes.fromhex(value)
    # Not repeated: a token pasted here instead of its hash would reach the logs.
    what = f"{len(value)} characters" if isinstance(value, str) else type(value).__name__
    raise Invalid(f"expected 64 hexadecimal digits (the SHA-256 hash of the token, never the token), got {what}")


def without_userinfo(value: object) -> object:
    """A URL as a problem may repeat it: any USER:PASSWORD@ replaced."""
    return re.sub(r"//[^/?#]*@", "//<redacted>@", value) if isinstance(value, str) else value


def address(value: object) -> Address:
    """Parse "HOST:PORT", or "[IPV6]:PORT" since an IPv6 address has colons of its own."""
    if isinstance(value, str):
        host, _, port = value.lower().rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            valid_host = ":" in host and is_host(host)  # a bracketed host must be IPv6
        else:
            valid_host = ":" not in host and is_host(host)
        if valid_host and port.isascii() and port.isdigit() and int(port) <= 65535:
            return Address(host, int(port))
    raise expected("HOST:PORT", value)


def _server_url(text: str, scheme: str) -> SplitResult | None:
    """Split SCHEME://[USER:PASSWORD@]HOST[:PORT][/], a URL naming a server rather than a resource."""
    try:
        url = urlsplit(text)
        valid = (
            url.scheme == scheme
            and is_host(url.hostname or "")
            and url.port != 0
            and url.path in ("", "/")
            and not url.query
            and not url.fragment
        )
    except ValueError:  # a bad port or IPv6 literal
        return None
    return url if valid else None


def hub_url(value: object) -> SplitResult:
    if not (isinstance(value, str) and value.lower().startswith("https://")):
        raise expected("an https:// URL", without_userinfo(value))
    url = _server_url(value, "https")
    if url is None or url.username is not None:
        raise expected("https://HOST or https://HOST:PORT", without_userinfo(value))
    return url


def proxy(value: object) -> Proxy:
    url = _server_url(value, "http") if isinstance(value, str) else None
    if url is None or url.port is None or (url.username is None) != (url.password is None):
        # The value is not repeated: it may hold a password, and problems get logged.
        raise Invalid("expected http://HOST:PORT or http://USER:PASSWORD@HOST:PORT")
    assert url.hostname is not None  # _server_url checked it
    if url.username is None:
        return Proxy(url.hostname, url.port, None, None)
    assert url.password is not None  # both or neither, checked above
    return Proxy(url.hostname, url.port, unquote(url.username), Secret(unquote(url.password)))


crl_stale = string('"fail" or "warn"', ("fail", "warn").__contains__)


org_id = string("an organisation identifier: 1 + FINESS or 3 + SIRET digits",
                 lambda text: re.fullmatch(r"1[0-9]{9}|3[0-9]{14}", text) is not None)


def webhook_url(value: object) -> str:
    try:
        url = urlsplit(value) if isinstance(value, str) else None
        valid = (
            url is not None
            and url.scheme in ("http", "https")
            and is_host(url.hostname or "")
            and url.port != 0
            and url.username is None
            and not url.fragment
        )
    except ValueError:  # a bad port or IPv6 literal
        valid = False
    if not valid or not isinstance(value, str):
        raise expected("an http:// or https:// URL, without USER:PASSWORD@", without_userinfo(value))
    return value

"""Configuration files of the relay and the hub.

Both are TOML. Loading checks everything up front and reports every problem
at once, each naming the file and the key, so that a sysadmin fixes a file in
one pass rather than restarting the daemon once per typo. Unknown keys are
errors too: a misspelt optional key would otherwise be silently ignored.

The results are immutable, so every task of the daemon can share them.

Fragments: besides ``X.toml`` the loader reads every ``X.d/*.toml`` (in
sorted order of names, dotfiles skipped) and merges them onto it: tables
key by key, a later file's scalar or array replacing an earlier one, arrays
of tables (``[[local_system]]``) put end to end. The Debian package relies
on it: it ships ``/etc/eimis-relay/relay.toml`` with comments only and never
changes it, and the admin's settings live in ``relay.d/``, which the package
does not own, so an upgrade never meets an edited conffile (and never stops
on dpkg's question about it). Each value remembers the file it came from: a
problem names that file, and a relative path in it is relative to its
directory. With no setting anywhere, loading fails with `NotConfigured`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import SplitResult, unquote, urlsplit

_LOG_LEVELS = ("debug", "info", "warning", "error")
_DEFAULT_LOG_LEVEL = "info"

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")
_LOCAL_PART = re.compile(r"[a-z0-9._+-]{1,64}")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_SYSTEM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ConfigError(Exception):
    """A configuration file is unusable; `problems` has one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class NotConfigured(ConfigError):
    """Neither the file nor its fragments hold a single setting: a fresh install.

    Its one problem is a whole sentence saying what to do, meant to be
    printed on its own rather than as one more problem of a file.
    """

    def __init__(self, path: Path, example: str) -> None:
        shipped = Path("/usr/share/doc/eimis-relay") / example  # where the Debian package puts it
        fragments = path.with_suffix(".d")
        super().__init__([
            f"eimis-relay is not configured yet: put your settings in {fragments}/NAME.toml "
            f"(see {shipped if shipped.exists() else example}), "
            f"then run: eimis-relay check-config --config {path}"
        ])


def defines_table(path: str | os.PathLike, name: str) -> bool:
    """Whether the file or one of its fragments has a [name] table; False when
    they cannot be read (loading them then says why)."""
    try:
        return name in _File(path).root
    except ConfigError:
        return False


def is_domain(text: str) -> bool:
    """Whether `text` is a lowercase DNS name of at least two labels.

    Lowercase only, so that names can be compared as plain strings; the
    loader lowercases what it reads before checking.
    """
    return len(text) <= 253 and _DOMAIN.fullmatch(text) is not None


def is_address(text: str) -> bool:
    """Whether `text` is a lowercase "local@domain" messaging address."""
    local, _, domain = text.rpartition("@")
    return _LOCAL_PART.fullmatch(local) is not None and is_domain(domain)


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2]


def _is_host(text: str) -> bool:
    """Whether `text` is an IP address or a lowercase host name (one label allowed, as in "localhost")."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return len(text) <= 253 and _HOSTNAME.fullmatch(text) is not None
    return True


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
    password: str | None


@dataclass(frozen=True)
class LocalSystem:
    """A messaging system of the hospital, allowed to use the local API.

    `users` holds the addresses listed for it; `all_users` says "*" was
    listed. Only a hash of its bearer token is kept, so that the
    configuration file is not itself a secret worth stealing.
    """

    name: str
    token_sha256: bytes
    users: frozenset[str]
    all_users: bool
    # The relay's domain, the only one "*" covers. The loader always sets it;
    # None, for objects built by hand, lets "*" cover any address.
    domain: str | None = None
    # Push delivery of this system's events: where, and the HMAC key that
    # signs each POST (read from webhook_secret_file; never printed).
    webhook_url: str | None = None
    webhook_secret: bytes | None = field(default=None, repr=False)
    webhook_timeout: float = 10.0  # one delivery attempt, connection to answer
    # Requests per second (average, bursts of rate_burst); 0: no limit.
    rate_limit: float = 0.0
    rate_burst: int = 100
    # The largest message body this system may send, in UTF-8 bytes.
    max_message_bytes: int = 256 * 1024

    def may_send_as(self, address: str) -> bool:
        """Whether this system may send messages from `address`."""
        address = address.lower()
        if address in self.users:
            return True
        return (
            self.all_users
            and is_address(address)
            and (self.domain is None or _domain_of(address) == self.domain)
        )

    def serves(self, address: str) -> bool:
        """Whether messages to `address` are delivered to this system.

        A system receives for exactly the users it sends as: a user's
        messaging system both sends and receives that user's messages.
        """
        return self.may_send_as(address)

    def token_matches(self, token: str) -> bool:
        """Whether `token` is this system's token, in time that does not depend on how much of it matches."""
        return hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self.token_sha256)


@dataclass(frozen=True)
class TlsPolicy:
    """How a national-link endpoint treats TLS versions and revocation.

    TLS 1.3 only unless allow_tls12 (then only ECDHE with AEAD suites, per
    ANSSI); peers are checked against the CRLs in crl_files, and a CRL past
    its next update either fails every handshake ("fail") or is used anyway
    with a warning ("warn").
    """

    allow_tls12: bool = False
    crl_files: tuple[Path, ...] = ()
    crl_stale: str = "fail"


@dataclass(frozen=True)
class Uplink:
    """How the relay reaches the hub; server_name is the name the hub's certificate must carry."""

    hub_url: str
    hub_host: str
    hub_port: int
    server_name: str
    ca_file: Path
    cert_file: Path
    key_file: Path
    proxy: Proxy | None = None
    connect_timeout: float = 10.0
    keepalive_interval: float = 20.0  # seconds between HTTP/2 PINGs
    keepalive_timeout: float = 10.0  # no PING ack within this: the connection is dead
    backoff_initial: float = 0.5
    backoff_max: float = 60.0
    batch_max: int = 500  # envelopes per transaction
    tls: TlsPolicy = TlsPolicy()
    # The organisation identifiers (subject OU) the hub's certificate may
    # carry; empty: any, as long as it chains to the national CA.
    hub_org_ids: frozenset[str] = frozenset()


@dataclass(frozen=True)
class LocalApi:
    """The HTTP API that the hospital's systems call; TLS files are both set or both None."""

    listen: Address = Address("127.0.0.1", 8080)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # With TLS: local systems must also present a certificate from this CA.
    tls_client_ca_file: Path | None = None
    max_body_bytes: int = 2 * 1024 * 1024
    max_connections: int = 256


@dataclass(frozen=True)
class Delivery:
    """Time limits of the delivery promise (docs/guarantees.md), in seconds."""

    message_ttl: float = 7 * 86400  # undelivered after this: failed, reason "expired"
    delay_warning: float = 15 * 60  # not delivered after this: a "delayed" event
    event_retention: float = 30 * 86400  # events a system never read are dropped after this
    audit_retention: float = 183 * 86400  # six months, the French norm for health messaging


@dataclass(frozen=True)
class StoreLimits:
    """The store's size ceiling; above high_water x max_bytes only urgent messages are taken."""

    max_bytes: int = 4 * 1024**3
    high_water: float = 0.8


@dataclass(frozen=True)
class MetricsEndpoint:
    """Where ``/metrics``, ``/healthz`` and ``/readyz`` are served; None: not at all.

    A listener of its own, so that the monitoring network never needs the
    local API's port (nor its tokens)."""

    listen: Address | None = None


@dataclass(frozen=True)
class RelayConfig:
    """A relay's configuration; state_dir None means the default chosen at startup."""

    path: Path
    domain: str
    state_dir: Path | None
    log_level: str
    log_format: str
    uplink: Uplink
    local_api: LocalApi
    local_systems: tuple[LocalSystem, ...]
    delivery: Delivery = Delivery()
    store: StoreLimits = StoreLimits()
    # SIGTERM: requests in flight get this long to finish before the exit.
    shutdown_grace: float = 10.0
    metrics: MetricsEndpoint = MetricsEndpoint()

    def system_for_token(self, token: str) -> LocalSystem | None:
        """The system whose token this is, if any.

        Every system is checked, without stopping at a match, so that the
        response time does not reveal which system a token belongs to.
        """
        matches = [system for system in self.local_systems if system.token_matches(token)]
        return matches[0] if matches else None

    def systems_serving(self, address: str) -> tuple[LocalSystem, ...]:
        """The systems that receive messages sent to `address`."""
        return tuple(system for system in self.local_systems if system.serves(address))


@dataclass(frozen=True)
class HubConfig:
    """The hub's configuration; state_dir None means the default chosen at startup."""

    path: Path
    name: str
    listen: Address
    state_dir: Path | None
    log_level: str
    ca_file: Path
    cert_file: Path
    key_file: Path
    domains: frozenset[str]
    learn_domains: bool
    keepalive_interval: float = 20.0
    keepalive_timeout: float = 10.0
    max_concurrent_streams: int = 100
    tls: TlsPolicy = TlsPolicy()
    audit_retention: float = 183 * 86400
    log_format: str = "logfmt"


def load_relay_config(path: str | os.PathLike) -> RelayConfig:
    """Read and check a relay's configuration file; raise ConfigError listing every problem."""
    file = _File(path)
    relay = file.root.table("relay")
    domain = relay.get("domain", _domain)
    state_dir = relay.get("state_dir", file.resolve, None)
    log_level = relay.get("log_level", _log_level, _DEFAULT_LOG_LEVEL)
    log_format = relay.get("log_format", _log_format, "logfmt")
    delivery = Delivery(
        message_ttl=relay.get("message_ttl", _duration, Delivery.message_ttl),
        delay_warning=relay.get("delay_warning", _duration, Delivery.delay_warning),
        event_retention=relay.get("event_retention", _duration, Delivery.event_retention),
        audit_retention=relay.get("audit_retention", _duration, Delivery.audit_retention),
    )
    uplink = _read_uplink(file.root.table("uplink"))
    local_api = _read_local_api(file.root.table("local_api", required=False))
    store = _read_store(file.root.table("store", required=False))
    local_systems = _read_local_systems(file.root.tables("local_system"), domain)
    shutdown_grace = relay.get("shutdown_grace", _duration, RelayConfig.shutdown_grace)
    metrics = _read_metrics(file.root.table("metrics", required=False))
    file.finish()
    return RelayConfig(
        path=file.path,
        domain=domain,
        state_dir=state_dir,
        log_level=log_level,
        log_format=log_format,
        uplink=uplink,
        local_api=local_api,
        local_systems=local_systems,
        delivery=delivery,
        store=store,
        shutdown_grace=shutdown_grace,
        metrics=metrics,
    )


def load_hub_config(path: str | os.PathLike) -> HubConfig:
    """Read and check the hub's configuration file; raise ConfigError listing every problem."""
    file = _File(path, example="hub.example.toml")
    hub = file.root.table("hub")
    domains = hub.get_list("domains", _domain, ())
    values = dict(
        name=hub.get("name", _domain),
        listen=hub.get("listen", _address),
        state_dir=hub.get("state_dir", file.resolve, None),
        log_level=hub.get("log_level", _log_level, _DEFAULT_LOG_LEVEL),
        log_format=hub.get("log_format", _log_format, "logfmt"),
        ca_file=hub.get("ca_file", file.resolve),
        cert_file=hub.get("cert_file", file.resolve),
        key_file=hub.get("key_file", file.resolve),
        learn_domains=hub.get("learn_domains", _boolean, False),
        tls=_read_tls_policy(hub),
        audit_retention=hub.get("audit_retention", _duration, HubConfig.audit_retention),
        keepalive_interval=hub.get("keepalive_interval", _seconds, HubConfig.keepalive_interval),
        keepalive_timeout=hub.get("keepalive_timeout", _seconds, HubConfig.keepalive_timeout),
        max_concurrent_streams=hub.get(
            "max_concurrent_streams", _integer(1, 1000), HubConfig.max_concurrent_streams
        ),
    )
    file.finish()
    return HubConfig(path=file.path, domains=frozenset(domains), **values)


def _read_uplink(table: _Table) -> Uplink | None:
    hub = table.get("hub_url", _hub_url)
    server_name = table.get("server_name", _host, None)
    backoff_initial = table.get("backoff_initial", _seconds, Uplink.backoff_initial)
    backoff_max = table.get("backoff_max", _seconds, Uplink.backoff_max)
    if None not in (backoff_initial, backoff_max) and backoff_max < backoff_initial:
        table.problem(
            "backoff_max", f"expected seconds >= backoff_initial ({backoff_initial}), got {backoff_max!r}"
        )
    values = dict(
        ca_file=table.get("ca_file", table.file.resolve),
        cert_file=table.get("cert_file", table.file.resolve),
        key_file=table.get("key_file", table.file.resolve),
        proxy=table.get("proxy", _proxy, None),
        connect_timeout=table.get("connect_timeout", _seconds, Uplink.connect_timeout),
        keepalive_interval=table.get("keepalive_interval", _seconds, Uplink.keepalive_interval),
        keepalive_timeout=table.get("keepalive_timeout", _seconds, Uplink.keepalive_timeout),
        batch_max=table.get("batch_max", _integer(1, 500), Uplink.batch_max),
        tls=_read_tls_policy(table),
        hub_org_ids=frozenset(table.get_list("hub_org_ids", _org_id, ())),
    )
    if not table.valid:  # the load fails; there is nothing to build
        return None
    return Uplink(
        hub_url=hub.geturl(),
        hub_host=hub.hostname,
        hub_port=443 if hub.port is None else hub.port,
        server_name=server_name or hub.hostname,
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
        **values,
    )


def _read_tls_policy(table: _Table) -> TlsPolicy:
    return TlsPolicy(
        allow_tls12=table.get("allow_tls12", _boolean, False),
        crl_files=table.get_list("crl_files", table.file.resolve, ()),
        crl_stale=table.get("crl_stale", _crl_stale, "fail"),
    )


def _read_local_api(table: _Table) -> LocalApi | None:
    for key, other in [("tls_cert_file", "tls_key_file"), ("tls_key_file", "tls_cert_file"),
                       ("tls_cert_file", "tls_client_ca_file")]:
        if other in table and key not in table:
            table.problem(key, f"missing, required when {other} is set")
    values = dict(
        listen=table.get("listen", _address, LocalApi.listen),
        tls_cert_file=table.get("tls_cert_file", table.file.resolve, None),
        tls_key_file=table.get("tls_key_file", table.file.resolve, None),
        tls_client_ca_file=table.get("tls_client_ca_file", table.file.resolve, None),
        max_body_bytes=table.get("max_body_bytes", _integer(1), LocalApi.max_body_bytes),
        max_connections=table.get("max_connections", _integer(1), LocalApi.max_connections),
    )
    return LocalApi(**values) if table.valid else None


def _read_store(table: _Table) -> StoreLimits | None:
    values = dict(
        max_bytes=table.get("max_size", _size, StoreLimits.max_bytes),
        high_water=table.get("high_water", _fraction, StoreLimits.high_water),
    )
    return StoreLimits(**values) if table.valid else None


def _read_metrics(table: _Table) -> MetricsEndpoint | None:
    listen = table.get("listen", _address, None)
    return MetricsEndpoint(listen) if table.valid else None


def _read_local_systems(tables: list[_Table], domain: str | None) -> tuple[LocalSystem, ...]:
    """Read the [[local_system]] tables.

    Names must be unique so that logs are unambiguous, token hashes so that a
    token identifies one system.
    """
    parse_user = _user_parser(domain)
    names: dict[str, _Table] = {}
    tokens: dict[bytes, _Table] = {}
    systems = []
    for table in tables:
        name = table.get("name", _system_name)
        token_sha256 = table.get("token_sha256", _sha256_hex)
        users = table.get_list("users", parse_user)
        if users == ():
            table.problem("users", 'expected at least one address or "*", got []')
        webhook_url = table.get("webhook_url", _webhook_url, None)
        secret_file = table.get("webhook_secret_file", table.file.resolve, None)
        if webhook_url is not None and secret_file is None:
            table.problem("webhook_secret_file", "missing, required when webhook_url is set")
        secret = _read_secret(table, "webhook_secret_file", secret_file) if secret_file else None
        webhook_timeout = table.get("webhook_timeout", _duration, LocalSystem.webhook_timeout)
        rate_limit = table.get("rate_limit", _non_negative, LocalSystem.rate_limit)
        rate_burst = table.get("rate_burst", _integer(1), LocalSystem.rate_burst)
        max_message_bytes = table.get("max_message_bytes", _integer(1, 256 * 1024), LocalSystem.max_message_bytes)
        _require_unique(table, "name", name, names)
        _require_unique(table, "token_sha256", token_sha256, tokens)
        if table.valid:
            systems.append(
                LocalSystem(
                    name=name,
                    token_sha256=token_sha256,
                    users=frozenset(users) - {"*"},
                    all_users="*" in users,
                    domain=domain,
                    webhook_url=webhook_url,
                    webhook_secret=secret,
                    webhook_timeout=webhook_timeout,
                    rate_limit=rate_limit,
                    rate_burst=rate_burst,
                    max_message_bytes=max_message_bytes,
                )
            )
    return tuple(systems)


def _require_unique(table: _Table, key: str, value: object, seen: dict[Any, _Table]) -> None:
    if value is not None and (first := seen.setdefault(value, table)) is not table:
        elsewhere = "" if first.origin == table.origin else f" in {table.file.name_of(first.origin)}"
        table.problem(key, f"same {key} as {first.label}{elsewhere}")


# Field parsers: each turns a TOML value into a typed one, or raises _Invalid
# saying what was expected.

_T = TypeVar("_T")
_Parser = Callable[[Any], _T]


class _Invalid(Exception):
    """A value is not what its key needs; the message says what was expected."""


def _expected(what: str, value: object) -> _Invalid:
    return _Invalid(f"expected {what}, got {value!r}")


def _string(what: str, accept: Callable[[str], object], *, fold_case: bool = False) -> _Parser[str]:
    """A parser of strings that `accept` approves; `fold_case` for case-insensitive names."""

    def parse(value: object) -> str:
        if isinstance(value, str):
            text = value.lower() if fold_case else value
            if accept(text):
                return text
        raise _expected(what, value)

    return parse


_domain = _string("a DNS name", is_domain, fold_case=True)
_host = _string("a host name or IP address", _is_host, fold_case=True)
_log_level = _string(f"one of {', '.join(_LOG_LEVELS)}", _LOG_LEVELS.__contains__)
_log_format = _string('"logfmt" or "json"', ("logfmt", "json").__contains__)
_system_name = _string("a name of letters, digits, '.', '_' and '-'", _SYSTEM_NAME.fullmatch)


def _user_parser(domain: str | None) -> _Parser[str]:
    """A parser of the users of a local system: addresses of the relay's domain, or "*".

    When the domain is itself invalid (None), any domain is accepted, so
    that the addresses are still checked for syntax.
    """

    def accept(text: str) -> bool:
        return text == "*" or (is_address(text) and domain in (None, _domain_of(text)))

    where = f" at {domain}" if domain else ""
    return _string(f'an address{where} or "*"', accept, fold_case=True)


def _sha256_hex(value: object) -> bytes:
    if isinstance(value, str) and _SHA256_HEX.fullmatch(value):
        return bytes.fromhex(value)
    raise _expected("64 hexadecimal digits (a SHA-256 hash)", value)


def _address(value: object) -> Address:
    """Parse "HOST:PORT", or "[IPV6]:PORT" since an IPv6 address has colons of its own."""
    if isinstance(value, str):
        host, _, port = value.lower().rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            valid_host = ":" in host and _is_host(host)  # a bracketed host must be IPv6
        else:
            valid_host = ":" not in host and _is_host(host)
        if valid_host and port.isascii() and port.isdigit() and int(port) <= 65535:
            return Address(host, int(port))
    raise _expected("HOST:PORT", value)


def _server_url(text: str, scheme: str) -> SplitResult | None:
    """Split SCHEME://[USER:PASSWORD@]HOST[:PORT][/], a URL naming a server rather than a resource."""
    try:
        url = urlsplit(text)
        valid = (
            url.scheme == scheme
            and _is_host(url.hostname or "")
            and url.port != 0
            and url.path in ("", "/")
            and not url.query
            and not url.fragment
        )
    except ValueError:  # a bad port or IPv6 literal
        return None
    return url if valid else None


def _hub_url(value: object) -> SplitResult:
    if not (isinstance(value, str) and value.lower().startswith("https://")):
        raise _expected("an https:// URL", value)
    url = _server_url(value, "https")
    if url is None or url.username is not None:
        raise _expected("https://HOST or https://HOST:PORT", value)
    return url


def _proxy(value: object) -> Proxy:
    url = _server_url(value, "http") if isinstance(value, str) else None
    if url is None or url.port is None or (url.username is None) != (url.password is None):
        # The value is not repeated: it may hold a password, and problems get logged.
        raise _Invalid("expected http://HOST:PORT or http://USER:PASSWORD@HOST:PORT")
    if url.username is None:
        return Proxy(url.hostname, url.port, None, None)
    return Proxy(url.hostname, url.port, unquote(url.username), unquote(url.password))


def _seconds(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf:
        return float(value)
    raise _expected("seconds > 0", value)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZES = {"": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _duration(value: object) -> float:
    """Seconds, or a string such as "90s", "15m", "12h", "7d"."""
    if isinstance(value, str) and (match := re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", value.strip())):
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
        if seconds > 0:
            return seconds
    elif isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf:
        return float(value)
    raise _expected('a duration > 0 (seconds, or a string like "15m", "12h", "7d")', value)


def _size(value: object) -> int:
    """Bytes, or a string such as "500MiB", "2GiB", "10GB"."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and (match := re.fullmatch(r"(\d+)\s*([kmg]i?b)?", value.strip().lower())):
        size = int(match.group(1)) * _SIZES[match.group(2) or ""]
        if size > 0:
            return size
    raise _expected('a size > 0 (bytes, or a string like "500MiB", "2GiB")', value)


_crl_stale = _string('"fail" or "warn"', ("fail", "warn").__contains__)
_org_id = _string("an organisation identifier: 1 + FINESS or 3 + SIRET digits",
                  lambda text: re.fullmatch(r"1[0-9]{9}|3[0-9]{14}", text) is not None)


def _non_negative(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < math.inf:
        return float(value)
    raise _expected("a number >= 0", value)


def _fraction(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1:
        return float(value)
    raise _expected("a fraction > 0 and <= 1", value)


def _webhook_url(value: object) -> str:
    try:
        url = urlsplit(value) if isinstance(value, str) else None
        valid = (
            url is not None
            and url.scheme in ("http", "https")
            and _is_host(url.hostname or "")
            and url.port != 0
            and url.username is None
            and not url.fragment
        )
    except ValueError:  # a bad port or IPv6 literal
        valid = False
    if not valid:
        raise _expected("an http:// or https:// URL", value)
    return value


def _read_secret(table: _Table, key: str, path: Path) -> bytes | None:
    """A secret kept in its own file, which only the relay's user may read."""
    try:
        mode = path.stat().st_mode
        secret = path.read_bytes().strip()
    except OSError as error:
        table.problem(key, f"cannot read {path}: {error.strerror or error}")
        return None
    if mode & 0o077:
        table.problem(key, f"{path} is readable by group or others (mode {mode & 0o777:o}); chmod 600 it")
    elif len(secret) < 16:
        table.problem(key, f"{path} holds fewer than 16 bytes: too short for a signing key")
    return secret


def _integer(low: int, high: int | None = None) -> _Parser[int]:
    what = f"an integer {low}..{high}" if high is not None else f"an integer >= {low}"

    def parse(value: object) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            if low <= value and (high is None or value <= high):
                return value
        raise _expected(what, value)

    return parse


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise _expected("true or false", value)


def _array(value: object) -> list:
    if isinstance(value, list):
        return value
    raise _expected("an array", value)


def _table(value: object) -> dict:
    if isinstance(value, dict):
        return value
    raise _expected("a table", value)


def _array_of_tables(value: object) -> list[dict]:
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
        return value
    raise _expected("an array of tables", value)


_REQUIRED: Any = object()  # the default of a key that must be present


class _Merged(dict):
    """A table merged from several files: `origins` names the file each key's
    value came from, `origin` the first file that gave the table anything, and
    `index` the position of an item of an array of tables in its own file."""

    def __init__(self, origin: Path | None, index: int | None = None) -> None:
        super().__init__()
        self.origin = origin
        self.origins: dict[str, Path] = {}
        self.index = index


def _merge(into: _Merged, data: dict[str, Any], origin: Path) -> None:
    """Merge one file's `data` onto what the files before it gave."""
    if into.origin is None and data:
        into.origin = origin
    for key, value in data.items():
        old = into.get(key)
        if isinstance(old, _Merged) and isinstance(value, dict):
            _merge(old, value, origin)
        elif _is_tables(old) and _is_tables(value):
            old.extend(_merged(item, origin, index) for index, item in enumerate(value))
        else:
            into[key] = _tagged(value, origin)
            into.origins[key] = origin


def _index_in_file(data: dict[str, Any], index: int) -> int:
    own = getattr(data, "index", None)
    return index if own is None else own


def _is_tables(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) for item in value)


def _tagged(value: Any, origin: Path) -> Any:
    """`value` with its tables turned into _Merged ones that know `origin`."""
    if isinstance(value, dict):
        return _merged(value, origin)
    if _is_tables(value):
        return [_merged(item, origin, index) for index, item in enumerate(value)]
    return value


def _merged(data: dict[str, Any], origin: Path, index: int | None = None) -> _Merged:
    table = _Merged(origin, index)
    _merge(table, data, origin)
    return table


class _File:
    """A configuration file and its fragments being read: where they are, and
    the problems found so far."""

    def __init__(self, path: str | os.PathLike, example: str = "config.example.toml") -> None:
        self.path = Path(path).absolute()
        self.problems: list[str] = []
        self.tables: list[_Table] = []
        self.reading = self.path  # the file of the value being parsed: `resolve` is relative to it
        data = _Merged(None)
        unreadable = []
        for file in [self.path, *self._fragments()]:
            try:
                _merge(data, self._parse(file), file)
            except ConfigError as error:
                unreadable += error.problems
        if unreadable:
            raise ConfigError(unreadable)
        if not data:
            raise NotConfigured(self.path, example)
        self.root = _Table(self, "", data)

    def _fragments(self) -> list[Path]:
        """X.d/*.toml for X.toml, sorted by name; none when there is no such directory."""
        directory = self.path.with_suffix(".d")
        try:
            names = sorted(entry.name for entry in os.scandir(directory) if entry.is_file())
        except FileNotFoundError:
            return []
        except OSError as error:
            raise ConfigError([f"{directory.name}: cannot read {directory}: {error.strerror or error}"]) from None
        return [directory / name for name in names if name.endswith(".toml") and not name.startswith(".")]

    def _parse(self, path: Path) -> dict[str, Any]:
        name = self.name_of(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            reason = error.strerror or error
            raise ConfigError([f"{name}: cannot read {path}: {reason}"]) from None
        except UnicodeDecodeError:
            raise ConfigError([f"{name}: not UTF-8 text"]) from None
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError([f"{name}: invalid TOML: {error}"]) from None

    def name_of(self, path: Path) -> str:
        """How problems name a file: "relay.toml", or "relay.d/10-site.toml" for a fragment."""
        return path.name if path == self.path else f"{path.parent.name}/{path.name}"

    def problem(self, where: str, message: str, origin: Path | None = None) -> None:
        self.problems.append(f"{self.name_of(origin or self.path)}: {where}: {message}")

    def resolve(self, value: object) -> Path:
        """Parse a path; a relative one is relative to the file it is written in, so that a config moves with its files."""
        if isinstance(value, str) and value:
            return self.reading.parent / value
        raise _expected("a path", value)

    def finish(self) -> None:
        """Report the keys nobody read, then raise ConfigError if anything was wrong."""
        for table in self.tables:
            for key, value in table.unread():
                table.problem(key, "unknown table" if isinstance(value, dict) else "unknown key")
        if self.problems:
            raise ConfigError(self.problems)


class _Table:
    """Reads the keys of one TOML table, reporting problems under its label, e.g. "[uplink]".

    Keys read are remembered, so that the others can be reported as unknown.
    `valid` turns false once a problem is found in the table: readers then
    skip building an object from it, as the load is going to fail anyway.
    """

    def __init__(self, file: _File, label: str, data: dict[str, Any], *, present: bool = True) -> None:
        self.file = file
        self.label = label
        self.valid = present
        self._present = present
        self._data = data
        self._read: set[str] = set()
        # Which file each key came from; an absent table's problems go to the first file.
        self.origin: Path = getattr(data, "origin", None) or file.path
        self._origins: dict[str, Path] = getattr(data, "origins", {})
        file.tables.append(self)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def where(self, key: str) -> str:
        return f"{self.label}.{key}" if self.label else f"[{key}]"

    def problem(self, key: str, message: str) -> None:
        """Report a problem with `key` (or "key[2]"), naming the file it came
        from, or for a missing key the file that holds the table."""
        self.file.problem(self.where(key), message, self._origins.get(key.partition("[")[0], self.origin))
        self.valid = False

    def get(self, key: str, parse: _Parser[_T], default: _T = _REQUIRED) -> _T | None:
        """The parsed value of `key`, `default` when absent, or None after reporting a problem."""
        self._read.add(key)
        if key not in self._data:
            # The keys of a missing table are not reported: the table was.
            if default is _REQUIRED and self._present:
                self.problem(key, "missing required key")
            return None if default is _REQUIRED else default
        self.file.reading = self._origins.get(key, self.origin)
        try:
            return parse(self._data[key])
        except _Invalid as invalid:
            self.problem(key, str(invalid))
            return None

    def get_list(
        self, key: str, parse_item: _Parser[_T], default: tuple[_T, ...] = _REQUIRED
    ) -> tuple[_T, ...] | None:
        """Like get, for an array; each bad item is a problem of its own, e.g. "users[2]"."""
        items = self.get(key, _array, default)
        if items is None:
            return None
        values = []
        for index, item in enumerate(items):
            try:
                values.append(parse_item(item))
            except _Invalid as invalid:
                self.problem(f"{key}[{index}]", str(invalid))
        return tuple(values) if len(values) == len(items) else None

    def table(self, key: str, *, required: bool = True) -> _Table:
        """A sub-table; an absent optional one reads as empty, so its keys take their defaults."""
        data = self.get(key, _table, _REQUIRED if required else {})
        return _Table(self.file, self.where(key), data or {}, present=data is not None)

    def tables(self, key: str) -> list[_Table]:
        """The tables of an optional array of tables ([[key]] in TOML)."""
        items = self.get(key, _array_of_tables, []) or []
        # Numbered within their own file, which is the one their problems name.
        return [_Table(self.file, f"{self.where(key)}[{_index_in_file(data, index)}]", data)
                for index, data in enumerate(items)]

    def unread(self) -> list[tuple[str, Any]]:
        return [(key, value) for key, value in self._data.items() if key not in self._read]

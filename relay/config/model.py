"""Configuration of the relay and the hub: what each file may say, and what it becomes.

Both are TOML files, read with their ``X.d/*.toml`` fragments by
`relay.config.reader`, which reports every problem at once, each naming the
file and the key, and raises ConfigError. Here are the keys each table
takes, the values each key accepts, and the checks that involve several keys
(a backoff_max below backoff_initial, two systems with the same token).

The results are immutable, so every task of the daemon can share them.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from relay.config import vocabulary
from relay.config.reader import (
    ConfigFile,
    Table,
    boolean,
    duration,
    expected,
    fraction,
    integer,
    non_negative,
    seconds,
    size,
)
from relay.config.vocabulary import Address, Proxy, Secret
from relay.core.addresses import domain_of, is_address

_DEFAULT_LOG_LEVEL = "info"


@dataclass(frozen=True)
class LocalSystem:
    """A messaging system of the hospital, allowed to use the local API.

    `users` holds the addresses listed for it; `all_users` says "*" was
    listed. Only a hash of its bearer token is kept, so that the
    configuration file is not itself a secret worth stealing.
    """

    name: str
    token_sha256: bytes = field(repr=False)  # a hash, but of a secret: kept out of logs all the same
    users: frozenset[str]
    all_users: bool
    # The relay's domain, the only one "*" covers. The loader always sets it;
    # None, for objects built by hand, lets "*" cover any address.
    domain: str | None = None
    # Push delivery of this system's events: where, and the HMAC key that
    # signs each POST (read from webhook_secret_file; never printed).
    webhook_url: str | None = field(default=None, repr=False)  # its path or query may hold a credential
    webhook_secret: Secret[bytes] | None = None  # plain bytes given here are wrapped
    webhook_timeout: float = 10.0  # one delivery attempt, connection to answer
    # Requests per second (average, bursts of rate_burst); 0: no limit.
    rate_limit: float = 0.0
    rate_burst: int = 100
    # The largest message body this system may send, in UTF-8 bytes.
    max_message_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        vocabulary.wrap_secret(self, "webhook_secret")

    def may_send_as(self, address: str) -> bool:
        """Whether this system may send messages from `address`."""
        address = address.lower()
        if address in self.users:
            return True
        return (
            self.all_users
            and is_address(address)
            and (self.domain is None or domain_of(address) == self.domain)
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
    # No answer to a request (a transaction, receipts, an ack) within this:
    # the connection is given up as broken and the request replayed on a new one.
    request_timeout: float = 60.0
    backoff_initial: float = 0.5
    backoff_max: float = 5.0
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
    # Serve without TLS on an address other machines reach: see cleartext_problems.
    allow_cleartext_on_network: bool = False


@dataclass(frozen=True)
class Delivery:
    """Time limits of the delivery promise (docs/guarantees.md), in seconds."""

    message_ttl: float = 7 * 86400  # undelivered after this: failed, reason "expired"
    delay_warning: float = 15 * 60  # not delivered after this: a "delayed" event
    event_retention: float = 30 * 86400  # events a system never read are dropped after this
    audit_retention: float = 183 * 86400  # six months, the French norm for health messaging
    # A failed message's body is kept this long after the failure, for
    # `eimis-relay queue retry`; at most event_retention (docs/guarantees.md).
    retry_window: float = 7 * 86400


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
    # It has no TLS: an address other machines reach takes this opt-in.
    allow_cleartext_on_network: bool = False


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
    # Seconds between sweeps of the queue for expired messages (and of the
    # audit trail for old entries).  A message is failed at most this long
    # after its sweep time; a tenth of a second to an hour.
    expiry_interval: float = 30.0
    # The hub's own bounds (docs/security.md): TCP connections held at once,
    # authenticated connections per relay domain, TLS handshakes in progress
    # at once and the time each may take.  A connection not yet
    # authenticated is the first to go when a limit is reached.
    max_connections: int = 2000
    max_connections_per_domain: int = 4
    max_handshakes: int = 100
    handshake_timeout: float = 10.0
    # How long transaction answers and the duplicate filter are kept, and
    # so how old (by its sent_at) an envelope the hub still takes may be:
    # longer than any relay retries (its message_ttl and expiry grace);
    # docs/protocol.md, "Replays".  At least REPLAY_WINDOW_MIN.
    replay_window: float = 30 * 86400
    metrics: MetricsEndpoint = MetricsEndpoint()


EXPIRY_INTERVALS = (0.1, 3600.0)
HANDSHAKE_TIMEOUTS = (0.5, 60.0)
# The reference relay, with its defaults, sends an envelope until 21 days
# after accepting it (its ``sent_at``): its time-to-live (7 days), then a
# `queue retry` within the retry window (7 days) gives it another 7.  A
# shorter window would refuse those last retries as expired.
REPLAY_WINDOW_MIN = 22 * 86400


def _handshake_timeout(value: object) -> float:
    low, high = HANDSHAKE_TIMEOUTS
    if isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high:
        return float(value)
    raise expected(f"seconds between {low:g} and {high:g}", value)


def _replay_window(value: object) -> float:
    seconds = duration(value)
    if seconds < REPLAY_WINDOW_MIN:
        raise expected(f"a duration of at least {REPLAY_WINDOW_MIN // 86400} days", value)
    return seconds


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host`` ("localhost", 127.0.0.0/8, ::1).

    Anything else, "0.0.0.0" and "::" first, another machine may reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: whatever it resolves to is on some network
        return False


def cleartext_listeners(config: RelayConfig) -> list[tuple[str, Address, bool]]:
    """The relay's listeners that speak HTTP without TLS on an address other
    machines reach: (table of the setting, address, whether the admin opted in)."""
    return [(table, address, allowed) for table, address, allowed, _ in _cleartext(config.local_api, config.metrics)]


def cleartext_problems(config: RelayConfig) -> list[str]:
    """The listeners `cleartext_listeners` finds without the opt-in, one
    sentence each naming the setting (what the loader refuses; `run_relay`
    asks again for configurations built by hand)."""
    return [f"{table}.listen: {problem}" for table, _, allowed, problem in
            _cleartext(config.local_api, config.metrics) if not allowed]


def _cleartext(local: LocalApi, metrics: MetricsEndpoint) -> list[tuple[str, Address, bool, str]]:
    """The local API carries bearer tokens and clinical text, the metrics
    listener the queue sizes and the state of the link to the hub; on a
    hospital network either is readable by anyone on the path. So neither
    may listen in cleartext beyond loopback unless
    ``allow_cleartext_on_network = true`` says the admin knows
    (docs/security.md, "The local network")."""
    found = []
    if local.tls_cert_file is None and not is_loopback(local.listen.host):
        found.append(("[local_api]", local.listen, local.allow_cleartext_on_network,
                      "bearer tokens and message bodies", ", set tls_cert_file and tls_key_file"))
    if metrics.listen is not None and not is_loopback(metrics.listen.host):
        found.append(("[metrics]", metrics.listen, metrics.allow_cleartext_on_network,
                      "the queue sizes and the state of the link to the hub", ""))
    return [(table, address, allowed,
             f'"{_shown(address)}" serves HTTP without TLS on the network: {exposes} would cross it '
             f"unencrypted; listen on 127.0.0.1{tls}, or set allow_cleartext_on_network = true in {table} "
             "to accept that")
            for table, address, allowed, exposes, tls in found]


def _shown(address: Address) -> str:
    return f"[{address.host}]:{address.port}" if ":" in address.host else f"{address.host}:{address.port}"


def _expiry_interval(value: object) -> float:
    low, high = EXPIRY_INTERVALS
    if isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high:
        return float(value)
    raise expected(f"seconds between {low:g} and {high:g}", value)


def load_relay_config(path: str | os.PathLike) -> RelayConfig:
    """Read and check a relay's configuration file; raise ConfigError listing every problem."""
    file = ConfigFile(path)
    relay = file.root.table("relay")
    domain = relay.get("domain", vocabulary.domain)
    state_dir = relay.get("state_dir", file.resolve, None)
    log_level = relay.get("log_level", vocabulary.log_level, _DEFAULT_LOG_LEVEL)
    log_format = relay.get("log_format", vocabulary.log_format, "logfmt")
    delivery = Delivery(
        message_ttl=relay.get("message_ttl", duration, Delivery.message_ttl),
        delay_warning=relay.get("delay_warning", duration, Delivery.delay_warning),
        event_retention=relay.get("event_retention", duration, Delivery.event_retention),
        audit_retention=relay.get("audit_retention", duration, Delivery.audit_retention),
    )
    # A destination recognises a retry of a message it has while it keeps it
    # (its event_retention): later, a retry could show it twice.
    retry_window = relay.get("retry_window", duration, None)
    if retry_window is not None and retry_window > delivery.event_retention:
        relay.problem("retry_window", "must not be longer than event_retention")
    delivery = replace(delivery, retry_window=min(delivery.event_retention,
                                                  Delivery.retry_window if retry_window is None else retry_window))
    uplink = _read_uplink(file.root.table("uplink"))
    local_table = file.root.table("local_api", required=False)
    local_api = _read_local_api(local_table)
    store = _read_store(file.root.table("store", required=False))
    local_systems = _read_local_systems(file.root.tables("local_system"), domain)
    shutdown_grace = relay.get("shutdown_grace", duration, RelayConfig.shutdown_grace)
    metrics_table = file.root.table("metrics", required=False)
    metrics = _read_metrics(metrics_table)
    if local_api is not None and metrics is not None:
        tables = {"[local_api]": local_table, "[metrics]": metrics_table}
        for table, _, allowed, problem in _cleartext(local_api, metrics):
            if not allowed:
                tables[table].problem("listen", problem)
    file.finish()
    # finish() raised if any table had a problem: each was built.
    assert uplink is not None and local_api is not None and store is not None and metrics is not None
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
    file = ConfigFile(path, example="hub.example.toml")
    hub = file.root.table("hub")
    domains = hub.get_list("domains", vocabulary.domain, ())
    values: dict[str, Any] = dict(
        name=hub.get("name", vocabulary.domain),
        listen=hub.get("listen", vocabulary.address),
        state_dir=hub.get("state_dir", file.resolve, None),
        log_level=hub.get("log_level", vocabulary.log_level, _DEFAULT_LOG_LEVEL),
        log_format=hub.get("log_format", vocabulary.log_format, "logfmt"),
        ca_file=hub.get("ca_file", file.resolve),
        cert_file=hub.get("cert_file", file.resolve),
        key_file=hub.get("key_file", file.resolve),
        learn_domains=hub.get("learn_domains", boolean, False),
        tls=_read_tls_policy(hub),
        audit_retention=hub.get("audit_retention", duration, HubConfig.audit_retention),
        keepalive_interval=hub.get("keepalive_interval", seconds, HubConfig.keepalive_interval),
        keepalive_timeout=hub.get("keepalive_timeout", seconds, HubConfig.keepalive_timeout),
        max_concurrent_streams=hub.get(
            "max_concurrent_streams", integer(1, 1000), HubConfig.max_concurrent_streams
        ),
        expiry_interval=hub.get("expiry_interval", _expiry_interval, HubConfig.expiry_interval),
        max_connections=hub.get("max_connections", integer(1, 100_000), HubConfig.max_connections),
        max_connections_per_domain=hub.get("max_connections_per_domain", integer(1, 100),
                                           HubConfig.max_connections_per_domain),
        max_handshakes=hub.get("max_handshakes", integer(1, 10_000), HubConfig.max_handshakes),
        handshake_timeout=hub.get("handshake_timeout", _handshake_timeout, HubConfig.handshake_timeout),
        replay_window=hub.get("replay_window", _replay_window, HubConfig.replay_window),
        metrics=_read_metrics(file.root.table("metrics", required=False)),
    )
    file.finish()
    return HubConfig(path=file.path, domains=frozenset(domains), **values)


def _read_uplink(table: Table) -> Uplink | None:
    hub = table.get("hub_url", vocabulary.hub_url)
    server_name = table.get("server_name", vocabulary.host, None)
    backoff_initial = table.get("backoff_initial", seconds, Uplink.backoff_initial)
    backoff_max = table.get("backoff_max", seconds, Uplink.backoff_max)
    if None not in (backoff_initial, backoff_max) and backoff_max < backoff_initial:
        table.problem(
            "backoff_max", f"expected seconds >= backoff_initial ({backoff_initial}), got {backoff_max!r}"
        )
    values: dict[str, Any] = dict(
        ca_file=table.get("ca_file", table.file.resolve),
        cert_file=table.get("cert_file", table.file.resolve),
        key_file=table.get("key_file", table.file.resolve),
        proxy=table.get("proxy", vocabulary.proxy, None),
        connect_timeout=table.get("connect_timeout", seconds, Uplink.connect_timeout),
        keepalive_interval=table.get("keepalive_interval", seconds, Uplink.keepalive_interval),
        keepalive_timeout=table.get("keepalive_timeout", seconds, Uplink.keepalive_timeout),
        request_timeout=table.get("request_timeout", seconds, Uplink.request_timeout),
        batch_max=table.get("batch_max", integer(1, 500), Uplink.batch_max),
        tls=_read_tls_policy(table),
        hub_org_ids=frozenset(table.get_list("hub_org_ids", vocabulary.org_id, ()) or ()),  # None: already reported
    )
    if not table.valid:  # the load fails; there is nothing to build
        return None
    assert hub.hostname is not None  # _server_url checked it
    return Uplink(
        hub_url=hub.geturl(),
        hub_host=hub.hostname,
        hub_port=443 if hub.port is None else hub.port,
        server_name=server_name or hub.hostname,
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
        **values,
    )


def _read_tls_policy(table: Table) -> TlsPolicy:
    return TlsPolicy(
        allow_tls12=table.get("allow_tls12", boolean, False),
        crl_files=table.get_list("crl_files", table.file.resolve, ()),
        crl_stale=table.get("crl_stale", vocabulary.crl_stale, "fail"),
    )


def _read_local_api(table: Table) -> LocalApi | None:
    for key, other in [("tls_cert_file", "tls_key_file"), ("tls_key_file", "tls_cert_file"),
                       ("tls_cert_file", "tls_client_ca_file")]:
        if other in table and key not in table:
            table.problem(key, f"missing, required when {other} is set")
    values: dict[str, Any] = dict(
        listen=table.get("listen", vocabulary.address, LocalApi.listen),
        tls_cert_file=table.get("tls_cert_file", table.file.resolve, None),
        tls_key_file=table.get("tls_key_file", table.file.resolve, None),
        tls_client_ca_file=table.get("tls_client_ca_file", table.file.resolve, None),
        max_body_bytes=table.get("max_body_bytes", integer(1), LocalApi.max_body_bytes),
        max_connections=table.get("max_connections", integer(1), LocalApi.max_connections),
        allow_cleartext_on_network=table.get("allow_cleartext_on_network", boolean, False),
    )
    return LocalApi(**values) if table.valid else None


def _read_store(table: Table) -> StoreLimits | None:
    values: dict[str, Any] = dict(
        max_bytes=table.get("max_size", size, StoreLimits.max_bytes),
        high_water=table.get("high_water", fraction, StoreLimits.high_water),
    )
    return StoreLimits(**values) if table.valid else None


def _read_metrics(table: Table) -> MetricsEndpoint | None:
    listen = table.get("listen", vocabulary.address, None)
    allow = table.get("allow_cleartext_on_network", boolean, False)
    return MetricsEndpoint(listen, allow) if table.valid else None


def _read_local_systems(tables: list[Table], domain: str | None) -> tuple[LocalSystem, ...]:
    """Read the [[local_system]] tables.

    Names must be unique so that logs are unambiguous, token hashes so that a
    token identifies one system.
    """
    parse_user = vocabulary.user_parser(domain)
    names: dict[str, Table] = {}
    tokens: dict[bytes, Table] = {}
    systems = []
    for table in tables:
        name = table.get("name", vocabulary.system_name)
        token_sha256 = table.get("token_sha256", vocabulary.sha256_hex)
        users = table.get_list("users", parse_user)
        if users == ():
            table.problem("users", 'expected at least one address or "*", got []')
        webhook_url = table.get("webhook_url", vocabulary.webhook_url, None)
        secret_file = table.get("webhook_secret_file", table.file.resolve, None)
        if webhook_url is not None and secret_file is None:
            table.problem("webhook_secret_file", "missing, required when webhook_url is set")
        secret = _read_secret(table, "webhook_secret_file", secret_file) if secret_file else None
        webhook_timeout = table.get("webhook_timeout", duration, LocalSystem.webhook_timeout)
        rate_limit = table.get("rate_limit", non_negative, LocalSystem.rate_limit)
        rate_burst = table.get("rate_burst", integer(1), LocalSystem.rate_burst)
        max_message_bytes = table.get("max_message_bytes", integer(1, 256 * 1024), LocalSystem.max_message_bytes)
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
                    webhook_secret=None if secret is None else Secret(secret),
                    webhook_timeout=webhook_timeout,
                    rate_limit=rate_limit,
                    rate_burst=rate_burst,
                    max_message_bytes=max_message_bytes,
                )
            )
    return tuple(systems)


def _require_unique(table: Table, key: str, value: object, seen: dict[Any, Table]) -> None:
    if value is not None and (first := seen.setdefault(value, table)) is not table:
        elsewhere = "" if first.origin == table.origin else f" in {table.file.name_of(first.origin)}"
        table.problem(key, f"same {key} as {first.label}{elsewhere}")


def _read_secret(table: Table, key: str, path: Path) -> bytes | None:
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



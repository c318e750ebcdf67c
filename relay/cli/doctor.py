"""``eimis-relay doctor``: a report on a relay's (or the hub's) installation, line by line.

Each line is ``ok``, ``warning`` or ``failed``, says what was checked and,
when something is wrong, the fix to try.  The checks go from the inside
out, so that the first failure is usually the cause of the later ones:
the configuration, files and their permissions, the certificate (chain,
expiry, key size), the TLS policy in force, then the way to the hub (DNS,
TCP, through the proxy when one is configured), a real handshake with the
hub with the relay's own certificate, the clock offset against the hub's
``Date`` header, and last the store (``PRAGMA integrity_check``) and the
daemon.

Intercepting proxies: a hospital's TLS inspection box answers the
handshake with a certificate of its own CA.  The relay then refuses the
hub, which from the outside looks like "the hub is down".  When the
handshake fails verification, doctor shakes hands again without verifying,
looks at who issued what it got, and names the intercepting proxy when it
was not the configured CA.

Given a hub's configuration, doctor checks the hub instead
(`run_hub_checks`).

Nothing here writes anything; it is safe to run while the relay runs (its
request to the hub is a ``GET`` of a path that does not exist, answered 404
with a Date, which touches no queue).
"""

from __future__ import annotations

import argparse
import os
import socket
import sqlite3
import ssl
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key

from relay.cli import hub_status
from relay.cli.arguments import add_config_option, config_path, names_a_hub
from relay.cli.ops import DB_NAME, store_dir
from relay.config.model import (
    HubConfig,
    RelayConfig,
    cleartext_listeners,
    is_loopback,
    load_hub_config,
    load_relay_config,
)
from relay.config.reader import ConfigError
from relay.core import protocol, timeformat
from relay.core.errors import describe_error
from relay.core.h2session import Http2Settings, header
from relay.net import admin_socket
from relay.net.errors import reason
from relay.net.h2connection import Http2Connection
from relay.net.proxy import dial
from relay.net.revocation import RevocationList, Revoked
from relay.net.tls import hub_server_context, relay_client_context
from relay.pki import identity

# Clock offset against the hub: the Date header has one-second resolution;
# certificates are issued with five minutes of slack (authority._CLOCK_SKEW).
CLOCK_WARNING = 5.0
CLOCK_FAILED = 240.0
PROBE_PATH = "/v1/doctor"
LEVELS = ("ok", "warning", "failed")
# The hub's own listener, from its host: a loopback handshake takes milliseconds.
HUB_PROBE_TIMEOUT = 5.0


@dataclass
class Check:
    level: str
    topic: str
    detail: str
    fix: str = ""


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("doctor", help="check the installation and the way to the hub (or, given its"
                                                " config, the hub); say what to fix")
    add_config_option(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    path = config_path(args)
    checks = run_checks(path)
    for check in checks:
        print(f"{check.level:<8} {check.topic:<12} {check.detail}")
        if check.fix:
            print(f"{'':<8} {'':<12} fix: {check.fix}")
    failed = sum(c.level == "failed" for c in checks)
    warnings = sum(c.level == "warning" for c in checks)
    print(f"{failed} failed, {warnings} warning(s), {len(checks) - failed - warnings} ok")
    return 1 if failed else 0


def run_checks(path: Path) -> list[Check]:
    if names_a_hub(path):
        return run_hub_checks(path)
    try:
        config = load_relay_config(path)
    except ConfigError as exc:
        return [Check("failed", "config", problem, f"edit {path} (see config.example.toml)")
                for problem in exc.problems]
    checks = [Check("ok", "config", f"{config.path} is valid")]
    checks += listeners(config)
    checks += permissions(config)
    checks += certificate(config)
    checks += tls_policy(config)
    checks += trio.run(network, config)
    checks += store(config)
    checks += daemon(config)
    return checks


# -- listeners -----------------------------------------------------------------------


def listeners(config: RelayConfig) -> list[Check]:
    """Who can read what the local API and the metrics listener carry."""
    opted_in = [(table, address) for table, address, allowed in cleartext_listeners(config) if allowed]
    checks = [Check("warning", "listeners", f"{table} listens on {address.host}:{address.port} without TLS "
                    "(allow_cleartext_on_network = true): anyone on the network path can read "
                    + ("bearer tokens and message bodies" if table == "[local_api]" else "the metrics"),
                    "serve the local API over TLS with client certificates (docs/security.md, "
                    "'The local network')" if table == "[local_api]" else "listen on 127.0.0.1 and scrape "
                    "through a TLS proxy, or accept it knowingly")
              for table, address in opted_in]
    local = config.local_api
    if local.tls_cert_file is not None:
        clients = ("and a client certificate" if local.tls_client_ca_file is not None
                   else "(no client certificate asked)")
        checks.append(Check("ok", "listeners", f"local API on {local.listen.host}:{local.listen.port}: TLS {clients}"))
    elif is_loopback(local.listen.host):
        checks.append(Check("ok", "listeners", f"local API on {local.listen.host}:{local.listen.port}: loopback only"))
    return checks


# -- files ---------------------------------------------------------------------------


def permissions(config: RelayConfig) -> list[Check]:
    return _permissions(config.path, [config.uplink.key_file, config.local_api.tls_key_file], store_dir(config))


def _permissions(config_file: Path, secrets: list[Path | None], state: Path) -> list[Check]:
    checks = []
    for key in filter(None, secrets):
        try:
            info = key.stat()
        except OSError as exc:
            checks.append(Check("failed", "permissions", f"{key}: {exc.strerror}", "install the key, or fix key_file"))
            continue
        if info.st_mode & 0o077:
            checks.append(Check("failed", "permissions", f"{key} is readable by others than its owner"
                                f" (mode {stat.S_IMODE(info.st_mode):o})", f"chmod 600 {key}"))
        elif info.st_uid != os.geteuid() and os.geteuid() != 0:
            checks.append(Check("warning", "permissions", f"{key} belongs to uid {info.st_uid}, not to this user",
                                f"chown the key to the daemon's user (e.g. chown eimis-relay {key})"))
        else:
            checks.append(Check("ok", "permissions", f"{key} is readable by its owner only"))
    mode = stat.S_IMODE(config_file.stat().st_mode)
    if mode & 0o002:
        checks.append(Check("failed", "permissions", f"{config_file} is writable by anyone (mode {mode:o})",
                            f"chmod o-w {config_file}"))
    if state.is_dir() and stat.S_IMODE(state.stat().st_mode) & 0o077:
        checks.append(Check("warning", "permissions", f"the state directory {state} is open to others"
                            f" (mode {stat.S_IMODE(state.stat().st_mode):o}): it holds messages",
                            f"chmod 700 {state}"))
    return checks


def certificate(config: RelayConfig) -> list[Check]:
    up = config.uplink
    levels = {"error": "failed", "warning": "warning", "info": "ok"}
    fix = {"error": "see docs/operations.md, 'Renew a certificate' (eimis-relay enroll --out DIR)",
           "warning": "renew it now: docs/operations.md, 'Renew a certificate'", "info": ""}
    checks = [Check(levels[f.level], "certificate", f.message, fix[f.level])
              for f in identity.check_identity(up.cert_file, up.key_file, up.ca_file, config.domain)]
    return checks + key_size(up.key_file)


def key_size(key_file: Path) -> list[Check]:
    checks: list[Check] = []
    try:
        key = load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return checks  # check_identity has said why
    if isinstance(key, ec.EllipticCurvePrivateKey):
        level = "ok" if key.curve.key_size >= 256 else "failed"
        checks.append(Check(level, "key size", f"EC {key.curve.name} ({key.curve.key_size} bits)",
                            "" if level == "ok" else "make a P-256 key: eimis-relay enroll"))
    elif isinstance(key, rsa.RSAPrivateKey):
        level = "ok" if key.key_size >= 3072 else "warning" if key.key_size >= 2048 else "failed"
        checks.append(Check(level, "key size", f"RSA {key.key_size} bits",
                            "" if level == "ok"
                            else "ANSSI asks 3072 bits from 2031: enrol a P-256 key at the next renewal"))
    else:
        checks.append(Check("warning", "key size", f"{type(key).__name__}: not a key type the national PKI issues for"))
    return checks


def tls_policy(config: RelayConfig) -> list[Check]:
    up = config.uplink
    return _tls_policy(lambda: relay_client_context(up.cert_file, up.key_file, up.ca_file, up.tls))


def _tls_policy(build: Callable[[], ssl.SSLContext]) -> list[Check]:
    try:
        context = build()
    except (OSError, ssl.SSLError, ValueError) as exc:
        return [Check("failed", "tls", f"the TLS context does not load: {describe_error(exc)}",
                      "fix the certificate findings above")]
    suites = sorted({c["name"] for c in context.get_ciphers() if c["protocol"] in ("TLSv1.3", "TLSv1.2")})
    if context.minimum_version == ssl.TLSVersion.TLSv1_3:
        return [Check("ok", "tls", f"TLS 1.3 only; suites {', '.join(s for s in suites if s.startswith('TLS_'))}")]
    return [Check("warning", "tls", f"TLS 1.2 allowed ({', '.join(suites)})",
                  "remove allow_tls12 once the hub and proxies speak TLS 1.3")]


# -- the way to the hub --------------------------------------------------------------


async def network(config: RelayConfig) -> list[Check]:
    up = config.uplink
    checks: list[Check] = []
    first_hop = (up.proxy.host, up.proxy.port) if up.proxy else (up.hub_host, up.hub_port)
    via = f" through the proxy {up.proxy.host}:{up.proxy.port}" if up.proxy else ""
    try:
        with trio.fail_after(up.connect_timeout):
            addresses = await trio.socket.getaddrinfo(first_hop[0], first_hop[1], type=socket.SOCK_STREAM)
        shown = sorted({str(a[4][0]) for a in addresses})
        checks.append(Check("ok", "dns", f"{first_hop[0]} resolves to {', '.join(shown)}"))
    except (OSError, trio.TooSlowError) as exc:
        return checks + [Check("failed", "dns", f"{first_hop[0]} does not resolve: {reason(exc)}",
                               "check /etc/resolv.conf and the hospital's DNS, or the host in hub_url/proxy")]
    try:
        with trio.fail_after(up.connect_timeout):
            tcp = await dial(up.hub_host, up.hub_port, up.proxy)
    except (OSError, trio.TooSlowError) as exc:
        return checks + [Check("failed", "tcp", f"cannot reach {up.hub_host}:{up.hub_port}{via}: {reason(exc)}",
                               "ask the network team to open outbound TCP to the hub (or fix [uplink] proxy)")]
    await tcp.aclose()
    checks.append(Check("ok", "tcp", f"{up.hub_host}:{up.hub_port} reached{via}"))
    return checks + await handshake(config)


async def handshake(config: RelayConfig) -> list[Check]:
    up = config.uplink
    context = relay_client_context(up.cert_file, up.key_file, up.ca_file, up.tls)
    stream = None
    try:
        with trio.fail_after(up.connect_timeout):
            tcp = await dial(up.hub_host, up.hub_port, up.proxy)
            stream = trio.SSLStream(tcp, context, server_hostname=up.server_name)
            await stream.do_handshake()
    except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
        if isinstance(cause, ssl.SSLCertVerificationError):
            return [await _refused_certificate(config, cause)]
        return [Check("failed", "handshake", f"TLS handshake with the hub failed: {reason(exc)}",
                      "run `eimis-relay doctor` on the hub side too; check the hub's logs for this relay")]
    version, cipher = stream.version(), stream.cipher()[0]
    der = stream.getpeercert(binary_form=True)
    hub = identity.peer_identity(der)
    checks = [Check("ok", "handshake", f"{version} {cipher} with {up.server_name}; its certificate is from the"
                    f" configured CA and expires {timeformat.day(hub.not_after)}")]
    checks.append(await _clock(config, stream))
    return checks


async def _refused_certificate(config: RelayConfig, error: ssl.SSLCertVerificationError) -> Check:
    """The handshake failed verification: was that an intercepting proxy?"""
    up = config.uplink
    loose = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    loose.check_hostname, loose.verify_mode = False, ssl.CERT_NONE
    loose.load_cert_chain(up.cert_file, up.key_file)
    der = None
    with trio.move_on_after(up.connect_timeout):
        try:
            tcp = await dial(up.hub_host, up.hub_port, up.proxy)
            stream = trio.SSLStream(tcp, loose, server_hostname=up.server_name)
        except OSError:
            stream = None
        if stream is not None:
            try:
                await stream.do_handshake()
                der = stream.getpeercert(binary_form=True)
            except (OSError, trio.BrokenResourceError):
                pass
            finally:
                await trio.aclose_forcefully(stream)
    if der is not None:
        presented = x509.load_der_x509_certificate(der)
        cas = identity.load_certificates(up.ca_file)
        if not any(presented.issuer == ca.subject for ca in cas):
            return Check("failed", "handshake",
                         f"the certificate presented for {up.server_name} is not issued by the configured CA"
                         f" ({up.ca_file}) but by {presented.issuer.rfc4514_string()}: an intercepting proxy"
                         " (TLS inspection) is in the way",
                         f"ask the network team to exempt {up.hub_host}:{up.hub_port} from TLS inspection")
    return Check("failed", "handshake", f"the hub's certificate was refused: {error.verify_message}",
                 f"check ca_file ({up.ca_file}) and server_name ({up.server_name}) against the hub's certificate")


async def _clock(config: RelayConfig, stream: trio.SSLStream) -> Check:
    up = config.uplink
    conn = Http2Connection(stream, client=True, settings=Http2Settings(keepalive_interval=None), name="hub (doctor)")
    date = None
    try:
        with trio.fail_after(up.connect_timeout):
            async with trio.open_nursery(strict_exception_groups=True) as nursery:
                await nursery.start(conn.run)
                before = time.time()
                probe = conn.open_stream([(b":method", b"GET"), (b":scheme", b"https"),
                                          (b":authority", up.server_name.encode()), (b":path", PROBE_PATH.encode()),
                                          (b"accept", protocol.MSGPACK)], end_stream=True)
                date = header(await probe.receive_headers(), b"date")
                after = time.time()
                probe.reset()
                conn.abort()
    except Exception as exc:  # noqa: BLE001 -- the handshake was fine; the hub refused this relay at the HTTP/2 level
        return Check("failed", "hub", f"the hub closed the connection after the handshake: {reason(exc)}",
                     "the hub may not know this relay's domain, or has revoked its certificate: ask its operator")
    if date is None:
        return Check("warning", "clock", "the hub sent no Date header: the clock offset cannot be measured",
                     "check that this host's clock is synchronised (timedatectl)")
    # Date is truncated to the second: its middle is the best estimate.
    offset = parsedate_to_datetime(date.decode()).timestamp() + 0.5 - (before + after) / 2
    level = "ok" if abs(offset) < CLOCK_WARNING else "warning" if abs(offset) < CLOCK_FAILED else "failed"
    return Check(level, "clock", f"offset against the hub {offset:+.0f} s (±1 s)",
                 "" if level == "ok" else "synchronise this host's clock with NTP (timedatectl set-ntp true)")


# -- the store and the daemon -----------------------------------------------------------


def store(config: RelayConfig) -> list[Check]:
    return _store(store_dir(config) / DB_NAME)


def _store(path: Path) -> list[Check]:
    if not path.exists():
        return [Check("warning", "store", f"no store at {path} yet", "it is created when the relay first starts")]
    try:
        with sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True) as conn:
            verdict = conn.execute("PRAGMA integrity_check").fetchone()[0]
        conn.close()
    except sqlite3.Error as exc:
        return [Check("failed", "store", f"{path} cannot be read: {exc}", "check its owner and mode (0600)")]
    if verdict != "ok":
        return [Check("failed", "store", f"{path} failed PRAGMA integrity_check: {verdict}",
                      "stop the relay and restore the last backup (docs/operations.md, 'Restore')")]
    return [Check("ok", "store", f"{path} passes PRAGMA integrity_check")]


def daemon(config: RelayConfig) -> list[Check]:
    holder = admin_socket.holder(store_dir(config))
    if holder is None:
        return [Check("warning", "daemon", "no relay is running on this store", "systemctl start eimis-relay")]
    return [Check("ok", "daemon", f"running as pid {holder.get('pid', '?')} ({holder.get('command', '?')});"
                  " `eimis-relay status` tells how it is doing")]


# -- the hub -------------------------------------------------------------------------


def run_hub_checks(path: Path) -> list[Check]:
    """The hub's report: configuration, files, certificate, TLS and CRLs,
    then its listener from this host (which certificate it presents: the
    one on disk, or one a reload has not yet picked up), the store and the
    daemon (``eimis-relay status`` tells the rest)."""
    try:
        config = load_hub_config(path)
    except ConfigError as exc:
        return [Check("failed", "config", problem, f"edit {path} (see hub.example.toml)") for problem in exc.problems]
    state = hub_status.hub_store_dir(config)
    checks = [Check("ok", "config", f"{config.path} is valid")]
    checks += _permissions(config.path, [config.key_file], state)
    levels = {"error": "failed", "warning": "warning", "info": "ok"}
    fix = {"error": "issue the hub a certificate for its name from the national CA",
           "warning": "renew it now, then reload the hub (SIGHUP)", "info": ""}
    checks += [Check(levels[f.level], "certificate", f.message, fix[f.level])
               for f in identity.check_identity(config.cert_file, config.key_file, config.ca_file, config.name)]
    checks += key_size(config.key_file)
    checks += _tls_policy(lambda: hub_server_context(config.cert_file, config.key_file, config.ca_file, config.tls))
    checks += _crls(config)
    checks += trio.run(_hub_listener, config)
    checks += _store(state / hub_status.HUB_DB_NAME)
    found = admin_socket.holder(state, admin_socket.HUB_LOCK_NAME)
    if found is None:
        checks.append(Check("warning", "daemon", "no hub is running on this store", "systemctl start eimis-relay-hub"))
    else:
        checks.append(Check("ok", "daemon", f"running as pid {found.get('pid', '?')} ({found.get('command', '?')});"
                            " `eimis-relay status` tells how it is doing"))
    return checks


def _crls(config: HubConfig) -> list[Check]:
    if not config.tls.crl_files:
        return [Check("warning", "crl", "no crl_files: a revoked relay certificate is accepted until it expires",
                      "list the national PKI's CRLs in crl_files")]
    try:
        RevocationList(config.tls, config.ca_file).check(identity.load_certificates(config.cert_file)[0]
                                                         .public_bytes(Encoding.DER))
    except Revoked as exc:
        return [Check("failed", "crl", str(exc), "fetch the current CRLs of the national PKI")]
    except (OSError, ValueError, IndexError):
        return []  # the certificate lines have said why
    return [Check("ok", "crl", f"{len(config.tls.crl_files)} CRL(s) load, are signed by the CA and current")]


async def _hub_listener(config: HubConfig) -> list[Check]:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(config.listen.host, config.listen.host)  # noqa: S104
    where = f"{host}:{config.listen.port}"
    context = ssl.create_default_context(cafile=config.ca_file)
    context.set_alpn_protocols([protocol.ALPN])
    stream = None
    try:
        with trio.fail_after(HUB_PROBE_TIMEOUT):
            stream = trio.SSLStream(await trio.open_tcp_stream(host, config.listen.port), context,
                                    server_hostname=config.name)
            await stream.do_handshake()  # TLS 1.3: done before the hub asks for the certificate we lack
    except (OSError, trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError) as exc:
        return [Check("failed", "listen", f"no TLS handshake with the hub on {where}: {reason(exc)}",
                      "start the hub (systemctl start eimis-relay-hub), or check [hub] listen and the firewall")]
    finally:
        if stream is not None:
            await trio.aclose_forcefully(stream)
    presented = identity.peer_identity(stream.getpeercert(binary_form=True))
    try:
        on_disk = identity.load_certificates(config.cert_file)[0].serial_number
    except (OSError, ValueError, IndexError):
        on_disk = None
    if on_disk is not None and presented.serial != on_disk:
        return [Check("warning", "listen", f"the hub on {where} presents certificate serial {presented.serial:x},"
                      f" not the one in {config.cert_file}",
                      "reload the hub (systemctl reload eimis-relay-hub) to use the renewed certificate")]
    return [Check("ok", "listen", f"the hub answers on {where} with its certificate for {config.name},"
                  f" valid until {timeformat.day(presented.not_after)}")]

"""TLS contexts for the national link and the local API.

Policy (ANSSI's TLS recommendations): TLS 1.3 only, unless the
configuration allows TLS 1.2 for a peer that lacks 1.3, and then only
ECDHE key exchange with AEAD suites; no compression, no renegotiation;
ALPN ``h2``.  The peer's certificate must chain to the configured national
CA, be within its dates and carry the right extended key usage (OpenSSL
checks clientAuth on the hub's side and serverAuth on the relay's, from
the context's purpose).  Revocation is checked after the handshake
(`relay.net.revocation`).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from relay.config.model import TlsPolicy
from relay.core import protocol

# TLS 1.2 suites allowed when a peer needs them: forward-secret, AEAD only.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def _harden(ctx: ssl.SSLContext, policy: TlsPolicy) -> ssl.SSLContext:
    if policy.allow_tls12:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(TLS12_CIPHERS)
    else:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


def hub_server_context(
    cert_file: Path, key_file: Path, ca_file: Path, policy: TlsPolicy = TlsPolicy(),
) -> ssl.SSLContext:
    """The hub's side: every relay must present a certificate from the national CA."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), policy)
    ctx.load_cert_chain(cert_file, key_file)
    ctx.load_verify_locations(cafile=ca_file)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols([protocol.ALPN])
    return ctx


def relay_client_context(
    cert_file: Path, key_file: Path, ca_file: Path, policy: TlsPolicy = TlsPolicy(),
) -> ssl.SSLContext:
    """The relay's side: present our certificate, verify the hub's chain and name."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), policy)
    ctx.load_cert_chain(cert_file, key_file)
    ctx.load_verify_locations(cafile=ca_file)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols([protocol.ALPN])
    return ctx


def local_server_context(cert_file: Path, key_file: Path, client_ca_file: Path | None = None) -> ssl.SSLContext:
    """Optional TLS for the local API; offers h2 and HTTP/1.1, and requires
    a client certificate from ``client_ca_file`` when one is configured."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), TlsPolicy())
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca_file is not None:
        ctx.load_verify_locations(cafile=client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx

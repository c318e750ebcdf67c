"""TLS contexts for the national link and the local API.

Policy: TLS 1.3 only, ALPN ``h2``, no compression, no renegotiation, the
peer's certificate verified against the configured national CA bundle.  The
hub requires a client certificate; the relay checks the hub's name.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from . import protocol


def _base(purpose: ssl.Purpose, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def hub_server_context(cert_file: Path, key_file: Path, ca_file: Path) -> ssl.SSLContext:
    """The hub's side: every relay must present a certificate from the national CA."""
    ctx = _base(ssl.Purpose.CLIENT_AUTH, cert_file, key_file)
    ctx.load_verify_locations(cafile=ca_file)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols([protocol.ALPN])
    return ctx


def relay_client_context(cert_file: Path, key_file: Path, ca_file: Path) -> ssl.SSLContext:
    """The relay's side: present our certificate, verify the hub's chain and name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(cert_file, key_file)
    ctx.load_verify_locations(cafile=ca_file)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols([protocol.ALPN])
    return ctx


def local_server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """Optional TLS for the local API; offers h2 and HTTP/1.1."""
    ctx = _base(ssl.Purpose.CLIENT_AUTH, cert_file, key_file)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx

"""Certificate revocation: CRL files, checked by us after the handshake.

Why not OpenSSL's own CRL checking: it cannot be told to carry on with a
CRL past its next update (our ``crl_stale = "warn"``), and it needs the
files at context creation.  Here the CRLs are parsed with `cryptography`,
their signatures checked against the national CA, and re-read whenever a
file changes on disk (or on demand, for SIGHUP); the peer certificate's
serial is looked up right after every handshake, before any request is
served or sent.

Error handling: an unreadable, unsigned or stale CRL under the default
policy makes every peer refused (fail closed), with the reason logged;
nothing silently falls back to "not revoked".
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from relay.config.model import TlsPolicy
from relay.config.stamps import files_stamp
from relay.core import timeformat
from relay.pki.identity import load_certificates, signed_by

log = logging.getLogger(__name__)


class Revoked(Exception):
    """The peer must be refused; the message says why (revoked, or no usable CRL)."""


@dataclass(frozen=True)
class _Loaded:
    stamp: tuple
    revoked: frozenset[tuple[bytes, int]]  # (issuer DER, serial)
    next_updates: tuple[tuple[Path, datetime.datetime], ...]
    problem: str | None


class RevocationList:
    def __init__(self, policy: TlsPolicy, ca_file: Path) -> None:
        self.policy = policy
        self.ca_file = ca_file
        self._loaded: _Loaded | None = None

    def check(self, der: bytes, *, now: datetime.datetime | None = None) -> None:
        """Raise `Revoked` if the certificate (DER) must be refused."""
        if not self.policy.crl_files:
            return
        loaded = self._current()
        if loaded.problem is not None:
            raise Revoked(loaded.problem)
        now = now or datetime.datetime.now(datetime.UTC)
        for path, next_update in loaded.next_updates:
            if next_update < now:
                message = f"CRL {path} is stale (next update was due {timeformat.minute(next_update)})"
                if self.policy.crl_stale == "fail":
                    raise Revoked(message + "; refusing peers until it is renewed (crl_stale = \"fail\")")
                log.warning("%s; using it anyway (crl_stale = \"warn\")", message)
        cert = x509.load_der_x509_certificate(der)
        if (cert.issuer.public_bytes(), cert.serial_number) in loaded.revoked:
            raise Revoked(f"certificate serial {cert.serial_number:x} of {cert.subject.rfc4514_string()} is revoked")

    def reload(self) -> None:
        """Forget what was read: the next check reads the files again."""
        self._loaded = None

    def _current(self) -> _Loaded:
        stamp = files_stamp(self.policy.crl_files)
        if self._loaded is None or self._loaded.stamp != stamp:
            self._loaded = self._load(stamp)
        return self._loaded

    def _load(self, stamp: tuple) -> _Loaded:
        revoked: set[tuple[bytes, int]] = set()
        next_updates = []
        try:
            authorities = load_certificates(self.ca_file)
            for path in self.policy.crl_files:
                crl = _read_crl(path)
                issuer = next((ca for ca in authorities if ca.subject == crl.issuer), None)
                if issuer is None or not signed_by(crl, issuer):
                    raise ValueError(f"CRL {path} is not signed by the national CA in {self.ca_file}")
                next_updates.append((path, _next_update(crl)))
                revoked.update((crl.issuer.public_bytes(), entry.serial_number) for entry in crl)
        except (OSError, ValueError) as exc:
            log.error("revocation: %s; every peer is refused until this is fixed", exc)
            return _Loaded(stamp, frozenset(), (), str(exc))
        log.info("revocation: %d revoked certificate(s) in %d CRL file(s)", len(revoked), len(next_updates))
        return _Loaded(stamp, frozenset(revoked), tuple(next_updates), None)


def _read_crl(path: Path) -> x509.CertificateRevocationList:
    data = path.read_bytes()
    try:
        if b"-----BEGIN X509 CRL-----" in data:
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError:
        raise ValueError(f"CRL {path} cannot be parsed") from None


def _next_update(crl: x509.CertificateRevocationList) -> datetime.datetime:
    """When the CRL must be replaced; a CRL without that date never goes stale."""
    if hasattr(crl, "next_update_utc"):  # cryptography >= 42
        moment = crl.next_update_utc
    else:
        moment = crl.next_update and crl.next_update.replace(tzinfo=datetime.UTC)
    return moment or datetime.datetime.max.replace(tzinfo=datetime.UTC)

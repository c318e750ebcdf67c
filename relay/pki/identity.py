"""Certificates as the daemons read them: identity checks before start-up,
who a TLS peer is, PEM loading.

In production the national PKI (IGC-Santé) issues each relay a certificate whose
subjectAltName carries the relay's DNS domain and whose subject OU carries the
organisation's national identifier (``1`` + FINESS or ``3`` + SIRET).  An
installed identity is checked before the daemon starts so that a
misconfiguration is reported in plain words rather than as a TLS handshake
failure later.

It supports cryptography 38 (Debian 12) as well as current releases, so it uses
no API newer than 38.
"""

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from relay.core import timeformat
from relay.core.errors import describe_error

_EXPIRY_WARNING = timedelta(days=30)
_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


@dataclass(frozen=True)
class Finding:
    """One result of :func:`check_identity`; ``level`` is "error", "warning" or "info"."""

    level: str
    message: str


@dataclass(frozen=True)
class PeerIdentity:
    """Who a verified TLS peer is, as the hub needs it to route and audit."""

    dns_names: tuple[str, ...]
    org_id: str | None
    serial: int
    not_after: datetime


def check_identity(
    cert_file: Path, key_file: Path, ca_file: Path, domain: str, *, now: datetime | None = None
) -> list[Finding]:
    """Check a relay's certificate, key and CA bundle before the daemon relies on them.

    Reports everything that can be known without a handshake, each finding naming
    the file at fault, so that an operator fixes the installation in one pass.
    ``now`` (timezone-aware) defaults to the current time.
    """
    findings: list[Finding] = []

    def attempt(load, path):
        try:
            return load(Path(path))
        except (OSError, ValueError) as exc:
            findings.append(Finding("error", describe_error(exc)))
            return None

    chain = attempt(load_chain, cert_file)
    key = attempt(load_private_key, key_file)
    cas = attempt(load_chain, ca_file)
    if chain is None:
        return findings
    cert = chain[0]

    if key is not None and not same_public_key(cert.public_key(), key.public_key()):
        findings.append(
            Finding("error", f"{cert_file}: certificate does not match private key {key_file}")
        )
    if cas and not any(signed_by(cert, ca) for ca in cas):
        findings.append(
            Finding("error", f"{cert_file}: certificate is not signed by a CA in {ca_file}")
        )
    names = san_dns_names(cert)
    if domain.lower() not in (name.lower() for name in names):
        findings.append(
            Finding(
                "error",
                f"{cert_file}: certificate names {', '.join(names) or '(none)'}"
                f" do not include domain {domain}",
            )
        )

    if now is None:
        now = datetime.now(UTC)
    not_before, not_after = valid_from(cert), valid_until(cert)
    if now < not_before:
        message = f"{cert_file}: certificate not valid before {timeformat.minute(not_before)}"
        findings.append(Finding("error", message))
    if now >= not_after:
        findings.append(Finding("error", f"{cert_file}: certificate expired on {timeformat.minute(not_after)}"))
    elif not_after - now < _EXPIRY_WARNING:
        message = f"{cert_file}: certificate expires soon ({timeformat.minute(not_after)}); renew it"
        findings.append(Finding("warning", message))
    findings.append(
        Finding(
            "info",
            f"{cert_file}: certificate for {domain} expires in {(not_after - now).days} days"
            f" ({timeformat.day(not_after)})",
        )
    )
    return findings


def san_dns_names(cert: x509.Certificate) -> list[str]:
    """The DNS names of the certificate's subjectAltName, empty when it has none."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return san.value.get_values_for_type(x509.DNSName)


def peer_identity(der: bytes) -> PeerIdentity:
    """Identify a peer from its DER certificate, already verified by the TLS layer."""
    cert = x509.load_der_x509_certificate(der)
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return PeerIdentity(
        dns_names=tuple(san_dns_names(cert)),
        org_id=str(units[0].value) if units else None,
        serial=cert.serial_number,
        not_after=valid_until(cert),
    )


def load_certificates(path: Path) -> list[x509.Certificate]:
    """All PEM certificates of a file, in order.

    Parsed one by one because ``load_pem_x509_certificates`` needs cryptography 39.
    """
    data = Path(path).read_bytes()
    certs = []
    for block in _PEM_CERTIFICATE.findall(data):
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except ValueError:
            raise ValueError(f"{path}: malformed PEM certificate") from None
    return certs


def valid_from(cert: x509.Certificate) -> datetime:
    """Start of validity, timezone-aware: the ``_utc`` attributes appeared in cryptography 42."""
    if hasattr(cert, "not_valid_before_utc"):
        return cert.not_valid_before_utc
    return cert.not_valid_before.replace(tzinfo=UTC)


def valid_until(cert: x509.Certificate) -> datetime:
    """End of validity, timezone-aware (see :func:`valid_from`)."""
    if hasattr(cert, "not_valid_after_utc"):
        return cert.not_valid_after_utc
    return cert.not_valid_after.replace(tzinfo=UTC)


def load_chain(path: Path) -> list[x509.Certificate]:
    """All certificates of a file that must hold at least one: a leaf (+ chain) or a CA bundle."""
    certs = load_certificates(path)
    if not certs:
        raise ValueError(f"{path}: no PEM certificate found")
    return certs


def load_private_key(path: Path):
    data = path.read_bytes()
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        message = f"{path}: private key is encrypted; an unencrypted key is needed"
        raise ValueError(message) from None
    except ValueError:
        raise ValueError(f"{path}: not a PEM private key") from None


def same_public_key(a, b) -> bool:
    def der(key) -> bytes:
        return key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    return der(a) == der(b)


def signed_by(
    signed: x509.Certificate | x509.CertificateRevocationList, issuer: x509.Certificate
) -> bool:
    """Whether ``issuer`` signed ``signed``, a certificate or a CRL
    (``verify_directly_issued_by`` needs cryptography 40, and covers no CRL).

    Only ECDSA and RSA PKCS#1 v1.5 issuers are recognised: that is what the
    national PKI and the demo CA use.  A signature made with an algorithm
    this cryptography cannot use counts as not signed.
    """
    if signed.issuer != issuer.subject:
        return False
    if isinstance(signed, x509.CertificateRevocationList):
        data = signed.tbs_certlist_bytes
    else:
        data = signed.tbs_certificate_bytes
    key = issuer.public_key()
    hash_algorithm = signed.signature_hash_algorithm
    if hash_algorithm is None:  # EdDSA: not an ECDSA or RSA signature
        return False
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signed.signature, data, ec.ECDSA(hash_algorithm))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signed.signature, data, padding.PKCS1v15(), hash_algorithm)
        else:
            return False
    except (InvalidSignature, UnsupportedAlgorithm, TypeError, ValueError):
        return False
    return True

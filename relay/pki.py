"""Certificates: a throwaway PKI for tests and demos, enrolment CSRs, identity checks.

In production the national PKI (IGC-Santé) issues each relay a certificate whose
subjectAltName carries the relay's DNS domain and whose subject OU carries the
organisation's national identifier (``1`` + FINESS or ``3`` + SIRET).  This module
makes certificates of the same shape for tests and demos, makes the key and CSR
that an operator sends to the real PKI, and checks an installed identity before
the daemon starts so that a misconfiguration is reported in plain words rather
than as a TLS handshake failure later.

It supports cryptography 38 (Debian 12) as well as current releases, so it uses
no API newer than 38.
"""

import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_ORGANISATION = "EIMIS demo"

# Relays and the hub act both as TLS clients and servers (each calls the other);
# the local API, reached by the hospital's own systems, is only ever a server.
_EXTENDED_KEY_USAGES = {
    "relay": [ExtendedKeyUsageOID.CLIENT_AUTH],  # never a TLS server: it cannot pose as the hub
    "hub": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    "local": [ExtendedKeyUsageOID.SERVER_AUTH],
}
ROLES = tuple(_EXTENDED_KEY_USAGES)

# Certificates start slightly in the past so that a peer whose clock is a little
# behind does not reject a certificate issued a moment ago.
_CLOCK_SKEW = timedelta(minutes=5)
_EXPIRY_WARNING = timedelta(days=30)

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)
_DNS_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")


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


def create_ca(
    out_dir: Path, *, common_name: str = "EIMIS Demo National CA", days: int = 3650
) -> tuple[Path, Path]:
    """Create a self-signed demo CA as ``out_dir/ca.pem`` and ``out_dir/ca.key``.

    Existing files are replaced: a demo CA is disposable.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANISATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    not_before = datetime.now(timezone.utc) - _CLOCK_SKEW
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write_pair(Path(out_dir), "ca", cert, key)


def issue_certificate(
    ca_cert: Path,
    ca_key: Path,
    out_dir: Path,
    *,
    dns_names: list[str],
    role: str,
    ip_addresses: Iterable[str] = (),
    org_id: str | None = None,
    days: int = 825,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> tuple[Path, Path]:
    """Issue a certificate signed by the demo CA, as ``out_dir/<dns_names[0]>.pem`` and ``.key``.

    ``role`` ("relay", "hub" or "local") selects the extended key usages, which
    TLS peers enforce.  ``not_before``/``not_after`` override the validity period
    so that tests can make expired or not-yet-valid certificates.
    """
    if role not in _EXTENDED_KEY_USAGES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    if not dns_names:
        raise ValueError("a certificate needs at least one DNS name")
    for dns_name in dns_names:
        _check_dns_name(dns_name)
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]

    issuer = _load_chain(Path(ca_cert))[0]
    issuer_key = _load_private_key(Path(ca_key))
    if not _same_public_key(issuer.public_key(), issuer_key.public_key()):
        raise ValueError(f"{ca_key}: CA key does not match CA certificate {ca_cert}")

    key = ec.generate_private_key(ec.SECP256R1())
    if not_before is None:
        not_before = datetime.now(timezone.utc) - _CLOCK_SKEW
    if not_after is None:
        not_after = not_before + timedelta(days=days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_subject(dns_names[0], org_id, organisation=_ORGANISATION))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage(_EXTENDED_KEY_USAGES[role]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )
    return _write_pair(Path(out_dir), dns_names[0], cert, key)


def make_crl(
    ca_cert: Path,
    ca_key: Path,
    out: Path,
    *,
    revoked: Iterable[Path] = (),
    days: int = 7,
    last_update: datetime | None = None,
) -> tuple[Path]:
    """Write a CRL signed by the demo CA, revoking the given certificates.

    ``last_update`` (default now) and ``days`` until the next update let
    tests make a stale CRL.
    """
    issuer = _load_chain(Path(ca_cert))[0]
    issuer_key = _load_private_key(Path(ca_key))
    if not _same_public_key(issuer.public_key(), issuer_key.public_key()):
        raise ValueError(f"{ca_key}: CA key does not match CA certificate {ca_cert}")
    last_update = last_update or datetime.now(timezone.utc) - _CLOCK_SKEW
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(last_update)
        .next_update(last_update + timedelta(days=days))
    )
    for path in revoked:
        serial = load_certificates(Path(path))[0].serial_number
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(last_update).build()
        )
    out = Path(out)
    out.write_bytes(builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return (out,)


def make_key_and_csr(out_dir: Path, *, domain: str, org_id: str | None = None) -> tuple[Path, Path]:
    """Make ``out_dir/<domain>.key`` and ``<domain>.csr`` to enrol with the national PKI.

    Returns (key, csr).  Refuses to replace an existing key: it may be the one a
    live certificate was issued for, and losing it would take the relay off the
    network until re-enrolment.
    """
    _check_dns_name(domain)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_subject(domain, org_id))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path = out_dir / f"{domain}.key"
    csr_path = out_dir / f"{domain}.csr"
    _write_private_key(key_path, key, replace=False)
    csr_path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return key_path, csr_path


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

    chain = attempt(_load_chain, cert_file)
    key = attempt(_load_private_key, key_file)
    cas = attempt(_load_chain, ca_file)
    if chain is None:
        return findings
    cert = chain[0]

    if key is not None and not _same_public_key(cert.public_key(), key.public_key()):
        findings.append(
            Finding("error", f"{cert_file}: certificate does not match private key {key_file}")
        )
    if cas and not any(_signed_by(cert, ca) for ca in cas):
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
        now = datetime.now(timezone.utc)
    not_before, not_after = _not_before(cert), _not_after(cert)
    if now < not_before:
        message = f"{cert_file}: certificate not valid before {_when(not_before)}"
        findings.append(Finding("error", message))
    if now >= not_after:
        findings.append(Finding("error", f"{cert_file}: certificate expired on {_when(not_after)}"))
    elif not_after - now < _EXPIRY_WARNING:
        message = f"{cert_file}: certificate expires soon ({_when(not_after)}); renew it"
        findings.append(Finding("warning", message))
    findings.append(
        Finding(
            "info",
            f"{cert_file}: certificate for {domain} expires in {(not_after - now).days} days"
            f" ({not_after:%Y-%m-%d})",
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
        not_after=_not_after(cert),
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


def describe_error(exc: Exception) -> str:
    """A one-line message for a file or parsing error, without Python's ``[Errno N]`` noise."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc)


def _not_before(cert: x509.Certificate) -> datetime:
    """Start of validity, timezone-aware: the ``_utc`` attributes appeared in cryptography 42."""
    if hasattr(cert, "not_valid_before_utc"):
        return cert.not_valid_before_utc
    return cert.not_valid_before.replace(tzinfo=timezone.utc)


def _not_after(cert: x509.Certificate) -> datetime:
    """End of validity, timezone-aware (see :func:`_not_before`)."""
    if hasattr(cert, "not_valid_after_utc"):
        return cert.not_valid_after_utc
    return cert.not_valid_after.replace(tzinfo=timezone.utc)


def _when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"


def _check_dns_name(name: str) -> None:
    """Reject names that are not DNS names: they also become file names, so no ``/`` or ``..``."""
    if not _DNS_NAME.fullmatch(name):
        raise ValueError(f"not a DNS name: {name!r}")


def _subject(
    common_name: str, org_id: str | None, *, organisation: str | None = None
) -> x509.Name:
    attributes = []
    if organisation:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation))
    if org_id:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, org_id))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _load_chain(path: Path) -> list[x509.Certificate]:
    """All certificates of a file that must hold at least one: a leaf (+ chain) or a CA bundle."""
    certs = load_certificates(path)
    if not certs:
        raise ValueError(f"{path}: no PEM certificate found")
    return certs


def _load_private_key(path: Path):
    data = path.read_bytes()
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        message = f"{path}: private key is encrypted; an unencrypted key is needed"
        raise ValueError(message) from None
    except ValueError:
        raise ValueError(f"{path}: not a PEM private key") from None


def _same_public_key(a, b) -> bool:
    def der(key) -> bytes:
        return key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    return der(a) == der(b)


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer`` signed ``cert`` (``verify_directly_issued_by`` needs cryptography 40).

    Only ECDSA and RSA PKCS#1 v1.5 issuers are recognised: that is what the
    national PKI and the demo CA use.
    """
    if cert.issuer != issuer.subject:
        return False
    key = issuer.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(
                cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
            )
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(
                cert.signature,
                cert.tbs_certificate_bytes,
                padding.PKCS1v15(),
                cert.signature_hash_algorithm,
            )
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _write_pair(out_dir: Path, stem: str, cert: x509.Certificate, key) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out_dir / f"{stem}.pem", out_dir / f"{stem}.key"
    _write_private_key(key_path, key, replace=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _write_private_key(path: Path, key, *, replace: bool) -> None:
    """Write a PEM key to a file created with mode 0600, so it is never readable by others.

    Replacing unlinks the old file first rather than truncating it, since an
    existing file keeps its (possibly wider) mode; ``O_EXCL`` also refuses to
    follow a symlink planted in its place.
    """
    if replace:
        path.unlink(missing_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        message = f"{path}: a private key already exists; refusing to overwrite it"
        raise FileExistsError(message) from None
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

"""A throwaway PKI of the national PKI's shape, for tests and demos, and the
key and CSR an operator sends to the real PKI to enrol.

Certificates carry what the national PKI's do: the relay's DNS domain in the
subjectAltName and the organisation's national identifier in the subject OU.
It supports cryptography 38 (Debian 12), so it uses no API newer than 38.
"""

import ipaddress
import os
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relay.core.addresses import is_host_name
from relay.pki.identity import load_certificates, load_chain, load_private_key, same_public_key

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
    not_before = datetime.now(UTC) - _CLOCK_SKEW
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

    issuer = load_chain(Path(ca_cert))[0]
    issuer_key = load_private_key(Path(ca_key))
    if not same_public_key(issuer.public_key(), issuer_key.public_key()):
        raise ValueError(f"{ca_key}: CA key does not match CA certificate {ca_cert}")

    key = ec.generate_private_key(ec.SECP256R1())
    if not_before is None:
        not_before = datetime.now(UTC) - _CLOCK_SKEW
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
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),  # the issuer's (checked)
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
    issuer = load_chain(Path(ca_cert))[0]
    issuer_key = load_private_key(Path(ca_key))
    if not same_public_key(issuer.public_key(), issuer_key.public_key()):
        raise ValueError(f"{ca_key}: CA key does not match CA certificate {ca_cert}")
    last_update = last_update or datetime.now(UTC) - _CLOCK_SKEW
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


def _check_dns_name(name: str) -> None:
    """Reject names that are not DNS names (in any case: certificates compare
    them without it): they also become file names, so no ``/`` or ``..``."""
    if not is_host_name(name.lower()):
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

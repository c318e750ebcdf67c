"""Tests for the demo PKI, enrolment CSRs and identity checks (relay.pki, relay.pki_cli)."""

import argparse
import socket
import ssl
import stat
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relay.cli import pki as pki_commands
from relay.pki import authority, identity

DOMAIN = "chu-nord.test"
ORG_ID = "1750000001"


@pytest.fixture
def ca(tmp_path):
    return authority.create_ca(tmp_path / "ca")


def issue(ca, out_dir, domain=DOMAIN, role="relay", **kwargs):
    ca_cert, ca_key = ca
    return authority.issue_certificate(ca_cert, ca_key, out_dir, dns_names=[domain], role=role, **kwargs)


def levels(findings):
    return [f.level for f in findings]


def errors(findings):
    return [f.message for f in findings if f.level == "error"]


def load(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_valid_identity_gives_only_info(ca, tmp_path):
    cert, key = issue(ca, tmp_path / "pki", org_id=ORG_ID)
    assert cert.name == f"{DOMAIN}.pem" and key.name == f"{DOMAIN}.key"
    findings = identity.check_identity(cert, key, ca[0], DOMAIN)
    assert levels(findings) == ["info"]
    assert f"certificate for {DOMAIN} expires in 824 days (" in findings[0].message


def test_issued_certificate_shape(ca, tmp_path):
    cert_path, _ = authority.issue_certificate(
        *ca, tmp_path, dns_names=["hub.test", "hub2.test"], ip_addresses=["127.0.0.1"],
        role="hub", org_id=ORG_ID,
    )
    cert = load(cert_path)
    assert identity.san_dns_names(cert) == ["hub.test", "hub2.test"]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "hub.test"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == ORG_ID
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "EIMIS demo"


@pytest.mark.parametrize(
    ("role", "usages"),
    [
        ("relay", {ExtendedKeyUsageOID.CLIENT_AUTH}),
        ("hub", {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}),
        ("local", {ExtendedKeyUsageOID.SERVER_AUTH}),
    ],
)
def test_role_sets_extended_key_usage(ca, tmp_path, role, usages):
    cert = load(issue(ca, tmp_path, role=role)[0])
    assert set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == usages


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"role": "admin"}, "unknown role"),
        ({"domain": "../etc"}, "not a DNS name"),
        ({"ip_addresses": ["not-an-ip"]}, "does not appear to be an IPv4 or IPv6 address"),
    ],
)
def test_issue_rejects_bad_arguments(ca, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        issue(ca, tmp_path, **kwargs)


def test_issue_rejects_ca_key_of_another_ca(ca, tmp_path):
    _, other_key = authority.create_ca(tmp_path / "other")
    with pytest.raises(ValueError, match="CA key does not match CA certificate"):
        authority.issue_certificate(ca[0], other_key, tmp_path, dns_names=[DOMAIN], role="relay")


def test_key_files_are_private(ca, tmp_path):
    _, relay_key = issue(ca, tmp_path)
    csr_key, _ = authority.make_key_and_csr(tmp_path / "csr", domain=DOMAIN)
    for key in (ca[1], relay_key, csr_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_reissue_replaces_key_and_keeps_it_private(ca, tmp_path):
    _, key = issue(ca, tmp_path)
    key.chmod(0o644)
    old = key.read_bytes()
    issue(ca, tmp_path)
    assert key.read_bytes() != old
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_wrong_domain(ca, tmp_path):
    cert, key = issue(ca, tmp_path, domain="chu-sud.test")
    assert errors(identity.check_identity(cert, key, ca[0], DOMAIN)) == [
        f"{cert}: certificate names chu-sud.test do not include domain {DOMAIN}"
    ]


def test_mismatched_key(ca, tmp_path):
    cert, _ = issue(ca, tmp_path / "a")
    _, other_key = issue(ca, tmp_path / "b")
    assert errors(identity.check_identity(cert, other_key, ca[0], DOMAIN)) == [
        f"{cert}: certificate does not match private key {other_key}"
    ]


def test_signed_by_another_ca(ca, tmp_path):
    other_ca, _ = authority.create_ca(tmp_path / "other", common_name="Other CA")
    cert, key = issue(ca, tmp_path)
    assert errors(identity.check_identity(cert, key, other_ca, DOMAIN)) == [
        f"{cert}: certificate is not signed by a CA in {other_ca}"
    ]


def test_same_name_but_different_ca_key_is_not_trusted(ca, tmp_path):
    impostor_ca, _ = authority.create_ca(tmp_path / "impostor")  # same default name as `ca`
    cert, key = issue(ca, tmp_path)
    assert len(errors(identity.check_identity(cert, key, impostor_ca, DOMAIN))) == 1


def test_ca_bundle_with_several_cas(ca, tmp_path):
    other_ca, _ = authority.create_ca(tmp_path / "other", common_name="Other CA")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(other_ca.read_bytes() + ca[0].read_bytes())
    cert, key = issue(ca, tmp_path)
    assert levels(identity.check_identity(cert, key, bundle, DOMAIN)) == ["info"]
    assert len(identity.load_certificates(bundle)) == 2


def make_rsa_ca(out_dir):
    """An RSA CA, as the national PKI's are: the demo CA is ECDSA."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "RSA CA")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    out_dir.mkdir()
    cert_path, key_path = out_dir / "ca.pem", out_dir / "ca.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_rsa_ca_signature_is_verified(tmp_path):
    rsa_ca = make_rsa_ca(tmp_path / "rsa")
    cert, key = issue(rsa_ca, tmp_path)
    assert levels(identity.check_identity(cert, key, rsa_ca[0], DOMAIN)) == ["info"]
    other_ca, _ = make_rsa_ca(tmp_path / "other")  # same name, different key
    assert errors(identity.check_identity(cert, key, other_ca, DOMAIN)) == [
        f"{cert}: certificate is not signed by a CA in {other_ca}"
    ]


def test_expired(ca, tmp_path):
    now = datetime.now(UTC)
    cert, key = issue(
        ca, tmp_path, not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)
    )
    findings = identity.check_identity(cert, key, ca[0], DOMAIN)
    assert levels(findings) == ["error", "info"]
    assert "certificate expired on" in findings[0].message


def test_not_yet_valid(ca, tmp_path):
    now = datetime.now(UTC)
    cert, key = issue(ca, tmp_path, not_before=now + timedelta(days=1))
    findings = identity.check_identity(cert, key, ca[0], DOMAIN)
    assert levels(findings) == ["error", "info"]
    assert "certificate not valid before" in findings[0].message


def test_expiring_soon_is_a_warning(ca, tmp_path):
    now = datetime.now(UTC).replace(microsecond=0)  # certificates hold whole seconds
    cert, key = issue(ca, tmp_path, not_after=now + timedelta(days=10))
    findings = identity.check_identity(cert, key, ca[0], DOMAIN, now=now)
    assert levels(findings) == ["warning", "info"]
    assert "certificate expires soon" in findings[0].message
    assert f"certificate for {DOMAIN} expires in 10 days (" in findings[1].message


def test_missing_files(tmp_path):
    missing = [tmp_path / name for name in ("relay.pem", "relay.key", "ca.pem")]
    assert errors(identity.check_identity(*missing, DOMAIN)) == [
        f"{path}: No such file or directory" for path in missing
    ]


def test_garbage_files(tmp_path):
    garbage = [tmp_path / name for name in ("relay.pem", "relay.key", "ca.pem")]
    for path in garbage:
        path.write_text("not PEM at all\n")
    assert errors(identity.check_identity(*garbage, DOMAIN)) == [
        f"{garbage[0]}: no PEM certificate found",
        f"{garbage[1]}: not a PEM private key",
        f"{garbage[2]}: no PEM certificate found",
    ]


def test_malformed_pem_certificate(ca, tmp_path):
    _, key = issue(ca, tmp_path)
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    assert errors(identity.check_identity(broken, key, ca[0], DOMAIN)) == [
        f"{broken}: malformed PEM certificate"
    ]


def test_encrypted_key(ca, tmp_path):
    cert, key = issue(ca, tmp_path)
    private_key = serialization.load_pem_private_key(key.read_bytes(), password=None)
    key.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    assert errors(identity.check_identity(cert, key, ca[0], DOMAIN)) == [
        f"{key}: private key is encrypted; an unencrypted key is needed"
    ]


def test_csr_carries_domain_and_org_id(tmp_path):
    key, csr_path = authority.make_key_and_csr(tmp_path, domain=DOMAIN, org_id=ORG_ID)
    assert (key.name, csr_path.name) == (f"{DOMAIN}.key", f"{DOMAIN}.csr")
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [DOMAIN]
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == DOMAIN
    assert csr.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == ORG_ID
    private_key = serialization.load_pem_private_key(key.read_bytes(), password=None)
    assert private_key.public_key().public_numbers() == csr.public_key().public_numbers()


def test_csr_refuses_to_overwrite_key(tmp_path):
    key, _ = authority.make_key_and_csr(tmp_path, domain=DOMAIN)
    before = key.read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        authority.make_key_and_csr(tmp_path, domain=DOMAIN)
    assert key.read_bytes() == before


def test_peer_identity(ca, tmp_path):
    cert_path, _ = authority.issue_certificate(
        *ca, tmp_path, dns_names=[DOMAIN, "relay.chu-nord.test"], role="relay", org_id=ORG_ID
    )
    cert = load(cert_path)
    peer = identity.peer_identity(cert.public_bytes(serialization.Encoding.DER))
    assert peer.dns_names == (DOMAIN, "relay.chu-nord.test")
    assert peer.org_id == ORG_ID
    assert peer.serial == cert.serial_number
    assert peer.not_after.tzinfo is not None
    assert peer.not_after - datetime.now(UTC) > timedelta(days=800)


def test_peer_identity_without_org_id(ca, tmp_path):
    cert = load(issue(ca, tmp_path)[0])
    assert identity.peer_identity(cert.public_bytes(serialization.Encoding.DER)).org_id is None


def run_cli(*argv):
    parser = argparse.ArgumentParser(prog="eimis-relay")
    pki_commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_makes_a_demo_pki(tmp_path, capsys):
    out = tmp_path / "pki"
    assert run_cli("pki", "create-ca", "--out", str(out), "--name", "Test CA", "--days", "30") == 0
    assert run_cli(
        "pki", "issue", "--ca-cert", str(out / "ca.pem"), "--ca-key", str(out / "ca.key"),
        "--domain", DOMAIN, "--domain", "relay.chu-nord.test", "--ip", "127.0.0.1",
        "--role", "relay", "--org-id", ORG_ID, "--out", str(out),
    ) == 0
    assert run_cli("pki", "csr", "--domain", "chu-sud.test", "--out", str(out / "csr")) == 0
    written = [
        out / "ca.pem", out / "ca.key", out / f"{DOMAIN}.pem", out / f"{DOMAIN}.key",
        out / "csr" / "chu-sud.test.key", out / "csr" / "chu-sud.test.csr",
    ]
    assert capsys.readouterr().out.splitlines() == [f"wrote {path}" for path in written]
    assert levels(identity.check_identity(out / f"{DOMAIN}.pem", out / f"{DOMAIN}.key",
                                     out / "ca.pem", DOMAIN)) == ["info"]


def test_cli_error_is_one_line_on_stderr(tmp_path, capsys):
    assert run_cli("pki", "csr", "--domain", DOMAIN, "--out", str(tmp_path)) == 0
    capsys.readouterr()
    assert run_cli("pki", "csr", "--domain", DOMAIN, "--out", str(tmp_path)) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"eimis-relay pki: {tmp_path / DOMAIN}.key: a private key already exists;"
        " refusing to overwrite it\n"
    )


def test_cli_reports_missing_ca(tmp_path, capsys):
    missing = tmp_path / "ca.pem"
    code = run_cli(
        "pki", "issue", "--ca-cert", str(missing), "--ca-key", str(tmp_path / "ca.key"),
        "--domain", DOMAIN, "--role", "hub", "--out", str(tmp_path),
    )
    assert code == 1
    assert capsys.readouterr().err == f"eimis-relay pki: {missing}: No such file or directory\n"


def handshake(server_cert, client_cert, ca_cert, server_name):
    """Run a mutual-TLS handshake over a socket pair; return the client cert the server saw."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(*server_cert)
    server_ctx.load_verify_locations(ca_cert)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_cert_chain(*client_cert)
    client_ctx.load_verify_locations(ca_cert)

    def serve(sock):
        with server_ctx.wrap_socket(sock, server_side=True) as tls:
            tls.sendall(b"ok")
            return tls.getpeercert(binary_form=True)

    server_sock, client_sock = socket.socketpair()
    for sock in (server_sock, client_sock):
        sock.settimeout(10)
    with server_sock, client_sock, ThreadPoolExecutor(max_workers=1) as pool:
        served = pool.submit(serve, server_sock)
        with client_ctx.wrap_socket(client_sock, server_hostname=server_name) as tls:
            assert tls.recv(2) == b"ok"
        return served.result(timeout=10)


def test_tls_hub_as_server_relay_as_client(ca, tmp_path):
    hub = issue(ca, tmp_path / "hub", domain="hub.test", role="hub")
    relay = issue(ca, tmp_path / "relay", role="relay", org_id=ORG_ID)
    seen = identity.peer_identity(handshake(hub, relay, ca[0], "hub.test"))
    assert (seen.dns_names, seen.org_id) == ((DOMAIN,), ORG_ID)


def test_tls_rejects_a_relay_certificate_as_server(ca, tmp_path):
    """A relay's certificate is for clientAuth only: it cannot pose as the hub."""
    hub = issue(ca, tmp_path / "hub", domain="hub.test", role="hub")
    relay = issue(ca, tmp_path / "relay", role="relay")
    with pytest.raises(ssl.SSLCertVerificationError, match="unsuitable certificate purpose"):
        handshake(relay, hub, ca[0], DOMAIN)


def test_tls_rejects_local_certificate_as_client(ca, tmp_path):
    hub = issue(ca, tmp_path / "hub", domain="hub.test", role="hub")
    local = issue(ca, tmp_path / "local", domain="localhost", role="local")
    with pytest.raises(ssl.SSLError, match=r"(?i)unsupported certificate"):
        handshake(hub, local, ca[0], "hub.test")

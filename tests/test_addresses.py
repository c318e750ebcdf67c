"""One set of rules for names and addresses (relay.core.addresses), and the
proof that every reader of a name applies it: the configuration, the wire
codec and the demo PKI refuse the same names."""

from __future__ import annotations

import pytest
from test_config import RELAY, edit, write
from test_protocol import wire

from relay.config.model import load_relay_config
from relay.config.reader import ConfigError
from relay.core import protocol
from relay.core.addresses import is_address, is_domain, is_host, is_host_name
from relay.core.protocol import Envelope, ProtocolViolation
from relay.pki import authority


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("chu-nord.test", True),
        ("a.b.c.example", True),
        ("127.0.0.1", True),
        ("localhost", False),
        ("CHU-Nord.test", False),
        ("-chu.test", False),
        ("chu-.test", False),
        ("chu.-test", False),
        ("chu..test", False),
        ("chu.test.", False),
        ("chu_nord.test", False),
        ("chu.test\n", False),
        ("a" * 64 + ".test", False),
        (".".join(["a" * 63] * 3 + ["a" * 61]), True),  # 253 characters
        (".".join(["a" * 63] * 3 + ["a" * 62]), False),  # 254
        ("", False),
        (None, False),
    ],
)
def test_is_domain(text, expected):
    assert is_domain(text) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("localhost", True), ("hub.eimis.test", True), ("-localhost", False), ("localhost-", False),
     ("Localhost", False), ("", False)],
)
def test_is_host_name_takes_one_label(text, expected):
    assert is_host_name(text) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("::1", True), ("10.0.0.1", True), ("proxy", True), ("-proxy", False), ("proxy.", False)],
)
def test_is_host_takes_ip_addresses_and_host_names(text, expected):
    assert is_host(text) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alice@chu-nord.test", True),
        ("a.b+c_d-e@chu-nord.test", True),
        ("a" * 64 + "@chu-nord.test", True),
        ("a" * 65 + "@chu-nord.test", False),
        ("@chu-nord.test", False),
        ("alice@localhost", False),
        ("Alice@chu-nord.test", False),
        ("a@b@chu-nord.test", False),
        ("alice@-chu-nord.test", False),
        ("alice@chu-nord-.test", False),
        ("alice", False),
        ("*", False),
        (["alice@chu-nord.test"], False),
    ],
)
def test_is_address(text, expected):
    assert is_address(text) is expected


# A label may not start or end with a hyphen (RFC 1123 §2.1): each reader refuses it.

BAD_DOMAINS = ["-chu-nord.test", "chu-nord-.test", "chu.-nord.test"]


@pytest.mark.parametrize("domain", BAD_DOMAINS)
def test_the_configuration_refuses_a_label_with_an_outer_hyphen(tmp_path, domain):
    text = edit(RELAY, 'domain = "chu-nord.test"', f'domain = "{domain}"')
    with pytest.raises(ConfigError) as error:
        load_relay_config(write(tmp_path, text))
    assert f"relay-a.toml: [relay].domain: expected a DNS name, got '{domain}'" in error.value.problems


@pytest.mark.parametrize("domain", BAD_DOMAINS)
def test_the_wire_codec_refuses_a_label_with_an_outer_hyphen(domain):
    sender = f"alice@{domain}"
    with pytest.raises(ProtocolViolation, match=r"envelope\.from"):
        Envelope.from_wire(wire(**{"from": sender}))
    with pytest.raises(ProtocolViolation, match="rcpt"):
        Envelope.from_wire(wire(rcpt=[sender], to=[sender]))
    assert not protocol.is_address(sender)


@pytest.mark.parametrize("domain", BAD_DOMAINS)
def test_the_pki_refuses_a_label_with_an_outer_hyphen(tmp_path, domain):
    ca_cert, ca_key = authority.create_ca(tmp_path / "ca")
    with pytest.raises(ValueError, match="not a DNS name"):
        authority.issue_certificate(ca_cert, ca_key, tmp_path / "out", dns_names=[domain], role="relay")
    with pytest.raises(ValueError, match="not a DNS name"):
        authority.make_key_and_csr(tmp_path / "enrol", domain=domain)
    assert not (tmp_path / "out").exists() and not (tmp_path / "enrol").exists()


def test_the_pki_takes_names_in_any_case(tmp_path):
    """Certificates compare DNS names without case: an operator's capitals are no error."""
    ca_cert, ca_key = authority.create_ca(tmp_path / "ca")
    cert, _ = authority.issue_certificate(ca_cert, ca_key, tmp_path, dns_names=["CHU-Nord.test"], role="relay")
    assert cert.name == "CHU-Nord.test.pem"

"""Attacks on the national link: certificates the hub and the relays must
refuse, TLS versions, revocation, forged identities.  Each refusal leaves
the server serving the legitimate relays."""

from __future__ import annotations

import logging
import ssl
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from conftest import STEP, Space

from relay.config.model import TlsPolicy
from relay.core import h2session, protocol
from relay.core.protocol import Envelope
from relay.net import h2connection
from relay.pki import authority

NOW = datetime.now(UTC)


def _context(cert: Path | None, key: Path | None, ca: Path, *, tls12_only: bool = False,
             ciphers: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=ca)
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    if tls12_only:
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if ciphers:
        ctx.set_ciphers(ciphers)
    ctx.set_alpn_protocols(["h2"])
    return ctx


async def _inbox_answered(port: int, ctx: ssl.SSLContext) -> bool:
    """Whether the hub answers an inbox request on this TLS identity."""
    tls = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), ctx, server_hostname="hub.eimis.test")
    try:
        with trio.fail_after(5):
            await tls.do_handshake()
            conn = h2connection.Http2Connection(tls, client=True, name="attacker")
            async with trio.open_nursery(strict_exception_groups=True) as nursery:
                await nursery.start(conn.run)
                stream = conn.open_stream([(b":method", b"GET"), (b":scheme", b"https"),
                                           (b":authority", b"hub.eimis.test"), (b":path", b"/v1/inbox")],
                                          end_stream=True)
                headers = await stream.receive_headers()
                conn.abort()
            return h2session.status_of(headers) == 200
    except REFUSED:
        return False
    except BaseExceptionGroup as group:
        if group.split(REFUSED)[1] is not None:
            raise
        return False
    finally:
        await trio.aclose_forcefully(tls)


# How a refusal looks from the client's side, at the handshake or after it.
REFUSED = (OSError, ssl.SSLError, trio.BrokenResourceError, h2session.ConnectionClosed, h2session.StreamReset)


def _issue(space: Space, name: str, **kwargs) -> tuple[Path, Path]:
    pki_dir = space.directory / "pki"
    out = space.directory / name
    out.mkdir(exist_ok=True)
    return authority.issue_certificate(pki_dir / "ca.pem", pki_dir / "ca.key", out, **kwargs)


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    """The national CA of the space the test's other fixture makes in tmp_path."""
    return tmp_path / "pki" / "ca.pem"


async def _legitimate_traffic_still_flows(space: Space) -> None:
    ident = await space.send(space.a, ["bob@clinique-sud.test"], "still served")
    await space.wait_status(space.a, ident, "delivered")


@pytest.mark.parametrize(
    "case",
    ["good", "other CA", "expired", "not yet valid", "wrong key usage", "no certificate", "TLS 1.2", "revoked"],
)
async def test_hub_refuses_bad_relay_certificates(stopped_space: Space, ca: Path, case: str) -> None:
    space = stopped_space
    good = _issue(space, "good", dns_names=["chu-nord.test"], role="relay", org_id="1750000001")
    if case == "revoked":
        crl = space.directory / "national.crl"
        authority.make_crl(ca, space.directory / "pki" / "ca.key", crl, revoked=[good[0]])
        space.hub_config = replace(space.hub_config, tls=TlsPolicy(crl_files=(crl,)))
    await space.start()
    if case == "other CA":
        other_ca, other_key = authority.create_ca(space.directory / "rogue-ca", common_name="EIMIS Demo National CA")
        cert = authority.issue_certificate(other_ca, other_key, space.directory / "rogue", dns_names=["chu-nord.test"],
                                     role="relay")
    elif case == "expired":
        cert = _issue(space, "expired", dns_names=["chu-nord.test"], role="relay",
                      not_before=NOW - timedelta(days=30), not_after=NOW - timedelta(days=1))
    elif case == "not yet valid":
        cert = _issue(space, "future", dns_names=["chu-nord.test"], role="relay",
                      not_before=NOW + timedelta(days=1), not_after=NOW + timedelta(days=30))
    elif case == "wrong key usage":
        cert = _issue(space, "server-only", dns_names=["chu-nord.test"], role="local")
    else:
        cert = good
    ctx = _context(*((None, None) if case == "no certificate" else cert), ca, tls12_only=case == "TLS 1.2")
    assert await _inbox_answered(space.hub_config.listen.port, ctx) is (case == "good")
    await _legitimate_traffic_still_flows(space)


async def test_tls12_only_when_allowed_and_only_ecdhe_aead(stopped_space: Space, ca: Path) -> None:
    space = stopped_space
    space.hub_config = replace(space.hub_config, tls=TlsPolicy(allow_tls12=True))
    await space.start()
    cert = _issue(space, "tls12", dns_names=["chu-nord.test"], role="relay")
    port = space.hub_config.listen.port
    assert await _inbox_answered(port, _context(*cert, ca, tls12_only=True, ciphers="ECDHE+AESGCM"))
    # Static RSA key exchange and CBC suites stay refused.
    assert not await _inbox_answered(port, _context(*cert, ca, tls12_only=True, ciphers="AES128-SHA:AES256-SHA"))
    assert not await _inbox_answered(port, _context(*cert, ca, tls12_only=True, ciphers="ECDHE+AES128+SHA1"))
    await _legitimate_traffic_still_flows(space)


async def test_stale_crl_fails_closed_unless_told_to_warn(stopped_space: Space, ca: Path) -> None:
    space = stopped_space
    crl = space.directory / "stale.crl"
    authority.make_crl(ca, space.directory / "pki" / "ca.key", crl, days=1, last_update=NOW - timedelta(days=3))
    space.hub_config = replace(space.hub_config, tls=TlsPolicy(crl_files=(crl,)))
    await space.start_hub()
    await space.start_relay(space.a, wait_connected=False)
    with trio.fail_after(2):
        await space.wait_uplink(space.a, "down")
    await space.stop_hub()
    space.hub_config = replace(space.hub_config, tls=TlsPolicy(crl_files=(crl,), crl_stale="warn"))
    await space.start_hub()
    await space.wait_uplink(space.a, "connected")


async def test_relay_refuses_a_revoked_hub_and_a_hub_of_another_organisation(stopped_space: Space, ca: Path) -> None:
    space = stopped_space
    crl = space.directory / "hub-revoked.crl"
    hub_cert = space.directory / "pki" / "hub.eimis.test.pem"
    authority.make_crl(ca, space.directory / "pki" / "ca.key", crl, revoked=[hub_cert])
    await space.start_hub()
    space.a.config = replace(space.a.config, uplink=replace(space.a.config.uplink, tls=TlsPolicy(crl_files=(crl,))))
    space.b.config = replace(space.b.config,
                             uplink=replace(space.b.config.uplink, hub_org_ids=frozenset({"1999999999"})))
    for relay in space.relays:
        await space.start_relay(relay, wait_connected=False)
    for relay in space.relays:
        with trio.fail_after(STEP):
            await space.wait_uplink(relay, "down")
    # Retried with backoff, still refused: the uplink never comes up.
    for relay in space.relays:
        with trio.fail_after(STEP):
            while (await space.daemon_status(relay))["uplink"]["reconnects"] < 2:
                await trio.sleep(0.05)
        async with relay.client() as client:
            assert (await client.get("/healthz")).json()["uplink"] != "connected"


async def test_forged_sender_is_refused_and_logged_with_the_certificate(
    space: Space, ca: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki_dir = space.directory / "pki"
    ctx = _context(pki_dir / "clinique-sud.test.pem", pki_dir / "clinique-sud.test.key", ca)
    forged = Envelope("forged-message-1", "alice@chu-nord.test", ("bob@clinique-sud.test",),
                      ("bob@clinique-sud.test",), "I am alice, trust me", None, "normal", NOW.timestamp())
    tcp = await trio.open_tcp_stream("127.0.0.1", space.hub_config.listen.port)
    tls = trio.SSLStream(tcp, ctx, server_hostname="hub.eimis.test")
    conn = h2connection.Http2Connection(tls, client=True, name="hub")
    with caplog.at_level(logging.WARNING, logger="relay.hub.server"), trio.fail_after(STEP):
        async with trio.open_nursery(strict_exception_groups=True) as nursery:
            await nursery.start(conn.run)
            status, body = await conn.request("POST", "/v1/transactions/forged-txn-0001",
                                              protocol.encode_transaction([forged]), authority="hub.eimis.test",
                                              content_type=protocol.MSGPACK, limit=1 << 20)
            conn.abort()
    assert status == 200
    [outcome] = protocol.decode_outcomes(body, 1)
    assert (outcome.accepted, outcome.reason) == (False, protocol.SENDER_NOT_AUTHENTICATED)
    refusal = next(r.getMessage() for r in caplog.records if "sender not of" in r.getMessage())
    assert "clinique-sud.test" in refusal and "org 1130000002" in refusal and "serial" in refusal
    async with space.b.client() as client:
        assert (await client.get("/v1/events", params={"wait": 0.5})).json()["events"] == []
    await _legitimate_traffic_still_flows(space)


async def test_a_relay_revoked_while_connected_is_cut_off(stopped_space: Space, ca: Path) -> None:
    space = stopped_space
    crl = space.directory / "national.crl"
    ca_key = space.directory / "pki" / "ca.key"
    authority.make_crl(ca, ca_key, crl)  # nobody revoked yet
    space.hub_config = replace(space.hub_config, tls=TlsPolicy(crl_files=(crl,)))
    await space.start()
    await _legitimate_traffic_still_flows(space)
    authority.make_crl(ca, ca_key, crl, revoked=[space.directory / "pki" / "chu-nord.test.pem"])
    async with space.a.client() as client:  # relay A's next request meets the new CRL
        await client.post("/v1/messages", json={"from": "alice@chu-nord.test", "to": ["bob@clinique-sud.test"],
                                                "body": "after revocation"})
    with trio.fail_after(STEP):
        await space.wait_uplink(space.a, "down")
    async with space.b.client() as client:
        events = (await client.get("/v1/events", params={"wait": 1})).json()["events"]
    assert [e["message"]["body"] for e in events] == ["still served"]


@pytest.mark.parametrize("case", ["hub certificate from another CA", "hub certificate for another name",
                                  "hub certificate without serverAuth"])
async def test_relays_refuse_a_hub_they_should_not_trust(stopped_space: Space, case: str) -> None:
    space = stopped_space
    if case == "hub certificate from another CA":
        ca, key = authority.create_ca(space.directory / "rogue-ca", common_name="EIMIS Demo National CA")
        cert = authority.issue_certificate(ca, key, space.directory / "rogue", dns_names=["hub.eimis.test"],
                                     ip_addresses=["127.0.0.1"], role="hub")
    elif case == "hub certificate for another name":
        cert = _issue(space, "elsewhere", dns_names=["hub.elsewhere.test"], role="hub")
    else:
        cert = _issue(space, "client-only", dns_names=["hub.eimis.test"], role="relay")
    space.hub_config = replace(space.hub_config, cert_file=cert[0], key_file=cert[1])
    await space.start_hub()
    await space.start_relay(space.a, wait_connected=False)
    with trio.fail_after(STEP):
        await space.wait_uplink(space.a, "down")
    async with space.a.client() as client:
        assert (await client.get("/healthz")).json()["uplink"] != "connected"

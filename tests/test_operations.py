"""The operations tools against real processes of a demo space, as a
hospital's administrator uses them: ``status``, ``queue``, ``/metrics``,
``doctor``, ``enroll``, ``backup``/``restore``, SIGHUP and SIGTERM."""

from __future__ import annotations

import json
import re
import signal
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from peers import LoopbackServer, read_head
from processes import STEP, DemoSpace, Site
from prometheus_client.parser import text_string_to_metric_families

from relay.cli.demo import HUB_NAME
from relay.core.protocol import Envelope, Outcome
from relay.pki import authority, identity
from relay.store import relay_admin, relay_queue
from relay.store.engine import Store
from relay.store.sealing import KEY_FILE, KeyRing

pytestmark = pytest.mark.e2e

BOB = "bob@clinique-sud.test"


METRICS_LISTENING = re.compile(r"metrics on 127\.0\.0\.1:(\d+)")


async def cli(*args: str) -> subprocess.CompletedProcess:
    """An ``eimis-relay`` command, as an administrator types it."""
    with trio.fail_after(STEP * 2):
        return await trio.run_process([sys.executable, "-m", "relay", *args], capture_stdout=True,
                                      capture_stderr=True, check=False, stdin=subprocess.DEVNULL)


async def wait_log(process, text: str, count: int = 1) -> None:
    with trio.fail_after(STEP):
        while process.log.read_text().count(text) < count:
            await trio.sleep(0.05)


class OpsSpace(DemoSpace):
    """A demo space whose relay A serves metrics and stops within 2 s."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.metrics = ""  # known once relay A has said which port it got
        self.config_a = self.manifest["relays"][0]["config"]
        with (directory / "relay-a.toml").open("a") as config:
            config.write('\n[metrics]\nlisten = "127.0.0.1:0"\n')
        self.edit("relay-a.toml", "[relay]\n", '[relay]\nshutdown_grace = "2s"\n')

    async def start_relay(self, site: Site) -> re.Match:
        line = await super().start_relay(site)
        if site is self.a and not self.metrics:
            port = METRICS_LISTENING.search(line.string, line.end()).group(1)
            self.edit("relay-a.toml", '[metrics]\nlisten = "127.0.0.1:0"', f'[metrics]\nlisten = "127.0.0.1:{port}"')
            self.metrics = f"http://127.0.0.1:{port}"
        return line

    async def status(self) -> tuple[int, dict | str]:
        result = await cli("status", "--json", "--config", self.config_a)
        return result.returncode, json.loads(result.stdout) if result.returncode in (0, 1) else result.stderr.decode()

    def state(self) -> Path:
        return self.directory / "state-relay-a"


@pytest.fixture
async def ops(tmp_path: Path):
    space = OpsSpace(tmp_path)
    try:
        yield space
    finally:
        space.close()


async def test_status_says_healthy_or_not_and_whether_the_relay_runs(ops: OpsSpace) -> None:
    await ops.start()
    code, snapshot = await ops.status()
    assert code == 0, snapshot
    assert snapshot["healthy"] and snapshot["uplink"]["state"] == "connected"
    assert {c["name"] for c in snapshot["certificates"]} == {"relay", "hub"}
    human = await cli("status", "--config", ops.config_a)
    assert human.returncode == 0 and b"health       ok" in human.stdout and b"chu-nord.test" in human.stdout
    lock = json.loads((ops.state() / "relay.lock").read_text())
    assert stat.S_IMODE(Path(lock["admin_socket"]).stat().st_mode) == 0o600

    ops.hub.kill()
    with trio.fail_after(STEP):
        while (await ops.status())[0] != 1:
            await trio.sleep(0.1)
    code, snapshot = await ops.status()
    assert any("not connected to the hub" in p for p in snapshot["problems"])

    assert ops.a.process.terminate() == 0
    result = await cli("status", "--config", ops.config_a)
    assert result.returncode == 3 and b"no eimis-relay daemon is running" in result.stderr


async def test_a_second_daemon_on_the_same_store_refuses_to_start(ops: OpsSpace) -> None:
    await ops.start()
    result = await cli("run", "--config", ops.config_a)
    assert result.returncode == 75  # EX_TEMPFAIL: free to start once the other one stops
    assert f"in use by eimis-relay run (pid {ops.a.process.popen.pid})".encode() in result.stderr


async def test_queue_tools_through_the_running_daemon(ops: OpsSpace) -> None:
    await ops.start()
    ops.hub.kill()  # messages stay queued at relay A
    await ops.a.uplink("down")
    ident = await ops.a.send(BOB, "Résultats du patient de la chambre 12")
    config = ("--config", ops.config_a)

    listed = json.loads((await cli("queue", "list", "--state", "queued", "--json", *config)).stdout)
    assert [m["id"] for m in listed] == [ident]
    assert json.loads((await cli("queue", "list", "--to", "elsewhere.test", "--json", *config)).stdout) == []
    assert json.loads((await cli("queue", "list", "--state", "failed", "--json", *config)).stdout) == []
    shown = await cli("queue", "show", ident, *config)
    assert shown.returncode == 0 and b"chambre 12" not in shown.stdout and BOB.encode() in shown.stdout
    assert "chambre 12" in (await cli("queue", "show", ident, "--body", *config)).stdout.decode()
    missing = await cli("queue", "show", "no-such-message", *config)
    assert missing.returncode == 1 and b"no message no-such-message" in missing.stderr

    retried = await cli("queue", "retry", ident, *config)
    assert retried.returncode == 0 and b"dials the hub now" in retried.stdout

    unconfirmed = await cli("queue", "purge", ident, *config)
    assert unconfirmed.returncode == 1 and b"--yes" in unconfirmed.stderr
    purged = await cli("queue", "purge", ident, "--yes", *config)
    assert purged.returncode == 0, purged.stderr
    assert (await ops.a.status(ident)) == "failed"
    [notice] = await ops.a.events(1)
    assert notice["type"] == "failed" and notice["notice"]["recipients"] == {BOB: relay_admin.PURGED}
    assert "relay.net.admin_socket" not in ops.a.process.log.read_text()  # no admin request failed


async def test_queue_retry_with_no_daemon_works_on_the_store_itself(ops: OpsSpace) -> None:
    """A message whose envelope for late.test the hub refused (before its
    operator registered that domain), its other envelope still queued when
    relay A stopped: ``queue retry`` with the relay stopped queues the
    failed recipient again, under the state directory's lock."""
    ops.edit("hub.toml", "domains = [", 'domains = ["late.test", ')
    ident = "msg-retried-offline"
    zoe = "zoe@late.test"

    def refused(conn) -> None:
        relay_queue.submit(conn, relay_queue.Submission(ident, "chu-nord.test", "demo-messenger", None,
                                                        ops.a.users[0], (BOB, zoe), None, "normal", "again"),
                           now=time.time())
        seq, = conn.execute("SELECT seq FROM outbox WHERE dest = 'late.test'").fetchone()
        env = Envelope(ident, ops.a.users[0], (BOB, zoe), (zoe,), "again", None, "normal", time.time())
        relay_queue.apply_outcomes(conn, [(seq, env, Outcome(False, "unknown_domain", "no relay"))], now=time.time())

    await ops.start_hub()
    ops.hub.kill()
    await ops.start_relay(ops.a)  # creates the store and its key ring, then stops
    await ops.a.uplink("down")
    assert ops.a.process.terminate() == 0
    ring = KeyRing.load(ops.state() / KEY_FILE)
    async with Store.open(ops.state() / "relay.db", relay_queue.MIGRATIONS, ring) as store:
        await store.run("refused", refused)

    result = await cli("queue", "retry", "--all-failed", "--config", ops.config_a)
    assert result.returncode == 0 and f"{ident}: retried".encode() in result.stdout

    ops.hub.start()
    ops.a.process.start()
    await ops.start_relay(ops.b)
    await ops.a.uplink("connected")
    with trio.fail_after(STEP):
        while True:
            async with ops.a.client() as client:
                recipients = (await client.get(f"/v1/messages/{ident}")).json()["recipients"]
            if recipients[zoe]["status"] == "sent" and recipients[BOB]["status"] == "delivered":
                break
            await trio.sleep(0.05)


async def test_metrics_readyz_and_healthz(ops: OpsSpace) -> None:
    await ops.start()
    sent = [await ops.a.send(BOB, f"normal {n}") for n in range(3)]
    async with ops.a.client() as client:
        response = await client.post("/v1/messages", json={"from": ops.a.users[0], "to": [BOB], "body": "vite",
                                                           "priority": "urgent"})
    sent.append(response.json()["id"])
    await ops.a.wait_delivered(sent)
    async with httpx.AsyncClient(base_url=ops.metrics, timeout=STEP) as scraper:
        with trio.fail_after(STEP):  # the last delivery receipt may still be on its way
            while True:
                text = (await scraper.get("/metrics")).text
                samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                           for family in text_string_to_metric_families(text) for s in family.samples}
                if samples[("eimis_relay_messages_delivered_total", (("priority", "normal"),))] == 3:
                    break
                await trio.sleep(0.05)
        assert samples[("eimis_relay_messages_accepted_total", (("priority", "normal"),))] == 3
        assert samples[("eimis_relay_messages_accepted_total", (("priority", "urgent"),))] == 1
        assert samples[("eimis_relay_messages_sent_total", (("priority", "urgent"),))] == 1
        assert samples[("eimis_relay_messages_delivered_total", (("priority", "urgent"),))] == 1
        assert samples[("eimis_relay_delivery_seconds_count", (("priority", "normal"),))] == 3
        assert samples[("eimis_relay_store_commit_seconds_count", ())] > 0
        assert samples[("eimis_relay_uplink_connected", ())] == 1
        assert samples[("eimis_relay_outbound_queue", (("priority", "normal"),))] == 0
        assert samples[("eimis_relay_inbound_unread", (("system", "demo-messenger"),))] == 0
        assert samples[("eimis_relay_messages_delayed_total", ())] == 0  # all delivered within delay_warning
        assert samples[("eimis_relay_recipients_expired_total", ())] == 0
        assert ("eimis_relay_build_info", (("python", sys.version.split()[0]), ("version", "0.1.0"))) in samples
        cert = identity.load_certificates(ops.directory / "pki" / "chu-nord.test.pem")[0]
        expires = samples[("eimis_relay_certificate_expiry_timestamp_seconds", (("certificate", "relay"),))]
        assert expires == identity.peer_identity(cert.public_bytes(serialization.Encoding.DER)).not_after.timestamp()
        assert ("eimis_relay_certificate_expiry_timestamp_seconds", (("certificate", "hub"),)) in samples
        assert (await scraper.get("/healthz")).status_code == 200
        assert (await scraper.get("/readyz")).json() == {"ready": True, "status": "ready", "reasons": []}

        ops.hub.kill()
        await ops.a.uplink("down")
        ready = await scraper.get("/readyz")
        assert ready.status_code == 503 and "uplink" in ready.json()["reasons"][0]
        text = (await scraper.get("/metrics")).text
        assert "eimis_relay_uplink_connected 0.0" in text
        assert "eimis_relay_uplink_reconnects_total" in text


async def _served_certificate(port: int, ops: OpsSpace) -> x509.Certificate:
    """What a relay connecting to the hub now sees."""
    pki_dir = ops.directory / "pki"
    context = ssl.create_default_context(cafile=pki_dir / "ca.pem")
    context.load_cert_chain(pki_dir / "clinique-sud.test.pem", pki_dir / "clinique-sud.test.key")
    context.set_alpn_protocols(["h2"])
    with trio.fail_after(STEP):
        stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), context, server_hostname=HUB_NAME)
        await stream.do_handshake()
    cert = x509.load_der_x509_certificate(stream.getpeercert(binary_form=True))
    await trio.aclose_forcefully(stream)
    return cert


async def test_sighup_puts_a_renewed_hub_certificate_in_use_without_dropping_work(ops: OpsSpace) -> None:
    await ops.start()
    port = urlsplit(ops.manifest["hub"]["url"]).port
    before = await _served_certificate(port, ops)
    pki_dir = ops.directory / "pki"
    authority.issue_certificate(pki_dir / "ca.pem", pki_dir / "ca.key", pki_dir, dns_names=[HUB_NAME, "localhost"],
                          ip_addresses=["127.0.0.1"], role="hub", days=400)
    ops.hub.popen.send_signal(signal.SIGHUP)
    await wait_log(ops.hub, "reloaded")
    after = await _served_certificate(port, ops)
    assert after.serial_number != before.serial_number
    ident = await ops.a.send(BOB, "after the renewal")  # the relays' connections stayed up
    await ops.a.wait_delivered([ident])


async def test_a_relay_picks_up_its_renewed_certificate_from_disk(ops: OpsSpace) -> None:
    await ops.start()
    pki_dir = ops.directory / "pki"
    authority.issue_certificate(pki_dir / "ca.pem", pki_dir / "ca.key", pki_dir, dns_names=["chu-nord.test"],
                          role="relay", org_id="1750000001", days=30)
    await wait_log(ops.a.process, "reconnecting with the new certificate")
    await ops.a.uplink("connected")
    ident = await ops.a.send(BOB, "with the new certificate")
    await ops.a.wait_delivered([ident])
    code, snapshot = await ops.status()
    assert code == 0 and snapshot["reload"]["trigger"] == "a certificate file changed on disk"
    assert [c["name"] for c in snapshot["certificates"] if (c["expires"] - time.time()) < 31 * 86400] == ["relay"]
    assert any("expires in 30 days" in w for w in snapshot["warnings"])
    await wait_log(ops.a.process, "certificate relay")  # the 30-day warning, from the status reporter's next round


async def test_an_invalid_config_on_sighup_keeps_the_old_one_and_logs_every_error(ops: OpsSpace) -> None:
    await ops.start()
    ops.edit("relay-a.toml", "[relay]\n", '[relay]\nlog_level = "chatty"\nmessage_ttl = -1\n')
    ops.a.process.popen.send_signal(signal.SIGHUP)
    await wait_log(ops.a.process, "the previous configuration stays in force")
    log = ops.a.process.log.read_text()
    assert "[relay].log_level" in log and "[relay].message_ttl" in log
    code, snapshot = await ops.status()
    assert code == 0 and len(snapshot["reload"]["errors"]) == 2
    ident = await ops.a.send(BOB, "the old configuration still runs")  # the old token still works
    await ops.a.wait_delivered([ident])


async def test_sigterm_drains_and_no_request_is_lost(ops: OpsSpace) -> None:
    """Submitters keep going while relay A gets SIGTERM: every request is
    either answered 202 or fails on the wire and is retried (same
    Idempotency-Key) after the restart; relay B then has each message once."""
    await ops.start()
    keys: dict[str, dict] = {}
    answered: dict[str, str] = {}
    unanswered: list[str] = []
    stop = trio.Event()

    async def submitter(worker: int) -> None:
        async with ops.a.client() as client:
            for n in range(10_000):
                key = f"w{worker}-{n}"
                keys[key] = {"from": ops.a.users[0], "to": [BOB], "body": key}
                try:
                    response = await client.post("/v1/messages", json=keys[key], headers={"Idempotency-Key": key})
                except httpx.TransportError:
                    unanswered.append(key)
                    return
                assert response.status_code == 202, response.text
                answered[key] = response.json()["id"]
                if stop.is_set():
                    return

    async with trio.open_nursery() as nursery:
        for worker in range(6):
            nursery.start_soon(submitter, worker)
        with trio.fail_after(STEP):
            while len(answered) < 60:
                await trio.sleep(0.01)
        ops.a.process.popen.send_signal(signal.SIGTERM)
        with trio.fail_after(STEP):
            while ops.a.process.popen.poll() is None:
                await trio.sleep(0.02)
        stop.set()
    assert ops.a.process.popen.returncode == 0

    ops.a.process.start()
    await ops.a.uplink("connected")
    async with ops.a.client() as client:
        for key in unanswered:
            response = await client.post("/v1/messages", json=keys[key], headers={"Idempotency-Key": key})
            assert response.status_code == 202
            answered[key] = response.json()["id"]
    await ops.a.settled()
    received = [e["message"]["id"] for e in await ops.b.events(len(answered))]
    assert sorted(received) == sorted(answered.values())


async def test_the_shutdown_grace_bounds_a_request_that_does_not_finish(ops: OpsSpace) -> None:
    await ops.start()
    async with trio.open_nursery() as nursery:
        async def long_poll() -> None:
            async with ops.a.client() as client:
                try:
                    await client.get("/v1/events", params={"after": 0, "wait": 30})
                except httpx.TransportError:
                    pass

        nursery.start_soon(long_poll)
        await trio.sleep(0.5)  # let the poll reach the relay (nothing observable to wait on)
        started = time.monotonic()
        ops.a.process.popen.send_signal(signal.SIGTERM)
        with trio.fail_after(STEP):
            while ops.a.process.popen.poll() is None:
                await trio.sleep(0.02)
        elapsed = time.monotonic() - started
    assert ops.a.process.popen.returncode == 0
    assert 1.5 < elapsed < 6, elapsed  # shutdown_grace = "2s", not the default 10 s


async def test_backup_while_running_then_restore(ops: OpsSpace, tmp_path: Path) -> None:
    await ops.start()
    ops.hub.kill()
    await ops.a.uplink("down")
    kept = await ops.a.send(BOB, "in the backup")
    backups = tmp_path / "backups"
    backups.mkdir()
    result = await cli("backup", str(backups), "--config", ops.config_a)
    assert result.returncode == 0, result.stderr
    [copy] = backups.iterdir()
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    later = await ops.a.send(BOB, "after the backup")

    refused = await cli("restore", str(copy), "--config", ops.config_a)
    assert refused.returncode == 1 and b"stop the relay first" in refused.stderr
    assert ops.a.process.terminate() == 0
    restored = await cli("restore", str(copy), "--config", ops.config_a)
    assert restored.returncode == 0, restored.stderr
    assert list(ops.state().glob("relay.db.replaced-*"))

    ops.hub.start()
    ops.a.process.start()
    await ops.a.uplink("connected")
    await ops.a.wait_delivered([kept])
    async with ops.a.client() as client:
        assert (await client.get(f"/v1/messages/{later}")).status_code == 404


async def test_enroll_makes_a_private_key_and_a_csr(tmp_path: Path) -> None:
    out = tmp_path / "enrol"
    result = await cli("enroll", "--domain", "chu-nord.example", "--org-id", "1750000001", "--out", str(out))
    assert result.returncode == 0, result.stderr
    key, csr = out / "chu-nord.example.key", out / "chu-nord.example.csr"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    request = x509.load_pem_x509_csr(csr.read_bytes())
    assert request.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["chu-nord.example"]
    again = await cli("enroll", "--domain", "chu-nord.example", "--out", str(out))
    assert again.returncode == 1 and b"refusing to overwrite" in again.stderr


async def test_doctor_passes_a_healthy_relay(ops: OpsSpace) -> None:
    await ops.start()
    result = await cli("doctor", "--config", ops.config_a)
    report = result.stdout.decode()
    assert result.returncode == 0, report
    for topic in ("config", "permissions", "certificate", "key size", "tls", "dns", "tcp", "handshake", "clock",
                  "store", "daemon"):
        assert f"ok       {topic}" in report, topic


class InterceptingProxy(LoopbackServer):
    """A TLS-inspecting CONNECT proxy: it answers the handshake itself, with
    a certificate for the hub's name from a CA of its own."""

    def __init__(self, directory: Path) -> None:
        ca, ca_key = authority.create_ca(directory, common_name="Inspection Box CA")
        cert, key = authority.issue_certificate(ca, ca_key, directory, dns_names=[HUB_NAME], role="hub")
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)


    async def _handle(self, client: trio.SocketStream) -> None:
        if await read_head(client) is None:
            return
        await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        tls = trio.SSLStream(client, self.context, server_side=True)
        try:
            await tls.do_handshake()
            await tls.receive_some(1)
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(tls)


async def test_doctor_names_an_intercepting_proxy(ops: OpsSpace, tmp_path: Path, nursery) -> None:
    proxy = InterceptingProxy(tmp_path / "inspection")
    await nursery.start(proxy.serve)
    ops.edit("relay-a.toml", "[uplink]\n", f'[uplink]\nproxy = "http://127.0.0.1:{proxy.port}"\n')
    await ops.start_hub()  # which names the hub's port in relay A's config
    result = await cli("doctor", "--config", ops.config_a)
    report = result.stdout.decode()
    assert result.returncode == 1, report
    assert "failed   handshake" in report and "an intercepting proxy (TLS inspection) is in the way" in report
    assert "Inspection Box CA" in report and "exempt" in report
    assert "ok       tcp" in report and "through the proxy" in report


async def test_sighup_puts_a_renewed_local_api_certificate_in_use(ops: OpsSpace) -> None:
    """The local API over TLS: after a renewal and SIGHUP, a vendor's system
    connecting sees the new certificate, from the same live listener."""
    pki_dir = ops.directory / "pki"

    def issue() -> None:
        authority.issue_certificate(pki_dir / "ca.pem", pki_dir / "ca.key", pki_dir, dns_names=["relay-a.local"],
                              ip_addresses=["127.0.0.1"], role="local")

    issue()
    ops.edit("relay-a.toml", "[local_api]\n", '[local_api]\ntls_cert_file = "pki/relay-a.local.pem"\n'
                                              'tls_key_file = "pki/relay-a.local.key"\n')
    context = ssl.create_default_context(cafile=pki_dir / "ca.pem")
    await ops.start_hub()
    await ops.start_relay(ops.a)  # once it has logged its port, it is listening
    port = urlsplit(ops.a.url).port

    async def served() -> int:
        with trio.fail_after(STEP):
            stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), context,
                                    server_hostname="relay-a.local")
            await stream.do_handshake()
        serial = x509.load_der_x509_certificate(stream.getpeercert(binary_form=True)).serial_number
        await trio.aclose_forcefully(stream)
        return serial

    before = await served()
    issue()
    ops.a.process.popen.send_signal(signal.SIGHUP)
    await wait_log(ops.a.process, "reloaded")
    assert await served() != before
    async with httpx.AsyncClient(verify=context, timeout=STEP) as client:
        assert (await client.get(f"https://127.0.0.1:{port}/healthz")).status_code == 200


async def test_queue_retry_reaches_a_destination_after_the_hub_failed_the_message(ops: OpsSpace) -> None:
    """The hub took the message, then failed it (its time-to-live ran out
    while relay B was down): every envelope has left relay A.  ``queue
    retry`` sends it again under a new envelope id, which the hub does not
    drop as a duplicate; relay B gets it once, under the message's id, and
    relay A's local system sees that id delivered."""
    ops.edit("relay-a.toml", "[relay]\n", '[relay]\nmessage_ttl = "4s"\n')
    ops.edit("hub.toml", "[hub]\n", "[hub]\nexpiry_interval = 0.2\n")
    await ops.start_hub()
    await ops.start_relay(ops.a)
    await ops.a.uplink("connected")
    ident = await ops.a.send(BOB, "retried after the hub failed it")
    with trio.fail_after(STEP * 2):
        while (status := await ops.a.status(ident)) != "failed":
            assert status in ("queued", "sent"), status
            await trio.sleep(0.05)
    async with ops.a.client() as client:
        assert (await client.get(f"/v1/messages/{ident}")).json()["recipients"][BOB]["reason"] == "expired"

    await ops.start_relay(ops.b)
    await ops.b.uplink("connected")
    result = await cli("queue", "retry", ident, "--config", ops.config_a)
    assert result.returncode == 0 and f"{ident}: retried".encode() in result.stdout, result
    await ops.a.wait_delivered([ident])
    await ops.a.settled()  # nothing more can reach relay B from relay A
    [event] = await ops.b.events(1)
    assert (event["message"]["id"], event["message"]["body"]) == (ident, "retried after the hub failed it")

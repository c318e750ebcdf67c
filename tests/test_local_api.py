"""The local API contract, exercised the way vendors' systems use it:
httpx over HTTP/1.1 and over cleartext HTTP/2 (prior knowledge), and curl."""

from __future__ import annotations

import json
import shutil
import ssl
from dataclasses import replace

import httpx
import pytest
import trio
from conftest import STEP, Space

from relay.appliance.local_api import LocalApi
from relay.core.ratelimit import TokenBucket
from relay.pki import authority


@pytest.fixture(params=["http/1.1", "h2c"])
def protocol(request: pytest.FixtureRequest) -> dict:
    """Both wire protocols the local port speaks."""
    return {"http1": True, "http2": False} if request.param == "http/1.1" else {"http1": False, "http2": True}


async def test_submit_answers_202_with_id_over_both_protocols(space: Space, protocol: dict) -> None:
    async with space.a.client(**protocol) as client:
        response = await client.post("/v1/messages", json={"from": "alice@chu-nord.test",
                                                          "to": ["bob@clinique-sud.test"], "body": "hi"})
        assert response.http_version == ("HTTP/2" if protocol["http2"] else "HTTP/1.1")
    assert response.status_code == 202
    document = response.json()
    assert document["status"] == "queued" and document["id"]
    assert response.headers["content-type"] == "application/json"


async def test_healthz_needs_no_token(space: Space, protocol: dict) -> None:
    async with httpx.AsyncClient(base_url=space.a.url, timeout=STEP, **protocol) as client:
        response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "uplink": "connected"}


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "unauthorized"),
        ({"Authorization": "Bearer not-a-token"}, 401, "unauthorized"),
        ({"Authorization": "Basic Zm9vOmJhcg=="}, 401, "unauthorized"),
    ],
)
async def test_bad_or_missing_token_is_401(space: Space, headers: dict, status: int, code: str) -> None:
    async with httpx.AsyncClient(base_url=space.a.url, timeout=STEP) as client:
        response = await client.post("/v1/messages", headers=headers, json={})
        events = await client.get("/v1/events", headers=headers)
    assert (response.status_code, response.json()["error"]["code"]) == (status, code)
    assert events.status_code == 401


@pytest.mark.parametrize(
    ("document", "status", "field"),
    [
        ({"from": "alice@chu-nord.test", "to": ["bob@clinique-sud.test"]}, 400, "body"),
        ({"from": "alice@chu-nord.test", "to": [], "body": "x"}, 400, "to"),
        ({"from": "alice@chu-nord.test", "to": ["not an address"], "body": "x"}, 400, "to[0]"),
        ({"from": "alice@chu-nord.test", "to": ["bob@clinique-sud.test"], "body": 3}, 400, "body"),
        ({"from": "alice@chu-nord.test", "to": ["bob@clinique-sud.test"], "body": "x", "priority": "high"},
         400, "priority"),
        ({"from": "alice@chu-nord.test", "to": ["bob@clinique-sud.test"], "body": "x", "thread": 7}, 400, "thread"),
        ({"from": "alice@chu-nord.test", "to": ["bob@clinique-sud.test"], "body": "x", "colour": "red"},
         400, "colour"),
        ({"from": "nope", "to": ["bob@clinique-sud.test"], "body": "x"}, 400, "from"),
        ({"from": "mallory@chu-nord.test", "to": ["bob@clinique-sud.test"], "body": "x"}, 403, "from"),
        ({"from": "bob@clinique-sud.test", "to": ["alice@chu-nord.test"], "body": "x"}, 403, "from"),
    ],
)
async def test_invalid_submissions_name_the_field(space: Space, document: dict, status: int, field: str) -> None:
    async with space.a.client() as client:
        response = await client.post("/v1/messages", json=document)
        error = response.json()["error"]
        assert response.status_code == status, response.text
        assert error["message"].startswith(field + ":"), error
        # Nothing was stored: the events and statuses of the relay are untouched.
        assert (await client.get("/v1/events")).json() == {"events": [], "next": 0}


async def test_not_json_is_415_and_malformed_json_is_400(space: Space) -> None:
    async with space.a.client() as client:
        wrong_type = await client.post("/v1/messages", content=b"hello", headers={"content-type": "text/plain"})
        malformed = await client.post("/v1/messages", content=b"{nope", headers={"content-type": "application/json"})
        not_object = await client.post("/v1/messages", json=[1, 2])
    assert wrong_type.status_code == 415
    assert (malformed.status_code, malformed.json()["error"]["code"]) == (400, "invalid_json")
    assert not_object.status_code == 400


async def test_oversized_request_is_413_and_server_keeps_serving(space: Space, protocol: dict) -> None:
    limit = space.a.config.local_api.max_body_bytes
    big = json.dumps({"from": "alice@chu-nord.test", "to": ["bob@clinique-sud.test"], "body": "x" * (limit + 10)})
    async with space.a.client(**protocol) as client:
        response = await client.post("/v1/messages", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"
    await space.send(space.a, ["bob@clinique-sud.test"], "still fine")


async def test_body_over_the_protocol_limit_is_413(space: Space) -> None:
    async with space.a.client() as client:
        response = await client.post("/v1/messages", json={"from": "alice@chu-nord.test",
                                                          "to": ["bob@clinique-sud.test"], "body": "é" * 200_000})
    assert response.status_code == 413
    assert response.json()["error"]["message"].startswith("body:")


async def test_idempotency_key_returns_the_same_message(space: Space) -> None:
    document = {"from": "alice@chu-nord.test", "to": ["bob@clinique-sud.test"], "body": "once"}
    async with space.a.client() as client:
        first = await client.post("/v1/messages", json=document, headers={"Idempotency-Key": "order-17"})
        again = await client.post("/v1/messages", json=document, headers={"Idempotency-Key": "order-17"})
        other = await client.post("/v1/messages", json=document, headers={"Idempotency-Key": "order-18"})
    assert first.status_code == again.status_code == other.status_code == 202
    assert first.json()["id"] == again.json()["id"] != other.json()["id"]
    await space.settled(space.a)  # all delivered and acknowledged: nothing more can come
    events = await space.events(space.b, 2)
    assert sorted(e["message"]["id"] for e in events) == sorted([first.json()["id"], other.json()["id"]])


async def test_status_is_private_to_the_sending_system(space: Space) -> None:
    ident = await space.send(space.a, ["bob@clinique-sud.test"], "mine")
    async with space.b.client() as client:  # another relay's system: never sent it
        response = await client.get(f"/v1/messages/{ident}")
    assert response.status_code == 404
    async with space.a.client() as client:
        missing = await client.get("/v1/messages/doesnotexist")
    assert missing.status_code == 404


@pytest.fixture
def local_apis(monkeypatch: pytest.MonkeyPatch) -> list[LocalApi]:
    """The local APIs the test's relays build, to see inside them."""
    built: list[LocalApi] = []
    init = LocalApi.__init__

    def remember(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(LocalApi, "__init__", remember)
    return built


async def test_events_long_poll_wakes_when_a_message_arrives(local_apis: list[LocalApi], stopped_space: Space) -> None:
    space = stopped_space
    await space.start()
    [api_b] = [api for api in local_apis if api.config.domain == space.b.domain]
    arrival = api_b.events.signal("demo-messenger")
    async with space.b.client() as client:
        started = trio.current_time()
        async with trio.open_nursery(strict_exception_groups=True) as nursery:
            result = {}

            async def poll() -> None:
                result["page"] = (await client.get("/v1/events", params={"after": 0, "wait": 30})).json()

            nursery.start_soon(poll)
            with trio.fail_after(STEP):  # the poll found nothing and is parked on the system's signal
                while arrival.watch().statistics().tasks_waiting == 0:
                    await trio.sleep(0.01)
            await space.send(space.a, ["bob@clinique-sud.test"], "wake up")
    assert [e["message"]["body"] for e in result["page"]["events"]] == ["wake up"]
    assert trio.current_time() - started < 20  # answered on arrival, not at the end of the wait
    assert result["page"]["next"] == result["page"]["events"][0]["cursor"]


async def test_events_same_after_gives_same_events(space: Space) -> None:
    for n in range(3):
        await space.send(space.a, ["bob@clinique-sud.test"], f"m{n}")
    await space.events(space.b, 3)
    async with space.b.client() as client:
        first = (await client.get("/v1/events", params={"after": 0})).json()
        second = (await client.get("/v1/events", params={"after": 0})).json()
        tail = (await client.get("/v1/events", params={"after": first["events"][0]["cursor"]})).json()
        bad = await client.get("/v1/events", params={"wait": 61})
    assert first == second
    assert tail["events"] == first["events"][1:]
    assert bad.status_code == 400 and bad.json()["error"]["message"].startswith("wait:")


async def test_unknown_route_and_wrong_method(space: Space) -> None:
    async with space.a.client() as client:
        assert (await client.get("/v2/whatever")).status_code == 404
        wrong = await client.delete("/v1/messages")
    assert wrong.status_code == 405


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("flag", ["--http1.1", "--http2-prior-knowledge"])
async def test_curl_submits_and_reads(space: Space, flag: str) -> None:
    document = json.dumps({"from": "alice@chu-nord.test", "to": ["bob@clinique-sud.test"], "body": "par curl"})
    sent = await trio.run_process(
        ["curl", "-sS", "--fail-with-body", flag, f"{space.a.url}/v1/messages",
         "-H", f"Authorization: Bearer {space.a.token}", "-H", "Content-Type: application/json", "-d", document],
        capture_stdout=True,
    )
    ident = json.loads(sent.stdout)["id"]
    await space.events(space.b, 1)
    read = await trio.run_process(
        ["curl", "-sS", "--fail-with-body", flag, f"{space.b.url}/v1/events?after=0&wait=5",
         "-H", f"Authorization: Bearer {space.b.token}"],
        capture_stdout=True,
    )
    [event] = json.loads(read.stdout)["events"]
    assert event["message"]["id"] == ident and event["message"]["body"] == "par curl"


async def _raw_http1(url: str, request: bytes) -> bytes:
    """Send bytes as they are, which no well-behaved client library would."""
    host, port = url.removeprefix("http://").split(":")
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        await stream.send_all(request)
        answer = b""
        with trio.fail_after(STEP):
            while chunk := await stream.receive_some(65536):
                answer += chunk
                if b"\r\n\r\n" in answer:
                    break
    return answer


async def test_hostile_requests_get_4xx_and_the_relay_keeps_serving(space: Space) -> None:
    malformed_target = await _raw_http1(space.a.url, b"GET //[x HTTP/1.1\r\nHost: x\r\n\r\n")
    huge_headers = await _raw_http1(space.a.url, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000
                                    + b"\r\n\r\n")
    async with space.a.client() as client:
        surrogate = await client.post("/v1/messages", content=b'{"from": "alice@chu-nord.test", '
                                      b'"to": ["bob@clinique-sud.test"], "body": "\\ud800"}',
                                      headers={"content-type": "application/json"})
        superscript = await client.get("/v1/events", params={"after": "\u00b2"})
        enormous = await client.get("/v1/events", params={"after": "9" * 5000})
    assert malformed_target.startswith(b"HTTP/1.1 400 ")
    assert huge_headers.startswith(b"HTTP/1.1 431 ")
    assert (surrogate.status_code, surrogate.json()["error"]["code"]) == (400, "invalid_json")
    assert superscript.status_code == 400 and enormous.status_code == 400
    await space.send(space.a, ["bob@clinique-sud.test"], "still here")


def test_token_bucket_arithmetic() -> None:
    bucket = TokenBucket(rate=2.0, burst=3)
    assert [bucket.take(10.0) for _ in range(4)] == [0.0, 0.0, 0.0, 0.5]
    assert bucket.take(10.5) == 0.0  # one token came back in half a second
    assert bucket.take(10.5) == 0.5


async def test_a_system_over_its_rate_limit_gets_429(stopped_space: Space) -> None:
    space = stopped_space
    system = replace(space.a.config.local_systems[0], rate_limit=1.0, rate_burst=3, max_message_bytes=100)
    space.a.config = replace(space.a.config, local_systems=(system,))
    await space.start()
    async with space.a.client() as client:
        document = {"from": "alice@chu-nord.test", "to": ["bob@clinique-sud.test"], "body": "x"}
        answers = [(await client.post("/v1/messages", json=document)).status_code for _ in range(2)]
        too_long = await client.post("/v1/messages", json={**document, "body": "x" * 101})
        limited = await client.post("/v1/messages", json=document)
    # A refused request spends its token too; the refill is the bucket's
    # arithmetic, tested as data above.
    assert answers == [202, 202]
    assert too_long.status_code == 413 and too_long.json()["error"]["message"] == "body: larger than 100 bytes"
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
    assert int(limited.headers["retry-after"]) >= 1
    async with space.b.client() as other:  # another system is not affected
        assert (await other.get("/v1/events")).status_code == 200


async def test_local_tls_with_client_certificates(stopped_space: Space) -> None:
    space = stopped_space
    pki_dir = space.directory / "pki"
    ca, ca_key = pki_dir / "ca.pem", pki_dir / "ca.key"
    server = authority.issue_certificate(ca, ca_key, space.directory / "local", dns_names=["localhost"],
                                   ip_addresses=["127.0.0.1"], role="local")
    client = authority.issue_certificate(ca, ca_key, space.directory / "vendor", dns_names=["messenger.chu-nord.test"],
                                   role="relay")
    local = replace(space.a.config.local_api, tls_cert_file=server[0], tls_key_file=server[1], tls_client_ca_file=ca)
    space.a.config = replace(space.a.config, local_api=local)
    await space.start_hub()
    await space.start_relay(space.a, wait_connected=False)
    url = space.a.url.replace("http://", "https://")
    headers = {"Authorization": f"Bearer {space.a.token}"}
    with_cert = ssl.create_default_context(cafile=ca)
    with_cert.load_cert_chain(*client)
    async with httpx.AsyncClient(base_url=url, verify=with_cert, headers=headers, timeout=STEP) as good:
        assert (await good.get("/v1/events")).status_code == 200
    async with httpx.AsyncClient(base_url=url, verify=ssl.create_default_context(cafile=ca), headers=headers,
                                 timeout=STEP) as anonymous:
        with pytest.raises(httpx.TransportError):
            await anonymous.get("/v1/events")

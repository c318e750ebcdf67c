"""``eimis-relay demo``: a whole interoperability space on one machine.

``--init-only`` writes a throwaway PKI (a national CA, the hub's
certificate, one per hospital), ``hub.toml``, ``relay-a.toml``,
``relay-b.toml`` and ``demo.json`` into the directory.  Without it, the demo
then starts the hub and both relays as three processes from those very
files (exactly what an admin would run), sends a message from chu-nord.test
to clinique-sud.test, shows it arrive and its status turn ``delivered``,
and keeps the space running with ready-to-paste ``curl`` commands until
Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from relay.pki import authority

HUB_NAME = "hub.eimis.test"
READY_TIMEOUT = 20.0


@dataclass(frozen=True)
class Hospital:
    domain: str
    config: str
    org_id: str
    users: tuple[str, ...]


HOSPITALS = (
    Hospital("chu-nord.test", "relay-a.toml", "1750000001", ("alice", "carol")),
    Hospital("clinique-sud.test", "relay-b.toml", "1130000002", ("bob", "dan")),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run a hub and two hospital relays on this machine")
    parser.add_argument("--dir", type=Path, default=Path("eimis-demo"), metavar="DIR",
                        help="where to write the demo's files (default: ./eimis-demo)")
    parser.add_argument("--init-only", action="store_true", help="write the files and stop")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    directory = args.dir.resolve()
    manifest = init(directory)
    print(f"demo files written to {directory}")
    if args.init_only:
        for path in ("hub.toml", "relay-a.toml", "relay-b.toml", "demo.json"):
            print(f"  {directory / path}")
        return 0
    return run(directory, manifest)


def init(directory: Path, *, port: int | None = None) -> dict:
    """Write the PKI, the three config files and demo.json; return the manifest.

    Every listener gets a port free right now, for a person to paste into
    curl, or ``port`` when given: 0 for tests, whose daemons then each bind
    a port of the kernel's choosing and log it (no race for a port)."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("state-*"):
        shutil.rmtree(stale)
    pki_dir = directory / "pki"
    ca_cert, ca_key = authority.create_ca(pki_dir)
    authority.issue_certificate(ca_cert, ca_key, pki_dir, dns_names=[HUB_NAME, "localhost"],
                          ip_addresses=["127.0.0.1"], role="hub")
    hub_port = _free_port() if port is None else port
    hub_url = f"https://127.0.0.1:{hub_port}"
    (directory / "hub.toml").write_text(
        f"""# The reference national hub of the demo space.
[hub]
name = "{HUB_NAME}"
listen = "127.0.0.1:{hub_port}"
state_dir = "state-hub"
ca_file = "pki/ca.pem"
cert_file = "pki/{HUB_NAME}.pem"
key_file = "pki/{HUB_NAME}.key"
domains = [{", ".join(f'"{h.domain}"' for h in HOSPITALS)}]
"""
    )
    relays = []
    for hospital in HOSPITALS:
        authority.issue_certificate(ca_cert, ca_key, pki_dir, dns_names=[hospital.domain], role="relay",
                              org_id=hospital.org_id)
        token = secrets.token_urlsafe(32)
        api_port = _free_port() if port is None else port
        users = [f"{user}@{hospital.domain}" for user in hospital.users]
        state = "state-" + hospital.config.removesuffix(".toml")
        (directory / hospital.config).write_text(
            f"""# The relay of {hospital.domain} in the demo space.
[relay]
domain = "{hospital.domain}"
state_dir = "{state}"

[uplink]
hub_url = "{hub_url}"
server_name = "{HUB_NAME}"
ca_file = "pki/ca.pem"
cert_file = "pki/{hospital.domain}.pem"
key_file = "pki/{hospital.domain}.key"

[local_api]
listen = "127.0.0.1:{api_port}"

[[local_system]]
name = "demo-messenger"
# sha256 of the token given in demo.json
token_sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"
users = [{", ".join(f'"{u}"' for u in users)}]
"""
        )
        relays.append({
            "domain": hospital.domain,
            "config": str(directory / hospital.config),
            "local_api": f"http://127.0.0.1:{api_port}",
            "token": token,
            "users": users,
        })
    manifest = {"hub": {"config": str(directory / "hub.toml"), "url": hub_url}, "relays": relays}
    demo_json = directory / "demo.json"
    demo_json.touch(mode=0o600)
    demo_json.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def run(directory: Path, manifest: dict) -> int:
    commands = [["hub", manifest["hub"]["config"]]] + [["run", r["config"]] for r in manifest["relays"]]
    processes = [
        subprocess.Popen([sys.executable, "-m", "relay", verb, "--config", config], cwd=directory)
        for verb, config in commands
    ]
    try:
        a, b = manifest["relays"]
        for relay in (a, b):
            _wait_connected(relay)
        print("\nhub and both relays are up; sending a message from chu-nord.test to clinique-sud.test\n")
        _walkthrough(a, b)
        _print_curls(a, b)
        print("\nPress Ctrl-C to stop the demo space.")
        stop = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        signal.sigwait(stop)
    except KeyboardInterrupt:
        pass
    except DemoFailed as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
    return 0


class DemoFailed(Exception):
    pass


def _walkthrough(a: dict, b: dict) -> None:
    sender, recipient = a["users"][0], b["users"][0]
    sent = _call(a, "POST", "/v1/messages", {"from": sender, "to": [recipient],
                                             "body": "Bonjour, pouvez-vous rappeler le patient de la chambre 12 ?"})
    print(f"  POST {a['local_api']}/v1/messages -> 202 {json.dumps(sent)}")
    events = _call(b, "GET", "/v1/events?after=0&wait=10")
    print(f"  GET  {b['local_api']}/v1/events  -> {json.dumps(events, ensure_ascii=False)}")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = _call(a, "GET", f"/v1/messages/{sent['id']}")
        if status["status"] in ("delivered", "failed"):
            break
        time.sleep(0.1)
    print(f"  GET  {a['local_api']}/v1/messages/{sent['id']} -> {json.dumps(status)}")
    if status["status"] != "delivered":
        raise DemoFailed(f"message {sent['id']} is {status['status']}, not delivered")


def _print_curls(a: dict, b: dict) -> None:
    body = json.dumps({"from": a["users"][0], "to": [b["users"][0]], "body": "Hello from chu-nord"})
    send = ["curl", "-sS", f"{a['local_api']}/v1/messages", "-H", f"Authorization: Bearer {a['token']}",
            "-H", "Content-Type: application/json", "-d", body]
    read = ["curl", "-sS", f"{b['local_api']}/v1/events?after=0&wait=30",
            "-H", f"Authorization: Bearer {b['token']}"]
    print("\nTry it yourself. Send a message from chu-nord.test:\n")
    print("  " + shlex.join(send))
    print("\nRead it at clinique-sud.test:\n")
    print("  " + shlex.join(read))
    print("\nThen ask chu-nord.test for its status: GET /v1/messages/<id> with the first token.")


def _call(relay: dict, method: str, path: str, document: dict | None = None) -> dict:
    data = json.dumps(document).encode() if document is not None else None
    request = urllib.request.Request(relay["local_api"] + path, data=data, method=method)  # noqa: S310 -- manifest's URL
    request.add_header("Authorization", f"Bearer {relay['token']}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 -- the demo's own http:// URL
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise DemoFailed(f"{method} {path} answered {exc.code}: {exc.read().decode(errors='replace')}") from None


def _wait_connected(relay: dict) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(relay["local_api"] + "/healthz", timeout=2) as response:  # noqa: S310
                if json.loads(response.read()).get("uplink") == "connected":
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise DemoFailed(f"relay {relay['domain']} did not connect to the hub within {READY_TIMEOUT:g} s")


def _free_port() -> int:
    """A port free right now; the demo's processes bind it a moment later."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

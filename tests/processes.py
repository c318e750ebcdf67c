"""Real processes of a demo space, for the end-to-end and fault suites:
`eimis-relay demo --init-only` files, a hub and two relays started from
them as an admin would, each with its log in the test's directory."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import trio

STEP = 20.0


class Process:
    """One daemon of the space, its output kept in a log file for the test."""

    def __init__(self, directory: Path, name: str, argv: list[str]) -> None:
        self.name, self.argv = name, argv
        self.log = directory / f"{name}.log"
        self.popen: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.popen = subprocess.Popen([sys.executable, "-m", "relay", *self.argv], stdout=log, stderr=log)

    def kill(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=STEP)

    def terminate(self) -> int:
        self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout=STEP)


class Site:
    """A relay as its hospital's messaging system sees it."""

    def __init__(self, manifest: dict, process: Process) -> None:
        self.domain = manifest["domain"]
        self.url = manifest["local_api"]
        self.token = manifest["token"]
        self.users = manifest["users"]
        self.process = process

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=STEP)

    async def uplink(self, state: str) -> None:
        """Wait until /healthz reports ``state`` (readiness, never a guessed sleep)."""
        async with httpx.AsyncClient(base_url=self.url, timeout=2) as client:
            with trio.fail_after(STEP):
                while True:
                    try:
                        if (await client.get("/healthz")).json()["uplink"] == state:
                            return
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.05)

    async def send(self, to: str, body: str) -> str:
        async with self.client() as client:
            response = await client.post("/v1/messages", json={"from": self.users[0], "to": [to], "body": body})
        assert response.status_code == 202, response.text
        return response.json()["id"]

    async def status(self, ident: str) -> str:
        async with self.client() as client:
            return (await client.get(f"/v1/messages/{ident}")).json()["status"]

    async def wait_delivered(self, idents: list[str]) -> None:
        with trio.fail_after(STEP * 2):
            for ident in idents:
                while (status := await self.status(ident)) != "delivered":
                    assert status in ("queued", "sent"), status
                    await trio.sleep(0.05)

    async def events(self, count: int, *, settle: float = 0.5) -> list[dict]:
        """Every event, once ``count`` are there and nothing more came for ``settle`` s."""
        found: list[dict] = []
        cursor = 0
        async with self.client() as client:
            with trio.fail_after(STEP * 2):
                while True:
                    wait = 5 if len(found) < count else settle
                    page = (await client.get("/v1/events", params={"after": cursor, "wait": wait})).json()
                    if not page["events"] and len(found) >= count:
                        return found
                    found += page["events"]
                    cursor = page["next"]


class DemoSpace:
    """The hub and both relays of a demo directory, as processes."""

    def __init__(self, directory: Path) -> None:
        subprocess.run([sys.executable, "-m", "relay", "demo", "--dir", str(directory), "--init-only"],
                       check=True, capture_output=True)
        self.directory = directory
        self.manifest = json.loads((directory / "demo.json").read_text())
        self.hub = Process(directory, "hub", ["hub", "--config", self.manifest["hub"]["config"]])
        a, b = self.manifest["relays"]
        self.a = Site(a, Process(directory, "relay-a", ["run", "--config", a["config"]]))
        self.b = Site(b, Process(directory, "relay-b", ["run", "--config", b["config"]]))
        self.processes = [self.hub, self.a.process, self.b.process]

    def edit(self, name: str, old: str, new: str) -> None:
        """Change a config file of the space before its process starts."""
        path = self.directory / name
        text = path.read_text()
        assert old in text, f"{old!r} not in {name}"
        path.write_text(text.replace(old, new, 1))

    async def start(self) -> None:
        for process in self.processes:
            process.start()
        await self.a.uplink("connected")
        await self.b.uplink("connected")

    def close(self) -> None:
        for process in self.processes:
            if process.popen is not None and process.popen.poll() is None:
                process.popen.kill()
                process.popen.wait(timeout=STEP)

    def logs(self) -> str:
        return "".join(p.log.read_text() for p in self.processes if p.log.exists())

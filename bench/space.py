"""The space under test: a hub and relays as real processes on loopback.

The files come from ``python -m relay demo --init-only`` (the shipped
durable settings: WAL, ``synchronous=FULL``, TLS 1.3 with client
certificates); the benchmark only adds what the demo cannot give:

* extra destination domains for the scaling figure: a certificate from the
  demo CA, a relay config derived from ``relay-b.toml`` (same token, its own
  port and state) and the domain listed in ``hub.toml``;
* a thousand users for the users-scaling figure (`Space.set_users`).

Readiness is always asked of the daemon (``GET /healthz``, its ``uplink``
field), never guessed with a sleep.  Every process is started with
``PR_SET_PDEATHSIG`` so that it dies with the benchmark even if the
benchmark itself is killed, and `Space.aclose` stops whatever is left.
"""

from __future__ import annotations

import ctypes
import json
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .loadgen import H1Client, RequestFailed, Target

STOP_TIMEOUT = 15.0  # SIGTERM, then this long before SIGKILL
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Daemon:
    """One subprocess: its command line, its log file and, while it runs, its Popen."""

    def __init__(self, name: str, argv: list[str], cwd: Path, log_dir: Path | None = None) -> None:
        self.name, self.argv, self.cwd = name, argv, cwd
        self.log = (log_dir or cwd) / f"{name}.log"
        self.popen: subprocess.Popen | None = None
        self.exec_at = 0.0

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.exec_at = time.perf_counter()
            self.popen = subprocess.Popen(self.argv, cwd=self.cwd, stdout=log, stderr=log,
                                          stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)  # noqa: PLW1509 -- prctl only

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the process and wait for it (bounded); SIGKILL if it lingers."""
        if not self.running:
            return
        self.popen.send_signal(sig)
        with trio.move_on_after(STOP_TIMEOUT):
            while self.popen.poll() is None:
                await trio.sleep(0.02)
        if self.popen.poll() is None:
            self.popen.kill()
            await trio.to_thread.run_sync(self.popen.wait)

    def rss_kib(self) -> int:
        """Resident memory now (VmRSS of /proc/PID/status), in KiB."""
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"{self.name}: no VmRSS in /proc/{self.popen.pid}/status")

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far (/proc/PID/stat)."""
        fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


_CLOCK_TICKS = 100  # sysconf(_SC_CLK_TCK) on Linux


@dataclass
class Relay:
    """A relay as its hospital's messaging tool sees it, and its process."""

    domain: str
    url: str
    token: str
    users: list[str]
    config: Path
    daemon: Daemon
    state_dir: Path = field(default_factory=Path)

    async def health(self) -> dict | None:
        """The /healthz document, or None if the relay does not answer."""
        try:
            with trio.fail_after(2):
                client = await H1Client.connect(Target.from_url(self.url))
                try:
                    status, body = await client.request(b"GET", b"/healthz", [])
                finally:
                    await client.aclose()
        except (OSError, RequestFailed, trio.TooSlowError):
            return None
        return json.loads(body) if status == 200 else None

    async def wait_health(self, uplink: str | tuple[str, ...] | None, timeout: float, poll: float = 0.01) -> float:
        """Poll /healthz until it answers (with its uplink in state ``uplink``,
        or one of them, if given); return the seconds since the process was started."""
        wanted = (uplink,) if isinstance(uplink, str) else uplink
        with trio.move_on_after(timeout):
            while True:
                document = await self.health()
                if document is not None and (wanted is None or document.get("uplink") in wanted):
                    return time.perf_counter() - self.daemon.exec_at
                if not self.daemon.running:
                    raise SpaceError(f"{self.domain} exited (code {self.daemon.popen.returncode}):\n"
                                     f"{self.daemon.tail()}")
                await trio.sleep(poll)
        raise SpaceError(f"{self.domain}: /healthz did not report uplink={uplink} within {timeout:g} s:\n"
                         f"{self.daemon.tail()}")

    def db_bytes(self) -> int:
        return db_bytes(self.state_dir / "relay.db")


class SpaceError(Exception):
    """A daemon of the space did not start or stopped answering."""


class Space:
    """The hub, relay A (chu-nord), relay B (clinique-sud) and any extra relays."""

    def __init__(self, directory: Path, manifest: dict) -> None:
        self.directory = directory
        python = sys.executable
        self.hub = Daemon("hub", [python, "-m", "relay", "hub", "--config", manifest["hub"]["config"]], directory)
        state = re.search(r'^state_dir\s*=\s*"([^"]+)"', Path(manifest["hub"]["config"]).read_text(), re.MULTILINE)
        self.hub_db = directory / (state.group(1) if state else ".") / "hub.db"
        self.relays = [self._relay(entry) for entry in manifest["relays"]]
        self.extra: list[Relay] = []

    @property
    def a(self) -> Relay:
        return self.relays[0]

    @property
    def b(self) -> Relay:
        return self.relays[1]

    @property
    def daemons(self) -> list[Daemon]:
        return [self.hub, *(r.daemon for r in self.relays), *(r.daemon for r in self.extra)]

    def _relay(self, entry: dict) -> Relay:
        config = Path(entry["config"])
        name = config.stem
        state = re.search(r'^state_dir\s*=\s*"([^"]+)"', config.read_text(), re.MULTILINE)
        daemon = Daemon(name, [sys.executable, "-m", "relay", "run", "--config", str(config)], self.directory)
        return Relay(entry["domain"], entry["local_api"], entry["token"], list(entry["users"]), config, daemon,
                     self.directory / (state.group(1) if state else "."))

    @classmethod
    def create(cls, directory: Path, extra_domains: int) -> Space:
        """Write the demo files with the relay's own command, then the extra domains."""
        directory.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "relay", "demo", "--dir", str(directory), "--init-only"],
                       check=True, capture_output=True, timeout=120)
        manifest = json.loads((directory / "demo.json").read_text())
        space = cls(directory, manifest)
        if extra_domains:
            space._add_domains(extra_domains)
        return space

    def _add_domains(self, count: int) -> None:
        """Extra destination relays, cloned from relay B's config (see the module docstring)."""
        from relay.pki import authority  # noqa: PLC0415 -- the demo CA's own issuer: certificates of the shipped shape

        pki_dir = self.directory / "pki"
        template = self.b.config.read_text()
        domains = [f"d{n:02d}.bench.test" for n in range(count)]
        for n, domain in enumerate(domains):
            authority.issue_certificate(pki_dir / "ca.pem", pki_dir / "ca.key", pki_dir, dns_names=[domain],
                                  role="relay", org_id=f"1{990000000 + n}")
            port = free_port()
            text = template.replace(self.b.domain, domain).replace(self.b.daemon.name, f"relay-{domain}")
            text, replaced = re.subn(r'^listen\s*=\s*"127\.0\.0\.1:\d+"', f'listen = "127.0.0.1:{port}"', text,
                                     flags=re.MULTILINE)
            if replaced != 1:
                raise SpaceError(f"cannot find [local_api].listen in {self.b.config}")
            config = self.directory / f"relay-{domain}.toml"
            config.write_text(text)
            self.extra.append(self._relay({
                "domain": domain, "local_api": f"http://127.0.0.1:{port}", "token": self.b.token,
                "users": [u.replace(self.b.domain, domain) for u in self.b.users], "config": str(config)}))
        hub_toml = Path(self.hub.argv[-1])
        text, replaced = re.subn(r"^domains\s*=\s*\[(.*)\]$",
                                 lambda m: "domains = [" + ", ".join([m.group(1), *(f'"{d}"' for d in domains)]) + "]",
                                 hub_toml.read_text(), flags=re.MULTILINE)
        if replaced != 1:
            raise SpaceError(f"cannot find [hub].domains in {hub_toml}")
        hub_toml.write_text(text)

    def set_users(self, relay: Relay, count: int) -> list[str]:
        """List ``count`` users ``u0000@domain``... in the relay's config
        (restart it to apply); return their addresses."""
        users = [f"u{n:04d}@{relay.domain}" for n in range(count)]
        listed = ", ".join(f'"{u}"' for u in [*relay.users, *users])
        text, replaced = re.subn(r"^users\s*=\s*\[.*\]$", f"users = [{listed}]", relay.config.read_text(),
                                 flags=re.MULTILINE)
        if replaced != 1:
            raise SpaceError(f"cannot find [[local_system]].users in {relay.config}")
        relay.config.write_text(text)
        return users

    async def start(self, relays: list[Relay] | None = None, *, timeout: float = 60.0) -> None:
        """Start the hub (if stopped) and the relays; wait until each reports uplink=connected."""
        relays = self.relays if relays is None else relays
        if not self.hub.running:
            self.hub.start()
        for relay in relays:
            if not relay.daemon.running:
                relay.daemon.start()
        for relay in relays:
            await relay.wait_health("connected", timeout)

    async def aclose(self) -> None:
        """Stop every daemon still running (SIGTERM, then SIGKILL), relays first."""
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for daemon in reversed(self.daemons):
                    nursery.start_soon(daemon.stop)


def db_bytes(path: Path) -> int:
    """Bytes the database holds (pages in use, WAL included), read through a
    read-only connection: the WAL file's own size only tracks checkpoints.
    A reader never makes the daemon's writer wait (WAL mode)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        pages, free, size = (conn.execute(f"PRAGMA {p}").fetchone()[0]
                             for p in ("page_count", "freelist_count", "page_size"))
    finally:
        conn.close()
    return (pages - free) * size


def free_port() -> int:
    """A loopback port free right now (as the demo picks its own)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

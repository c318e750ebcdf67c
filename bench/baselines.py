"""Baselines measured in the same run as the relay, on the same machine.

These machines drift by up to ±35% from one run to the next (see the
performance notes), so a figure is only ever compared with a baseline
measured minutes earlier on the same cores and the same disk:

* `BareServer`: the Python ceiling (``bare_server.py``) as a subprocess;
* `sqlite_commits`: SQLite WAL + ``synchronous=FULL`` commits per second,
  1 and 100 rows of 1 KiB per commit, in the space's own directory;
* `Postfix`: a throwaway Postfix instance relaying ``smtp-source`` →
  queue (fsync) → ``smtp-sink`` on high loopback ports, with its own
  config directory, queue and log, stopped afterwards;
* `h2load`: nghttp2's generator, a second opinion on the ingress figure.

A baseline that cannot run says why (`Unavailable`); it is never dropped
silently.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from .space import Daemon, free_port

# Everything below may be installed from Debian's archive when missing.
APT_PACKAGES = {"postfix": "postfix", "smtp-source": "postfix", "smtp-sink": "postfix", "h2load": "nghttp2-client"}
SBIN = ("/usr/sbin", "/usr/bin", "/sbin")


class Unavailable(Exception):
    """A baseline cannot run on this machine; the message says why."""


def which(program: str) -> str | None:
    found = shutil.which(program)
    if found:
        return found
    for directory in SBIN:  # /usr/sbin is not on every PATH
        if os.access(f"{directory}/{program}", os.X_OK):
            return f"{directory}/{program}"
    return None


def ensure_installed(programs: list[str], *, allow_install: bool) -> dict[str, str]:
    """Install the Debian packages of missing ``programs`` with apt-get when
    allowed (root, apt-get present); return ``{program: why missing}`` for
    what is still missing."""
    missing = [p for p in programs if which(p) is None]
    packages = sorted({APT_PACKAGES[p] for p in missing})
    if packages and allow_install and os.geteuid() == 0 and which("apt-get"):
        print(f"installing {' '.join(packages)} with apt-get (use --no-install to skip)", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            subprocess.run(["apt-get", "install", "-y", "-q", *packages], env=env, check=False, timeout=600,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            pass
    reasons = {}
    for program in programs:
        if which(program) is None:
            package = APT_PACKAGES[program]
            how = "not root or no apt-get" if not allow_install else "apt-get install failed"
            reasons[program] = (f"{program} not found ({how}); install it with: "
                                f"DEBIAN_FRONTEND=noninteractive apt-get install -y {package}")
    return reasons


# -- the Python ceiling ---------------------------------------------------------------


class BareServer:
    """``bench/bare_server.py`` as a subprocess; `port` once `start` returned."""

    def __init__(self, directory: Path, *, cert: Path, key: Path, ca: Path, plain: bool = False) -> None:
        argv = [sys.executable, "-m", "bench.bare_server", "--port", "0"]
        argv += ["--plain"] if plain else ["--cert", str(cert), "--key", str(key), "--ca", str(ca)]
        # Run from the repository root so that ``-m bench.bare_server`` resolves.
        root = Path(__file__).resolve().parent.parent
        self.daemon = Daemon("bare-server-plain" if plain else "bare-server", argv, root, log_dir=directory)
        self.port = 0

    async def start(self, timeout: float = 20.0) -> None:
        """Start it and wait for its ``READY <port>`` line in the log."""
        self.daemon.start()
        with trio.move_on_after(timeout):
            while self.daemon.running:
                if match := re.search(r"^READY (\d+)$", self.daemon.log.read_text(), re.MULTILINE):
                    self.port = int(match.group(1))
                    return
                await trio.sleep(0.01)
        raise Unavailable(f"bare server did not start:\n{self.daemon.tail()}")

    async def stop(self) -> None:
        await self.daemon.stop()


# -- the disk ceiling -----------------------------------------------------------------


def sqlite_commits(path: Path, rows_per_commit: int, duration: float) -> dict:
    """Commit ``rows_per_commit`` rows of 1 KiB per transaction for
    ``duration`` s with the relay's settings; return commits/s and rows/s.

    Blocking: call it from a worker thread."""
    for stale in path.parent.glob(path.name + "*"):
        stale.unlink()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE message (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
        rows = [(os.urandom(1024),) for _ in range(rows_per_commit)]
        commits = 0
        start = time.perf_counter()
        deadline = start + duration
        while time.perf_counter() < deadline:
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO message (body) VALUES (?)", rows)
            conn.execute("COMMIT")
            commits += 1
        elapsed = time.perf_counter() - start
    finally:
        conn.close()
        for leftover in path.parent.glob(path.name + "*"):
            leftover.unlink()
    return {"commits_per_s": commits / elapsed, "rows_per_s": commits * rows_per_commit / elapsed}


# -- a classic durable relay: Postfix -------------------------------------------------

_MAIN_CF = """\
# A throwaway Postfix for the benchmark: loopback only, relays everything
# from smtp-source to smtp-sink; queue and logs stay in this directory.
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
mail_owner = postfix
setgid_group = postdrop
multi_instance_directories =
myhostname = bench.localdomain
mydomain = localdomain
myorigin = $myhostname
mydestination =
relay_domains =
relayhost = [127.0.0.1]:{sink_port}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
alias_maps =
alias_database =
local_recipient_maps =
biff = no
"""

# Debian's master.cf without chroot (a chroot needs copies of /etc files)
# and without the services a relay-only instance never uses.
_MASTER_CF = """\
127.0.0.1:{smtpd_port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class Postfix:
    """A throwaway Postfix instance and an ``smtp-sink`` behind it.

    Resource handling: `start` launches ``postfix start-fg`` (the master
    in the foreground, so it is our child) and the sink; `stop` runs
    ``postfix stop`` and ends both, whatever happened."""

    def __init__(self) -> None:
        # Its own directory, outside the space's (which is private, 0700,
        # where the postfix user could not reach its queue); same disk.
        self.dir = Path(tempfile.mkdtemp(prefix="eimis-bench-postfix-"))
        self.smtpd_port = free_port()
        self.sink_port = free_port()
        self.master: Daemon | None = None
        self.sink: trio.Process | None = None
        self.delivered = 0
        self._counted = trio.Event()

    async def start(self, timeout: float = 30.0) -> None:
        if os.geteuid() != 0:
            raise Unavailable("Postfix needs root to start its master daemon (run the benchmark as root)")
        missing = [p for p in ("postfix", "smtp-source", "smtp-sink") if which(p) is None]
        if missing:
            raise Unavailable(f"{', '.join(missing)} not installed")
        etc = self.dir / "etc"
        for sub in ("etc", "queue", "data"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)  # the postfix user must reach its queue
        shutil.chown(self.dir / "data", "postfix")
        (etc / "main.cf").write_text(_MAIN_CF.format(dir=self.dir, sink_port=self.sink_port))
        (etc / "master.cf").write_text(_MASTER_CF.format(smtpd_port=self.smtpd_port))
        postfix = which("postfix")
        setup = subprocess.run([postfix, "-c", str(etc), "post-install", "create-missing"],
                               capture_output=True, check=False, text=True, timeout=60)
        if setup.returncode != 0:
            raise Unavailable(f"postfix post-install failed: {setup.stderr.strip()[-500:]}")
        self.sink = await trio.lowlevel.open_process(
            [which("smtp-sink"), "-u", "nobody", "-c", f"127.0.0.1:{self.sink_port}", "256"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.master = Daemon("postfix", [postfix, "-c", str(etc), "start-fg"], self.dir)
        self.master.start()
        with trio.move_on_after(timeout):
            while self.master.running:
                if await _smtp_banner(self.smtpd_port):
                    return
                await trio.sleep(0.05)
        log = (self.dir / "maillog").read_text(errors="replace")[-800:] if (self.dir / "maillog").exists() else ""
        raise Unavailable(f"Postfix did not start listening on 127.0.0.1:{self.smtpd_port}:\n"
                          f"{self.master.tail()}\n{log}")

    async def count_deliveries(self) -> None:
        """Follow smtp-sink's running counter (``mesg=N``) until cancelled."""
        pattern = re.compile(rb"mesg=(\d+)")
        tail = b""
        while chunk := await self.sink.stdout.receive_some(65536):
            tail = (tail + chunk)[-256:]
            if counts := pattern.findall(tail):
                self.delivered = int(counts[-1])
                self._counted.set()
                self._counted = trio.Event()

    async def relay(self, messages: int, sessions: int, timeout: float) -> float:
        """Send ``messages`` of 1 KiB with ``smtp-source`` over ``sessions``
        parallel SMTP sessions; return messages/s from its start until the
        sink received the last one."""
        target = self.delivered + messages
        start = time.perf_counter()
        source = await trio.lowlevel.open_process(
            [which("smtp-source"), "-s", str(sessions), "-m", str(messages), "-l", "1024",
             "-f", "alice@bench.localdomain", "-t", "bob@sink.test", f"127.0.0.1:{self.smtpd_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with trio.fail_after(timeout):
                while self.delivered < target:
                    await self._counted.wait()
            elapsed = time.perf_counter() - start
            with trio.fail_after(timeout):
                await source.wait()
        finally:
            if source.returncode is None:
                source.kill()
                await source.wait()
        return messages / elapsed

    async def stop(self) -> None:
        with trio.CancelScope(shield=True):
            if self.master is not None and self.master.running:
                with trio.move_on_after(20):
                    await trio.run_process([which("postfix"), "-c", str(self.dir / "etc"), "stop"],
                                           check=False, capture_stdout=True, capture_stderr=True)
                await self.master.stop()
            if self.sink is not None and self.sink.returncode is None:
                self.sink.kill()
                with trio.move_on_after(5):
                    await self.sink.wait()
            shutil.rmtree(self.dir, ignore_errors=True)

    def pss_kib(self) -> tuple[int, int]:
        """(proportional set size in KiB, process count) of the master and all
        its children: PSS, since a plain sum of RSS would count the pages
        that dozens of smtpd processes share once per process."""
        if self.master is None or not self.master.running:
            return 0, 0
        pids = _descendants(self.master.popen.pid)
        total = 0
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total, len(pids)


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


async def _smtp_banner(port: int) -> bool:
    """Whether an SMTP server on 127.0.0.1:``port`` greets with 220."""
    try:
        with trio.fail_after(2):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            try:
                greeting = await stream.receive_some(512)
                await stream.send_all(b"QUIT\r\n")
            finally:
                await trio.aclose_forcefully(stream)
    except (OSError, trio.TooSlowError, trio.BrokenResourceError):
        return False
    return greeting.startswith(b"220")


# -- h2load -----------------------------------------------------------------------------


async def h2load(url: str, token: str, body: bytes, *, connections: int, streams: int, duration: float,
                 warmup: float, directory: Path) -> dict:
    """POST ``body`` to ``url`` with h2load (cleartext, prior knowledge); return its rate and statuses."""
    program = which("h2load")
    if program is None:
        raise Unavailable("h2load not installed (Debian package nghttp2-client)")
    data = directory / "h2load-body.json"
    data.write_bytes(body)
    # h2load takes whole seconds.
    argv = [program, "-c", str(connections), "-m", str(max(1, streams // connections)),
            "-D", str(max(1, round(duration))), "--warm-up-time", str(max(1, round(warmup))), "-d", str(data),
            "-H", "content-type: application/json", "-H", f"authorization: Bearer {token}", url]
    with trio.fail_after(duration + warmup + 60):
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    out = done.stdout.decode(errors="replace")
    rate = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if rate is None or codes is None:
        raise Unavailable(f"h2load output not understood:\n{out[-600:]}{done.stderr.decode(errors='replace')[-300:]}")
    ok, *others = (int(c) for c in codes.groups())
    return {"rate": float(rate.group(1)) * ok / max(1, ok + sum(others)), "2xx": ok, "other": sum(others)}

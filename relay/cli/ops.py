"""The day-to-day commands: ``status``, ``queue``, ``enroll``, ``backup``, ``restore``.

Each finds its relay from ``--config`` (default as for ``run``), so that
several relays can live on one host; ``status`` given a hub's
configuration shows the hub (`relay.cli.hub_status`).  ``status`` and ``queue`` ask the
running daemon over its admin channel (`relay.net.admin_socket`); with no daemon
running, ``queue`` works on the store directly, holding the state
directory's lock so that a daemon cannot start meanwhile, and refuses when
some other process holds it.  ``backup`` reads the store (consistently,
even while the daemon writes: `relay.store.backup`); ``restore`` needs the
daemon stopped and keeps the store it replaces.

Exit codes: 0 done (``status``: healthy), 1 failed (``status``: running
but unhealthy), 3 (``status``) nothing answers: not running, or unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import trio

from relay.appliance.operations import QueueTools
from relay.cli import hub_status
from relay.cli.arguments import add_config_option, config_path, names_a_hub
from relay.config.model import RelayConfig, load_relay_config
from relay.config.reader import ConfigError
from relay.core import timeformat
from relay.core.errors import describe_error
from relay.core.timeformat import span
from relay.net import admin_socket
from relay.pki import authority
from relay.runtime.paths import state_dir
from relay.store import audit, relay_admin, relay_queue
from relay.store.engine import Store, backup
from relay.store.sealing import KEY_FILE, KeyRing, KeyRingError, SealedConnection, Unreadable, install, unseal

DB_NAME = "relay.db"
EXIT_UNKNOWN = 3
# Where the packaged service keeps its store (StateDirectory=eimis-relay):
# a command run from a shell has no $STATE_DIRECTORY to tell it.
SERVICE_STATE = Path("/var/lib/eimis-relay")


class CommandFailed(Exception):
    """The command cannot do what was asked; the message says why and what to do."""


def register(commands: argparse._SubParsersAction) -> None:
    status = _command(commands, "status", "show what the running relay (or hub, given its config) is doing;"
                                          " exit 0 when healthy")
    status.add_argument("--json", action="store_true", help="print the whole status as JSON")
    status.set_defaults(func=_status)

    queue = commands.add_parser("queue", help="look at and act on the messages sent from this relay")
    actions = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = _command(actions, "list", "messages not yet delivered to everyone, oldest first")
    listing.add_argument("--state", choices=relay_admin.QUEUE_STATES, help="only those with a recipient in STATE")
    listing.add_argument("--to", metavar="DOMAIN", help="only those with a recipient at DOMAIN")
    listing.add_argument("--limit", type=int, default=100, metavar="N", help="at most N (default 100)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_queue_list)
    show = _command(actions, "show", "one message's details and per-recipient status")
    show.add_argument("id", metavar="ID")
    show.add_argument("--body", action="store_true", help="also print the body (it is patient data: take care)")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_queue_show)
    retry = _command(actions, "retry", "queue failed recipients again; for a queued message, dial the hub now")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", metavar="ID")
    which.add_argument("--all-failed", action="store_true", help="every message with a failed recipient")
    retry.set_defaults(func=_queue_retry)
    purge = _command(actions, "purge", "take a message out of the queue (its sender gets a 'failed' notice)")
    purge.add_argument("id", metavar="ID")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    purge.set_defaults(func=_queue_purge)

    enroll = _command(commands, "enroll", "make this relay's private key and a CSR for the national PKI")
    enroll.add_argument("--domain", help="the relay's domain (default: [relay].domain of the config)")
    enroll.add_argument("--org-id", help="1 + FINESS or 3 + SIRET of the organisation")
    enroll.add_argument("--out", type=Path, required=True, metavar="DIR")
    enroll.set_defaults(func=_enroll)

    save = _command(commands, "backup", "write a consistent copy of the store, even while the relay runs")
    save.add_argument("dest", type=Path, metavar="DEST", help="a new file, or a directory to put it in")
    save.set_defaults(func=_backup)
    restore = _command(commands, "restore", "replace the store with a backup (the relay must be stopped)")
    restore.add_argument("source", type=Path, metavar="BACKUP")
    restore.set_defaults(func=_restore)


def _command(parent: argparse._SubParsersAction, name: str, summary: str) -> argparse.ArgumentParser:
    parser = parent.add_parser(name, help=summary, description=summary)
    add_config_option(parser)
    return parser


def _guarded(run):
    """Run a command body; print a `CommandFailed` (or the daemon's refusal) as one line."""
    def main(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (CommandFailed, admin_socket.AdminError, admin_socket.StoreBusy) as exc:
            print(f"eimis-relay {args.command}: {exc}", file=sys.stderr)
            return 1
        except admin_socket.DaemonUnreachable as exc:
            print(f"eimis-relay {args.command}: {exc}", file=sys.stderr)
            return EXIT_UNKNOWN
    return main


def load(args: argparse.Namespace) -> RelayConfig:
    path = config_path(args)
    try:
        return load_relay_config(path)
    except ConfigError as exc:
        raise CommandFailed(f"the configuration {path} is not valid:\n  " + "\n  ".join(exc.problems)) from None


def store_dir(config: RelayConfig) -> Path:
    """The state directory, as the daemon of this configuration sees it."""
    if config.state_dir is None and "STATE_DIRECTORY" not in os.environ and SERVICE_STATE.is_dir():
        return SERVICE_STATE
    return state_dir(config.state_dir)


def ask(args: argparse.Namespace, op: str, request: dict[str, Any] | None = None) -> Any:
    """The answer of the daemon of ``--config``; `DaemonUnreachable` when none runs.

    A configuration file broken since the daemon started (a reload was
    refused, say) still names the state directory, and the daemon running
    with the previous configuration is the one to ask: only that key is
    read from it then."""
    try:
        state = store_dir(load(args))
    except CommandFailed as problem:
        broken = _state_dir_of_broken(config_path(args))
        if broken is None:
            raise
        state = broken
        print(f"warning: {str(problem).splitlines()[0]} (eimis-relay check-config); asking the running daemon"
              " anyway", file=sys.stderr)
    return admin_socket.call(admin_socket.find_daemon(state), op, request)


def _state_dir_of_broken(path: Path) -> Path | None:
    try:
        configured = tomllib.loads(path.read_text())["relay"]["state_dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path.absolute().parent / configured if isinstance(configured, str) and configured else None


def key_ring(state: Path) -> KeyRing | None:
    """The store's key ring (encryption at rest), never created here: a
    command must not seal anything with a key the daemon has not got."""
    path = state / KEY_FILE
    if not path.exists():
        return None
    try:
        return KeyRing.load(path)
    except KeyRingError as exc:
        raise CommandFailed(str(exc)) from None


def queue_op(config: RelayConfig, op: str, args: dict[str, Any]) -> Any:
    """A queue operation: through the daemon, or on the store when none runs."""
    state = store_dir(config)
    if admin_socket.holder(state) is not None:
        return admin_socket.call(admin_socket.find_daemon(state), f"queue.{op}", args)
    if not (state / DB_NAME).exists():
        raise CommandFailed(f"no store in {state}: has this relay ever run? (set [relay].state_dir)")
    with admin_socket.StateLock(state) as lock:
        lock.acquire(f"eimis-relay queue {op}")

        ring = key_ring(state)

        async def offline() -> Any:
            async with Store.open(state / DB_NAME, relay_queue.MIGRATIONS, ring) as store:
                return await getattr(QueueTools(store, lambda: config.delivery.message_ttl), op)(args)

        return trio.run(offline)


# -- status --------------------------------------------------------------------------


@_guarded
def _status(args: argparse.Namespace) -> int:
    path = config_path(args)
    if names_a_hub(path):  # the hub's own status, over its admin socket
        try:
            snapshot, render = hub_status.ask_hub(path, "status"), hub_status.render_hub_status
        except hub_status.HubCommandFailed as exc:
            raise CommandFailed(str(exc)) from None
    else:
        snapshot, render = ask(args, "status"), render_status
    if args.json:
        print(json.dumps(snapshot, indent=2, ensure_ascii=False))
    else:
        print(render(snapshot, time.time()))
    return 0 if snapshot["healthy"] else 1


def render_status(s: dict[str, Any], now: float) -> str:
    up, queues, store = s["uplink"], s["queues"], s["store"]
    out = queues["outbound"]
    oldest = queues["oldest_queued_at"]
    lines = [
        f"eimis-relay {s['version']}  {s['domain']}  pid {s['pid']}, up {span(now - s['started'])}",
        f"health       {'ok' if s['healthy'] else s.get('health', 'unhealthy').upper()}",
        *(f"  problem    {p}" for p in s["problems"]),
        *(f"  warning    {w}" for w in s["warnings"]),
        f"uplink       {up['state']} since {timeformat.second(up['since'])} ({span(now - up['since'])}),"
        f" hub {up['hub_url']}, {up['reconnects']} reconnect(s)",
        f"last error   {up['last_error'] or '-'}",
        f"outbound     {out['urgent'] + out['normal']} queued ({out['urgent']} urgent, {out['normal']} normal);"
        f" oldest {span(now - oldest) if oldest else '-'}",
        "recipients   " + ", ".join(f"{k} {v}" for k, v in queues["recipients"].items()),
        "inbound      " + (", ".join(f"{k}: {v} unread" for k, v in sorted(queues["unread"].items())) or "none unread"),
    ]
    for cert in s["certificates"]:
        where = f"  {cert['file']}" if cert["file"] else ""
        lines.append(f"certificate  {cert['name']} expires {timeformat.second(cert['expires'])}"
                     f" ({(cert['expires'] - now) / 86400:.0f} days){where}")
    lines.append(f"store        {store['path']},"
                 f" {store['used_bytes'] / 1e6:.1f} MB of {store['max_bytes'] / 1e6:.0f} MB")
    reload = s["reload"]
    last = "never reloaded" if reload["at"] is None else (
        f"last reload {'ok' if reload['ok'] else 'REFUSED'} at {timeformat.second(reload['at'])} ({reload['trigger']})")
    lines.append(f"config       {s['config']}, {last}")
    lines += [f"  reload     {e}" for e in reload["errors"]]
    return "\n".join(lines)


# -- queue ---------------------------------------------------------------------------


@_guarded
def _queue_list(args: argparse.Namespace) -> int:
    found = queue_op(load(args), "list", {"state": args.state, "to": args.to, "limit": args.limit})
    if args.json:
        print(json.dumps(found, indent=2, ensure_ascii=False))
        return 0
    print(f"{'ID':<24} {'ACCEPTED':<24} {'PRIORITY':<8} {'STATUS':<9} {'FROM':<28} RECIPIENTS")
    for m in found:
        to = ", ".join(f"{a} ({st})" for a, st in m["recipients"].items())
        print(f"{m['id']:<24} {m['accepted_at']:<24} {m['priority']:<8} {m['status']:<9} {m['from']:<28} {to}")
    print(f"{len(found)} message(s)" + (f" (the first {args.limit}: use --limit)" if len(found) == args.limit else ""))
    return 0


@_guarded
def _queue_show(args: argparse.Namespace) -> int:
    found = queue_op(load(args), "show", {"id": args.id, "body": args.body})
    if args.json:
        print(json.dumps(found, indent=2, ensure_ascii=False))
        return 0
    for key in ("id", "status", "from", "system", "priority", "thread", "accepted_at", "expires_at"):
        print(f"{key:<16} {found[key] if found[key] is not None else '-'}")
    print(f"{'waiting for hub':<16} {', '.join(found['waiting_for_hub']) or '-'}"
          + ("  (in a transaction on the wire right now)" if found["in_flight"] else ""))
    for address, r in found["recipients"].items():
        reason = f" ({r['reason']})" if r["reason"] else ""
        print(f"{'recipient':<16} {address}: {r['status']}{reason}, since {r['updated_at']}")
    if args.body:
        body = found.get("body")
        print("body:" if body is not None else "body: no longer kept here (dropped once the hub took every envelope)")
        if body is not None:
            print(body)
    else:
        print(f"{'body':<16} {found['body_bytes']} bytes{'' if found['body_kept'] else ' (no longer kept)'}"
              " (--body to print it)")
    return 0


@_guarded
def _queue_retry(args: argparse.Namespace) -> int:
    results = queue_op(load(args), "retry", {"id": args.id, "all_failed": args.all_failed})
    for ident, outcome in results.items():
        print(f"{ident}: {outcome}")
    if not results:
        print("no message has a failed recipient")
    done = [o for o in results.values() if o == relay_admin.RETRIED or o.startswith("queued")]
    return 0 if done or (args.all_failed and not results) else 1


@_guarded
def _queue_purge(args: argparse.Namespace) -> int:
    config = load(args)
    if not args.yes:
        if not sys.stdin.isatty():
            raise CommandFailed("refusing to purge without confirmation: add --yes")
        answer = input(f"Purge message {args.id}? Its queued recipients fail as 'purged'. [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing purged")
            return 1
    result = queue_op(config, "purge", {"id": args.id})
    print(f"{result['id']}: {result['purged']} queued recipient(s) purged")
    if result["in_flight"]:
        print("note: it was in a transaction on its way to the hub, which may still deliver it")
    return 0


# -- enroll, backup, restore ---------------------------------------------------------


@_guarded
def _enroll(args: argparse.Namespace) -> int:
    domain = args.domain or load(args).domain
    try:
        key, csr = authority.make_key_and_csr(args.out, domain=domain, org_id=args.org_id)
    except (OSError, ValueError) as exc:
        raise CommandFailed(describe_error(exc)) from None
    print(f"wrote {key} (private key, mode 0600: never send it anywhere)")
    print(f"wrote {csr}")
    print(f"Next: send {csr.name} to the national PKI (IGC-Santé); install the certificate it returns as the"
          f" [uplink] cert_file of the relay, with key_file = \"{key}\"; then `eimis-relay check-config`"
          " and `systemctl reload eimis-relay` (docs/operations.md).")
    return 0


@_guarded
def _backup(args: argparse.Namespace) -> int:
    config = load(args)
    source = store_dir(config) / DB_NAME
    if not source.exists():
        raise CommandFailed(f"no store at {source}")
    dest = args.dest
    if dest.is_dir():
        dest = dest / f"relay-{config.domain}-{timeformat.compact(time.time())}.db"
    try:
        size = backup(source, dest)
    except (OSError, sqlite3.Error) as exc:
        raise CommandFailed(f"backup failed: {exc}") from None
    print(f"backup of {source} written to {dest} ({size} bytes, integrity ok)")
    print(f"The bodies in it are sealed with the key ring {source.parent / KEY_FILE}, which is not in the"
          " backup: keep a copy of that file, apart from the backups.")
    return 0


@_guarded
def _restore(args: argparse.Namespace) -> int:
    config = load(args)
    state = store_dir(config)
    problem = check_backup(args.source, key_ring(state))
    if problem:
        raise CommandFailed(f"{args.source}: {problem}; nothing changed")
    with admin_socket.StateLock(state) as lock:
        try:
            lock.acquire("eimis-relay restore")
        except admin_socket.StoreBusy as exc:
            raise CommandFailed(f"{exc}: stop the relay first (systemctl stop eimis-relay)") from None
        target = state / DB_NAME
        partial = target.with_name(DB_NAME + ".partial")  # the whole copy first: never a store half there
        shutil.copyfile(args.source, partial)
        os.chmod(partial, 0o600)
        with open(partial, "rb") as copy:
            os.fsync(copy.fileno())
        kept = None
        if target.exists():
            kept = target.with_name(f"{DB_NAME}.replaced-{timeformat.compact(time.time())}")
            for suffix in ("", "-wal", "-shm"):  # the WAL may hold committed data: keep it with its file
                if Path(f"{target}{suffix}").exists():
                    os.rename(f"{target}{suffix}", f"{kept}{suffix}")
        os.rename(partial, target)
        audit.record_offline(target, "admin", "restore", f"from {args.source.absolute()}"[:200], now=time.time())
    print(f"restored {target} from {args.source}" + (f"; the previous store is kept as {kept}" if kept else ""))
    print("Start the relay: queued messages go out again (the hub drops duplicates); messages received"
          " after the backup was taken are not in it.")
    return 0


def check_backup(path: Path, ring: KeyRing | None) -> str | None:
    """Why ``path`` is not a relay store this version can run on with the
    key ring ``ring``, or None.  Every body it holds must open: a backup
    restored beside the wrong key ring (or none) would fail its messages."""
    if not path.is_file():
        return "no such file"
    conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, factory=SealedConnection)
    try:
        install(conn, ring)
        verdict = conn.execute("PRAGMA integrity_check").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if verdict != "ok":
            return f"damaged: {verdict}"
        if "outbox" not in tables or not 1 <= version <= len(relay_queue.MIGRATIONS):
            return f"not a relay store this version understands (schema version {version})"
        unreadable, first = 0, None
        for value, context in conn.execute(
                "SELECT body, id FROM message WHERE body != '' UNION ALL SELECT body, id FROM inbound"):
            try:
                unseal(conn, value, context)
            except Unreadable as exc:
                unreadable, first = unreadable + 1, first or exc.why
        if unreadable:
            where = f"the key ring {KEY_FILE} here" if ring is not None else f"no key ring here (no {KEY_FILE})"
            return (f"{unreadable} of its bodies do not open with {where} ({first}): put back the key ring of"
                    " that time")
    except sqlite3.Error as exc:
        return f"not a readable relay store ({exc})"
    finally:
        conn.close()
    return None

"""The ``eimis-relay`` command: one entry point, a sub-command per job."""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import time
from pathlib import Path

import trio

from relay import __version__
from relay.cli import audit_verify, check_config, demo, doctor, ops, pki
from relay.cli.arguments import add_config_option, config_path
from relay.config.model import load_hub_config, load_relay_config
from relay.config.reader import ConfigError, NotConfigured
from relay.net.admin_socket import StateLock, StoreBusy
from relay.runtime import logs
from relay.runtime.daemon import run_hub, run_relay
from relay.runtime.permissions import exposed_secrets
from relay.store import audit, sealing
from relay.store.sealing import KEY_FILE, KeyRingError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eimis-relay", description=__doc__)
    parser.add_argument("--version", action="version", version=f"eimis-relay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the relay daemon")
    add_config_option(run, "relay.toml")
    run.set_defaults(func=_run)

    hub = commands.add_parser("hub", help="run the reference national hub")
    add_config_option(hub, "hub.toml")
    hub.set_defaults(func=_hub)

    check_config.register(commands)
    demo.register(commands)
    pki.register(commands)
    rotate = commands.add_parser("rotate-key", help="add a new key for encryption at rest (old data stays readable)")
    rotate.add_argument("--state-dir", type=Path, required=True, metavar="DIR",
                        help=f"the stopped relay's or hub's state directory, holding {KEY_FILE}")
    rotate.set_defaults(func=_rotate_key)
    audit_verify.register(commands)
    ops.register(commands)
    doctor.register(commands)

    args = parser.parse_args(argv)
    return args.func(args)


def _rotate_key(args: argparse.Namespace) -> int:
    """Append a key to the ring and record it in the audit trail of the
    store(s) there.  The daemon must be stopped (it seals with the new key
    only from its next start anyway): the state directory's lock keeps it
    from starting meanwhile, and the store has one writer at a time."""
    state, stores = args.state_dir, ("relay.db", "hub.db")
    if not (state / KEY_FILE).is_file():
        print(f"eimis-relay rotate-key: no key ring {state / KEY_FILE}", file=sys.stderr)
        return 1
    try:
        with StateLock(state) as lock:
            lock.acquire("eimis-relay rotate-key")
            key_id = sealing.rotate(state / KEY_FILE)
            for db in (state / name for name in stores if (state / name).exists()):
                audit.record_offline(db, "admin", "rotate-key", f"key {key_id} added", now=time.time())
    except StoreBusy as exc:
        print(f"eimis-relay rotate-key: {exc}: stop it first (systemctl stop eimis-relay), rotate, start it",
              file=sys.stderr)
        return 1
    except KeyRingError as exc:
        print(f"eimis-relay rotate-key: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        print(f"eimis-relay rotate-key: key added to {state / KEY_FILE}, but not recorded in the audit trail: {exc}",
              file=sys.stderr)
        return 1
    print(f"{state / KEY_FILE}: key {key_id} added; start the daemon to seal new data with it")
    return 0


def _run(args: argparse.Namespace) -> int:
    return _start(config_path(args), load_relay_config, run_relay)


def _hub(args: argparse.Namespace) -> int:
    return _start(config_path(args), load_hub_config, run_hub)


def _start(path: Path, load, daemon) -> int:
    """Load and check everything that can be checked, then run ``daemon``;
    every refusal is one clear message and EX_CONFIG."""
    try:
        config = load(path)
    except ConfigError as exc:
        return _config_failed(path, exc)
    if problems := exposed_secrets(config):
        return _refuse(problems)
    _setup_logging(config)
    try:
        trio.run(daemon, config)
    except KeyRingError as exc:
        print(f"eimis-relay: cannot start: {exc}", file=sys.stderr)
        return os.EX_CONFIG
    except StoreBusy as exc:  # another daemon has the store: systemd may try again later
        print(f"eimis-relay: cannot start: {exc}", file=sys.stderr)
        return os.EX_TEMPFAIL
    return 0


# Exit status for a configuration problem (EX_CONFIG, 78): the units say
# RestartPreventExitStatus=78, so systemd does not restart in a loop what
# only an admin can fix.


def _config_failed(path: Path, exc: ConfigError) -> int:
    if isinstance(exc, NotConfigured):
        print(exc.problems[0], file=sys.stderr)
        return os.EX_CONFIG
    print(f"eimis-relay: cannot start, the configuration {path} is not valid:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)
    print(f"Fix it (see config.example.toml), then check it with: eimis-relay check-config --config {path}",
          file=sys.stderr)
    return os.EX_CONFIG


def _refuse(problems: list[str]) -> int:
    print("eimis-relay: refusing to start, secrets are exposed:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    return os.EX_CONFIG


def _setup_logging(config) -> None:
    logs.setup(config.log_level, config.log_format)

"""The ``eimis-relay`` command: one entry point, a sub-command per job."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import trio

from relay import __version__
from relay.cli import check_config, demo, doctor, ops, pki
from relay.cli.arguments import add_config_option, config_path
from relay.config.model import load_hub_config, load_relay_config
from relay.config.reader import ConfigError, NotConfigured
from relay.net.admin_socket import StoreBusy
from relay.runtime import logs
from relay.runtime.daemon import run_hub, run_relay
from relay.runtime.permissions import exposed_secrets
from relay.store import audit, sealing
from relay.store.sealing import KeyRingError


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
    sealing.register(commands)
    audit.register(commands)
    ops.register(commands)
    doctor.register(commands)

    args = parser.parse_args(argv)
    return args.func(args)


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

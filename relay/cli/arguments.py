"""The ``--config`` option every sub-command that reads a configuration takes."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

from relay.runtime.paths import default_config


def add_config_option(parser: argparse.ArgumentParser, name: str = "relay.toml") -> None:
    """``--config PATH``; without it, `config_path` gives ``name`` (relay.toml
    or hub.toml) in the configuration directory, found only when needed."""
    parser.add_argument("--config", type=Path, default=None, metavar="PATH",
                        help=f"config file (default: {name} in the configuration directory)")
    parser.set_defaults(config_name=name)


def config_path(args: argparse.Namespace) -> Path:
    return args.config or default_config(args.config_name)


def names_a_hub(path: Path) -> bool:
    """Whether the file at ``path`` is a hub's configuration (it has a
    ``[hub]`` table), for the commands that serve both: ``status`` and
    ``doctor``.  A file that cannot be read is taken for a relay's, whose
    loader then says what is wrong with it."""
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(document.get("hub"), dict) and "relay" not in document

"""Where things live: systemd's directories when run as a service,
platformdirs' otherwise, an explicit ``state_dir`` in the config above both."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "eimis-relay"


def default_config(name: str) -> Path:
    """``name`` (relay.toml or hub.toml) in systemd's configuration directory,
    else ``/etc/eimis-relay`` when it exists, else the user's config dir."""
    if directory := os.environ.get("CONFIGURATION_DIRECTORY"):
        return Path(directory.split(":")[0]) / name
    system = Path("/etc") / APP
    if system.is_dir():
        return system / name
    return Path(platformdirs.user_config_dir(APP)) / name


def state_dir(configured: Path | None) -> Path:
    if configured is not None:
        return configured
    if directory := os.environ.get("STATE_DIRECTORY"):
        return Path(directory.split(":")[0])
    return Path(platformdirs.user_data_dir(APP))

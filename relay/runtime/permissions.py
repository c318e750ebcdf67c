"""Refuse to run with secrets other users can read, as ssh does.

A private key or a signing secret readable by the group or by others is
a key that may already have leaked: starting anyway would hide that.
"""

from __future__ import annotations

import os
from pathlib import Path

from relay.config.model import HubConfig, RelayConfig
from relay.runtime.paths import state_dir
from relay.store.sealing import KEY_FILE


def exposed_secrets(config: RelayConfig | HubConfig) -> list[str]:
    """One line per secret file that the group or others may read."""
    problems = []
    for path in _secret_files(config):
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue  # a missing file is reported by whoever opens it, with its own message
        if mode & 0o077:
            problems.append(f"{path} is readable by group or others (mode {mode & 0o777:o}): chmod 600 {path}")
    return problems


def _secret_files(config: RelayConfig | HubConfig) -> list[Path]:
    sealing_keys = state_dir(config.state_dir) / KEY_FILE
    if isinstance(config, HubConfig):
        return [config.key_file, sealing_keys]
    files = [config.uplink.key_file, sealing_keys]
    if config.local_api.tls_key_file is not None:
        files.append(config.local_api.tls_key_file)
    return files

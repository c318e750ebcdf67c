"""``eimis-relay status --config hub.toml``: what the running hub is doing.

The hub answers over its admin socket (`relay.hub.operations`), found, as
for a relay, through the lock file of its state directory (``hub.lock``).
Exit codes are the relay's: 0 healthy, 1 running but unhealthy, 3 no hub
answers.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from relay.config.model import HubConfig, load_hub_config
from relay.config.reader import ConfigError
from relay.core import timeformat
from relay.core.timeformat import span
from relay.net import admin_socket
from relay.runtime.paths import state_dir

# Where the packaged hub service keeps its store (StateDirectory=eimis-relay-hub).
HUB_SERVICE_STATE = Path("/var/lib/eimis-relay-hub")
HUB_DB_NAME = "hub.db"


class HubCommandFailed(Exception):
    """The command cannot do what was asked; the message says why."""


def hub_store_dir(config: HubConfig) -> Path:
    """The hub's state directory, as its daemon sees it."""
    if config.state_dir is None and "STATE_DIRECTORY" not in os.environ and HUB_SERVICE_STATE.is_dir():
        return HUB_SERVICE_STATE
    return state_dir(config.state_dir)


def ask_hub(path: Path, op: str) -> Any:
    """The answer of the hub daemon of the configuration ``path``.  A file
    broken since the hub started still names its state directory: the hub
    running with the previous configuration is the one to ask."""
    try:
        state = hub_store_dir(load_hub_config(path))
    except ConfigError as exc:
        try:
            configured = tomllib.loads(path.read_text())["hub"]["state_dir"]
        except (OSError, ValueError, KeyError, TypeError):
            configured = None
        if not isinstance(configured, str) or not configured:
            raise HubCommandFailed(f"the configuration {path} is not valid:\n  " + "\n  ".join(exc.problems)) from None
        state = path.absolute().parent / configured
    return admin_socket.call(admin_socket.find_daemon(state, admin_socket.HUB_LOCK_NAME), op)


def render_hub_status(s: dict[str, Any], now: float) -> str:
    conns, limits, backlog, store = s["connections"], s["limits"], s["backlog"], s["store"]
    sweep, cert, reload = s["sweep"], s["certificate"], s["reload"]
    lines = [
        f"eimis-relay hub {s['version']}  {s['name']}  pid {s['pid']}, up {span(now - s['started'])}",
        f"health       {'ok' if s['healthy'] else 'UNHEALTHY'}",
        *(f"  problem    {p}" for p in s["problems"]),
        *(f"  warning    {w}" for w in s["warnings"]),
        f"connections  {conns['total']} from {len(conns['domains'])} domain(s) (max {limits['max_connections']},"
        f" {limits['max_connections_per_domain']} per domain); {conns['handshakes']} handshake(s) in progress"
        f" (max {limits['max_handshakes']}), {conns['evicted']} evicted"
        + ("" if s["accepting"] else "; NOT accepting"),
        f"backlog      {backlog['urgent'] + backlog['normal']} waiting ({backlog['urgent']} urgent,"
        f" {backlog['normal']} normal) for {backlog['domains']} domain(s)",
        *(f"  {domain:<24} {b['urgent']} urgent, {b['normal']} normal" for domain, b in backlog["busiest"].items()),
        f"store        {store['path']}, {store['used_bytes'] / 1e6:.1f} MB",
    ]
    if cert["expires"] is not None:
        lines.append(f"certificate  expires {timeformat.second(cert['expires'])}"
                     f" ({(cert['expires'] - now) / 86400:.0f} days)  {cert['file']}")
    last = "-" if sweep["last"] is None else (
        f"{timeformat.second(sweep['last'])}: {sweep.get('expired', 0)} expired, {sweep.get('seen', 0)}"
        f" filter entries and {sweep.get('txn', 0)} transaction answers pruned")
    lines.append(f"last sweep   {last} (every {sweep['interval']:g} s; replay window"
                 f" {sweep['replay_window'] / 86400:g} days)")
    when = "never reloaded" if reload["at"] is None else (
        f"last reload {'ok' if reload['ok'] else 'REFUSED'} at {timeformat.second(reload['at'])} ({reload['trigger']})")
    lines.append(f"config       {s['config']}, {when}")
    lines += [f"  reload     {e}" for e in reload["errors"]]
    return "\n".join(lines)

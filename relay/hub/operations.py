"""What ``eimis-relay status`` sees of a running hub, over its admin socket.

`HubOperations` lives in the hub daemon and serves ``status`` on the admin
channel (`relay.net.admin_socket`), as `relay.appliance.operations` does
for a relay: one snapshot (version, connections and the limits they are
held to, the backlog per lane and the domains with the most waiting, the
store, the certificate, the last sweep and reload) plus its assessment:
the *problems* that make the hub unhealthy (``status`` exits 1) and the
*warnings* that do not.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

from relay import __version__
from relay.config.model import HubConfig
from relay.core.priority import NORMAL, URGENT
from relay.core.timeformat import span
from relay.hub.server import Hub
from relay.net.admin_socket import Handler
from relay.pki import identity
from relay.store import hub_queue
from relay.store.engine import Store, StoreUnavailable

# The hub's certificate: a problem from this many days before it expires,
# a warning from WARN_DAYS (the relay's thresholds).
UNHEALTHY_DAYS = 7
WARN_DAYS = 30
# Domains listed by backlog in the status, the most loaded first.
TOP_DOMAINS = 10
# A sweep later than this many intervals means the sweep is stuck.
SWEEP_LATE = 3


def certificate_expiry(path) -> float | None:
    """When the certificate in ``path`` expires; None when it cannot be
    read (``doctor`` says why)."""
    try:
        cert = identity.load_certificates(path)[0]
    except (OSError, ValueError, IndexError):
        return None
    return identity.peer_identity(cert.public_bytes(Encoding.DER)).not_after.timestamp()


def assess(snapshot: dict[str, Any], now: float) -> tuple[list[str], list[str]]:
    """The problems (unhealthy) and warnings of a hub's status snapshot."""
    problems: list[str] = []
    warnings: list[str] = []
    if snapshot["store"]["error"]:
        problems.append(f"{snapshot['store']['error']} (disk full? relays get 503 until it can write)")
    expires = snapshot["certificate"]["expires"]
    if expires is None:
        problems.append(f"the hub's certificate {snapshot['certificate']['file']} cannot be read")
    elif (days := (expires - now) / 86400) <= 0:
        problems.append("the hub's certificate has expired")
    elif days <= UNHEALTHY_DAYS:
        problems.append(f"the hub's certificate expires in {days:.1f} day(s): renew it")
    elif days <= WARN_DAYS:
        warnings.append(f"the hub's certificate expires in {days:.0f} days: renew it")
    sweep = snapshot["sweep"]
    if sweep["last"] is None or now - sweep["last"] > SWEEP_LATE * sweep["interval"]:
        since = "yet" if sweep["last"] is None else f"for {span(now - sweep['last'])}"
        (warnings if sweep["last"] is None else problems).append(f"no sweep has ended {since}")
    conns, limits = snapshot["connections"], snapshot["limits"]
    if conns["total"] >= limits["max_connections"]:
        warnings.append(f"at max_connections ({limits['max_connections']}): new relays wait for a place")
    full = [d for d, n in conns["domains"].items() if n >= limits["max_connections_per_domain"]]
    if full:
        warnings.append(f"at max_connections_per_domain: {', '.join(sorted(full)[:TOP_DOMAINS])}")
    if snapshot["reload"]["errors"]:
        warnings.append("the last reload failed; the previous configuration is in force")
    return problems, warnings


class HubOperations:
    """The hub's side of the admin channel; ``config`` is read through a
    getter since a reload swaps it."""

    def __init__(self, config: Callable[[], HubConfig], store: Store, hub: Hub,
                 reload_state: Callable[[], dict[str, Any]]) -> None:
        self._config = config
        self.store = store
        self.hub = hub
        self._reload_state = reload_state
        self.started = time.time()
        # The last backlog read: what status shows while the store cannot read.
        self._backlog: dict[str, dict[int, int]] = {}

    def handlers(self) -> dict[str, Handler]:
        return {"status": self.status}

    async def status(self, args: dict[str, Any] | None = None) -> dict[str, Any]:
        config, now, hub = self._config(), time.time(), self.hub
        store_error = None
        try:
            self._backlog = await self.store.read("backlog", hub_queue.backlog)
        except StoreUnavailable as exc:
            store_error = str(exc)
        backlog = self._backlog
        busiest = sorted(backlog, key=lambda d: (-sum(backlog[d].values()), d))[:TOP_DOMAINS]
        snapshot: dict[str, Any] = {
            "kind": "hub", "version": __version__, "name": config.name, "pid": os.getpid(),
            "started": self.started, "config": str(config.path), "accepting": hub.accepting,
            "connections": {"total": hub.gate.authenticated, "handshakes": hub.gate.handshakes,
                            "domains": dict(hub.gate.per_domain), "evicted": hub.gate.evictions},
            "limits": {"max_connections": config.max_connections,
                       "max_connections_per_domain": config.max_connections_per_domain,
                       "max_handshakes": config.max_handshakes, "handshake_timeout": config.handshake_timeout},
            "backlog": {"urgent": sum(b.get(URGENT, 0) for b in backlog.values()),
                        "normal": sum(b.get(NORMAL, 0) for b in backlog.values()), "domains": len(backlog),
                        "busiest": {d: {"urgent": backlog[d].get(URGENT, 0), "normal": backlog[d].get(NORMAL, 0)}
                                    for d in busiest}},
            "store": {"path": str(self.store.path), "used_bytes": self.store.used_bytes, "error": store_error},
            "certificate": {"file": str(config.cert_file), "expires": certificate_expiry(config.cert_file)},
            "sweep": {"last": hub.last_sweep, "interval": config.expiry_interval, **hub.last_sweep_counts,
                      "replay_window": config.replay_window},
            "reload": self._reload_state(),
        }
        problems, warnings = assess(snapshot, now)
        snapshot.update(healthy=not problems, problems=problems, warnings=warnings)
        return snapshot

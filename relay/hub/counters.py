"""What the hub counts as it happens, for its Prometheus metrics
(`relay.hub.metrics` serves them; docs/operations.md lists them).

Made before the store and the hub, which are each handed it: the store
reports each commit's time, the hub each handshake, refusal, transaction,
ack and sweep.  prometheus_client's counters are thread-safe, so the
store's writer thread may report too.
"""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Counter, Histogram, Info

from relay import __version__
from relay.core import protocol

# Group commits take milliseconds (one fsync); seconds mean a sick disk.
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# The label values of each counter, all present (at 0) from the start.
HANDSHAKE_OUTCOMES = ("ok", "failed", "timed_out", "evicted")
REFUSALS = ("capacity", "domain_capacity", "unknown_domain", "revoked", "no_alpn", "shutting_down", "error")
ENVELOPE_RESULTS = ("accepted", protocol.INVALID_ENVELOPE, protocol.SENDER_NOT_AUTHENTICATED,
                    protocol.UNKNOWN_DOMAIN, protocol.EXPIRED)
PRUNED_TABLES = ("seen", "txn")


class HubCounters:
    """The registry of one hub, with what its parts report as it happens."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        Info("eimis_hub_build", "The hub's version", registry=registry).info(
            {"version": __version__, "python": platform.python_version()})
        self.handshakes = Counter("eimis_hub_handshakes", "TLS handshakes, by how they ended", ["outcome"],
                                  registry=registry)
        self.refused = Counter("eimis_hub_connections_refused", "Connections closed without serving them",
                               ["reason"], registry=registry)
        self.transactions = Counter("eimis_hub_transactions", "Transactions answered (a replay counts again)",
                                    registry=registry)
        self.envelopes = Counter("eimis_hub_envelopes", "Envelope answers, accepted or refused by reason",
                                 ["result"], registry=registry)
        self.acked = Counter("eimis_hub_acked_positions", "Inbox positions relays acknowledged",
                             registry=registry)
        self.read_receipts = Counter("eimis_hub_read_receipts", "Read receipts routed or refused",
                                     ["result"], registry=registry)
        self.expired = Counter("eimis_hub_messages_expired", "Queued messages failed as expired by the sweep",
                               registry=registry)
        self.sweeps = Counter("eimis_hub_sweeps", "Rounds of the periodic sweep", registry=registry)
        self.pruned = Counter("eimis_hub_pruned_rows", "Replay records pruned past the replay window",
                              ["table"], registry=registry)
        self.commit_seconds = Histogram("eimis_hub_store_commit_seconds", "Time to commit one group of units",
                                        buckets=COMMIT_BUCKETS, registry=registry)
        for family, values in [(self.handshakes, HANDSHAKE_OUTCOMES), (self.refused, REFUSALS),
                               (self.envelopes, ENVELOPE_RESULTS), (self.read_receipts, ("routed", "refused")),
                               (self.pruned, PRUNED_TABLES)]:
            for value in values:
                family.labels(value)

    def observe_commit(self, seconds: float) -> None:
        """A group committed (called on the store's writer thread, which prometheus_client allows)."""
        self.commit_seconds.observe(seconds)

"""``eimis-relay audit-verify``: check a store's audit trail, read only,
while its daemon may run (the chain itself is `relay.store.audit`)."""

from __future__ import annotations

import argparse
import sqlite3
from pathlib import Path

from relay.store.audit import verify


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("audit-verify", help="check that the audit trail has not been altered")
    parser.add_argument("--db", type=Path, required=True, metavar="FILE",
                        help="the relay's relay.db or the hub's hub.db (read only; the daemon may run)")
    parser.set_defaults(func=_verify_command)


def _verify_command(args: argparse.Namespace) -> int:
    try:
        conn = sqlite3.connect(f"{args.db.absolute().as_uri()}?mode=ro", uri=True)
        try:
            checked, problem = verify(conn)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        print(f"{args.db}: cannot read the audit trail: {exc}")
        return 1
    if problem is not None:
        print(f"{args.db}: audit trail BROKEN after {checked} good entries: {problem}")
        return 1
    print(f"{args.db}: audit trail intact ({checked} entries)")
    return 0

"""The ``eimis-relay pki`` sub-commands: a demo PKI, CSRs for the national
PKI, and the hospital's own local CA for the local API over TLS.

The local CA (``local-ca``) is the hospital's, not the nation's: it signs
the relay's local API certificate and one client certificate per local
system (``local-client``); the relay, given ``tls_client_ca_file``, then
takes a connection only from a system holding one (docs/security.md,
"The local network")."""

import argparse
import sys
from pathlib import Path

from relay.core.errors import describe_error
from relay.pki import authority


def register(subparsers) -> None:
    """Add the ``pki`` command and its sub-commands to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "pki", help="make a demo PKI, or a key and CSR for the national PKI"
    )
    commands = parser.add_subparsers(dest="pki_command", required=True, metavar="COMMAND")

    create_ca = commands.add_parser("create-ca", help="create a demo CA (ca.pem, ca.key)")
    create_ca.add_argument("--out", type=Path, required=True, metavar="DIR")
    create_ca.add_argument("--name", default="EIMIS Demo National CA", metavar="CN")
    create_ca.add_argument("--days", type=int, default=3650)
    create_ca.set_defaults(func=_create_ca)

    issue = commands.add_parser("issue", help="issue a certificate from the demo CA")
    issue.add_argument("--ca-cert", type=Path, required=True, metavar="PEM")
    issue.add_argument("--ca-key", type=Path, required=True, metavar="KEY")
    issue.add_argument(
        "--domain", action="append", required=True, metavar="D",
        help="DNS name; repeat for more (the first names the files)",
    )
    issue.add_argument("--ip", action="append", default=[], metavar="IP")
    issue.add_argument("--role", choices=authority.ROLES, required=True)
    issue.add_argument("--org-id", metavar="ID", help="1 + FINESS or 3 + SIRET")
    issue.add_argument("--days", type=int, default=825)
    issue.add_argument("--out", type=Path, required=True, metavar="DIR")
    issue.set_defaults(func=_issue)

    csr = commands.add_parser("csr", help="make a private key and a CSR for the national PKI")
    csr.add_argument("--domain", required=True, metavar="D")
    csr.add_argument("--org-id", metavar="ID", help="1 + FINESS or 3 + SIRET")
    csr.add_argument("--out", type=Path, required=True, metavar="DIR")
    csr.set_defaults(func=_csr)

    local_ca = commands.add_parser(
        "local-ca", help="make the hospital's local CA and the relay's local API certificate",
        description="Writes DIR/local-ca.pem and .key (the local CA; never replaced: keep its key offline) and "
                    "DIR/NAME.pem and .key, the local API's server certificate for NAME (and each --ip).")
    local_ca.add_argument("--out", type=Path, required=True, metavar="DIR")
    local_ca.add_argument("--server-name", action="append", required=True, metavar="NAME",
                          help="the DNS name local systems use to reach the relay; repeat for more")
    local_ca.add_argument("--ip", action="append", default=[], metavar="IP",
                          help="an IP address local systems use to reach the relay; repeat for more")
    local_ca.add_argument("--ca-name", default="EIMIS relay local CA", metavar="CN")
    local_ca.add_argument("--days", type=int, default=825, help="validity of the server certificate")
    local_ca.set_defaults(func=_local_ca)

    local_client = commands.add_parser(
        "local-client", help="issue a local system's client certificate from the local CA",
        description="Writes DIR/SYSTEM.pem and .key, signed by CA_DIR/local-ca.pem: give both to that system.")
    local_client.add_argument("--ca-dir", type=Path, required=True, metavar="CA_DIR",
                              help="the directory of `pki local-ca` (local-ca.pem, local-ca.key)")
    local_client.add_argument("--system", required=True, metavar="SYSTEM",
                              help="the local system's name (letters, digits, '-' and '.')")
    local_client.add_argument("--days", type=int, default=825)
    local_client.add_argument("--out", type=Path, required=True, metavar="DIR")
    local_client.set_defaults(func=_local_client)

    crl = commands.add_parser("crl", help="write a demo CRL revoking the given certificates")
    crl.add_argument("--ca-cert", type=Path, required=True, metavar="PEM")
    crl.add_argument("--ca-key", type=Path, required=True, metavar="KEY")
    crl.add_argument("--revoke", type=Path, action="append", default=[], metavar="CERT")
    crl.add_argument("--days", type=int, default=7, help="days until the next update")
    crl.add_argument("--out", type=Path, required=True, metavar="FILE")
    crl.set_defaults(func=_crl)


def _create_ca(args: argparse.Namespace) -> int:
    return _run(authority.create_ca, args.out, common_name=args.name, days=args.days)


def _issue(args: argparse.Namespace) -> int:
    return _run(
        authority.issue_certificate, args.ca_cert, args.ca_key, args.out,
        dns_names=args.domain, role=args.role, ip_addresses=args.ip,
        org_id=args.org_id, days=args.days,
    )


def _csr(args: argparse.Namespace) -> int:
    return _run(authority.make_key_and_csr, args.out, domain=args.domain, org_id=args.org_id)


def _local_ca(args: argparse.Namespace) -> int:
    def make(out: Path) -> list[Path]:
        ca = authority.create_ca(out, common_name=args.ca_name, stem=LOCAL_CA, replace=False)
        server = authority.issue_certificate(*ca, out, dns_names=args.server_name, role="local",
                                             ip_addresses=args.ip, days=args.days)
        return [*ca, *server]

    return _run(make, args.out)


def _local_client(args: argparse.Namespace) -> int:
    ca = (args.ca_dir / f"{LOCAL_CA}.pem", args.ca_dir / f"{LOCAL_CA}.key")
    return _run(authority.issue_certificate, *ca, args.out, dns_names=[args.system], role="local-client",
                days=args.days)


# The local CA's files in the directory of `pki local-ca`.
LOCAL_CA = "local-ca"


def _crl(args: argparse.Namespace) -> int:
    return _run(authority.make_crl, args.ca_cert, args.ca_key, args.out, revoked=args.revoke, days=args.days)


def _run(make, *args, **kwargs) -> int:
    """Call ``make`` and print the paths it wrote, or a one-line error: never key contents."""
    try:
        paths = make(*args, **kwargs)
    except (OSError, ValueError) as exc:
        print(f"eimis-relay pki: {describe_error(exc)}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"wrote {path}")
    return 0

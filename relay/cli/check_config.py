"""``eimis-relay check-config``: everything that can be checked without starting.

The config is parsed in full (every problem listed, not just the first),
then each certificate is checked against its key, the national CA and the
domain it must carry, and its expiry is reported.
"""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path

from relay.cli.arguments import add_config_option, config_path
from relay.config.model import HubConfig, RelayConfig, load_hub_config, load_relay_config
from relay.config.reader import ConfigError, defines_table
from relay.net.tls import local_server_context
from relay.pki import identity


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("check-config", help="validate a relay's or the hub's configuration")
    add_config_option(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    path = config_path(args)
    try:
        config = load_hub_config(path) if _is_hub(path) else load_relay_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}")
        print(f"{path}: {len(exc.problems)} problem(s)")
        return 1
    findings = check_files(config)
    for finding in findings:
        print(f"{finding.level}: {finding.message}")
    errors = sum(f.level == "error" for f in findings)
    print(f"{path}: {'valid' if not errors else f'{errors} problem(s)'}")
    return 1 if errors else 0


def check_files(config: RelayConfig | HubConfig) -> list[identity.Finding]:
    if isinstance(config, HubConfig):
        return identity.check_identity(config.cert_file, config.key_file, config.ca_file, config.name)
    up = config.uplink
    findings = identity.check_identity(up.cert_file, up.key_file, up.ca_file, config.domain)
    findings += _first_name_is_domain(up.cert_file, config.domain)
    local = config.local_api
    if local.tls_cert_file is not None:
        assert local.tls_key_file is not None  # the config requires both
        try:
            local_server_context(local.tls_cert_file, local.tls_key_file)
        except (OSError, ssl.SSLError) as exc:
            findings.append(identity.Finding("error", f"[local_api] TLS certificate and key do not load: {exc}"))
    return findings


def _first_name_is_domain(cert_file: Path, domain: str) -> list[identity.Finding]:
    """The hub takes a relay's domain from the first DNS name of its
    certificate's subjectAltName: another name first would be refused."""
    try:
        names = identity.san_dns_names(identity.load_certificates(cert_file)[0])
    except (OSError, ValueError, IndexError):
        return []  # check_identity has reported the unreadable file
    if names and names[0].lower() != domain and domain in (n.lower() for n in names):
        return [identity.Finding("error", f"{cert_file}: {domain} must be the first DNS name of the subjectAltName "
                                     f"(it is {names[0]}): the hub identifies relays by that name")]
    return []


def _is_hub(path: Path) -> bool:
    """A hub's file (or one of its fragments) has a [hub] table; anything
    unreadable goes to the relay loader, whose error names the problem."""
    return defines_table(path, "hub")

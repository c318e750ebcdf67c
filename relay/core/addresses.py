"""Names on the network: DNS names, hosts and messaging addresses.

One set of rules for everything that reads a name: the configuration
loader, the wire codec (`relay.core.protocol`) and the demo PKI.  Were they
to differ, a domain one of them accepts could be refused by another only
once messages flow (a relay configured for a domain its certificate cannot
carry, an address the local API takes and the hub refuses).

A DNS label is RFC 1123 §2.1's: 1 to 63 letters, digits and hyphens, not
starting or ending with a hyphen; a name is at most 253 characters (the 255
octets of RFC 1035 §2.3.4, less the length octets).  Only lowercase is
accepted, so that names compare as plain strings: callers that read mixed
case (the configuration, the PKI) fold it first; on the wire names must
arrive lowercase.

An address is ``local@domain``: the local part 1 to 64 characters of
``[a-z0-9._+-]`` (64 is RFC 5321 §4.5.3.1.1's limit), the domain a DNS name
of at least two labels.  That makes at most 318 characters, within the 320
docs/protocol.md states.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TypeGuard

MAX_NAME = 253
MAX_LOCAL_PART = 64
MAX_ADDRESS = MAX_LOCAL_PART + 1 + MAX_NAME

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")
_LOCAL_PART = re.compile(rf"[a-z0-9._+-]{{1,{MAX_LOCAL_PART}}}")


def is_host_name(text: object) -> bool:
    """Whether `text` is a lowercase DNS name; one label is enough ("localhost")."""
    # fullmatch, not match with "$": "$" also matches before a trailing newline.
    return isinstance(text, str) and len(text) <= MAX_NAME and _HOST_NAME.fullmatch(text) is not None


def is_domain(text: object) -> bool:
    """Whether `text` is a lowercase DNS name of at least two labels: a
    relay's domain, the part of an address after the ``@``."""
    return isinstance(text, str) and len(text) <= MAX_NAME and _DOMAIN.fullmatch(text) is not None


def is_host(text: object) -> bool:
    """Whether `text` is an IP address or a lowercase host name: what a URL or a listen address may name."""
    if not isinstance(text, str):
        return False
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return is_host_name(text)
    return True


def is_address(text: object) -> TypeGuard[str]:
    """Whether `text` is a lowercase ``local@domain`` messaging address."""
    if not isinstance(text, str) or len(text) > MAX_ADDRESS:
        return False
    local, _, domain = text.rpartition("@")
    return _LOCAL_PART.fullmatch(local) is not None and is_domain(domain)


def domain_of(address: str) -> str:
    """The domain of an address: everything after the last ``@``."""
    return address.rpartition("@")[2]

"""Exceptions in words (relay.core.errors, relay.net.errors): one line, the cause, no Python noise."""

import errno
import os
import ssl
from pathlib import Path

import pytest
import trio

from relay.core.errors import describe_error
from relay.net.errors import reason


def test_an_os_error_names_the_file_and_the_reason(tmp_path: Path):
    with pytest.raises(OSError, match="No such file") as caught:
        (tmp_path / "ca.pem").read_bytes()
    assert describe_error(caught.value) == f"{tmp_path / 'ca.pem'}: No such file or directory"
    assert describe_error(ConnectionRefusedError(errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED))) == \
        "Connection refused"


def test_an_exception_without_a_message_is_named():
    assert describe_error(ValueError("bad key")) == "bad key"
    assert describe_error(ValueError()) == "ValueError"


def test_a_deadline_is_a_timeout():
    assert reason(trio.TooSlowError()) == "timed out"


def test_a_tls_failure_is_unwrapped_from_trio():
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    verify.verify_message = "unable to get local issuer certificate"
    broken = trio.BrokenResourceError()
    broken.__cause__ = verify
    assert reason(broken) == "TLS: the peer's certificate was refused (unable to get local issuer certificate)"
    tls = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    tls.reason = "WRONG_VERSION_NUMBER"
    assert reason(tls) == "TLS: WRONG_VERSION_NUMBER"


def test_a_connection_error_says_the_systems_reason():
    assert reason(ConnectionRefusedError(errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED))) == "Connection refused"
    assert reason(trio.BrokenResourceError()) == "BrokenResourceError"

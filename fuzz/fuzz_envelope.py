"""A coverage-guided fuzz target for the national protocol's decoders.

    pip install atheris
    python fuzz/fuzz_envelope.py -max_total_time=60 fuzz/corpus  # seeds: valid bodies

Any exception other than ProtocolViolation is a crash worth a bug report:
the hub and the relays run these decoders on bytes from other hospitals.
"""

import sys

import atheris

with atheris.instrument_imports():
    from relay.core import protocol
    from relay.core.protocol import Envelope, InboxItem, ProtocolViolation


def test_one_input(data: bytes) -> None:
    for decode in (protocol.decode_transaction, protocol.decode_ack, protocol.decode_receipts):
        try:
            decode(data)
        except ProtocolViolation:
            pass
    try:
        obj = protocol.unpack(data, "fuzz")
    except ProtocolViolation:
        return
    for check in (Envelope.from_wire, InboxItem.from_wire):
        try:
            check(obj)
        except ProtocolViolation:
            pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()

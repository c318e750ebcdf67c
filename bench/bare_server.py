"""The "Python ceiling": a bare trio + ssl + h2 server that stores nothing.

It reads each request's body (a 1 KiB POST) and answers ``202`` with a tiny
JSON body, over TLS 1.3 with a required client certificate, ALPN ``h2``:
the same stack and the same handshake as the relay's national link, minus
everything the relay does with a message.  What the relay reaches as a
fraction of this server's rate is what its own work (parsing, validating,
committing) costs; the rest is the Python + h2 floor no relay can go under.

Deliberately small (issue 7 asks for ~100 lines): one task per connection
reading, h2 queueing the answers, one ``send_all`` per batch of received
bytes; no per-stream tasks, no flow-control waits (bodies and answers fit
the large windows opened at the start).  ``--plain`` serves cleartext
HTTP/2 with prior knowledge instead, for h2load, which cannot present a
client certificate.

Run as ``python -m bench.bare_server --port 0 ...``; it prints
``READY <port>`` once listening and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import ssl
import sys

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio

WINDOW = 2**24  # the notes: 64 KiB stalls a hundred concurrent uploads for seconds
ANSWER = b'{"id":"bare","status":"queued"}'
ANSWER_HEADERS = [(b":status", b"202"), (b"content-type", b"application/json"),
                  (b"content-length", str(len(ANSWER)).encode())]


def tls_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """TLS 1.3 only, client certificate required, ALPN h2: the hub's policy."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile=ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2"])
    return ctx


async def serve_connection(stream: trio.abc.Stream) -> None:
    """Serve one connection until the client closes it or breaks it."""
    config = h2.config.H2Configuration(client_side=False, header_encoding=None)
    conn = h2.connection.H2Connection(config=config)
    conn.local_settings = h2.settings.Settings(client=False, initial_values={
        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100,
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW})
    conn.initiate_connection()
    conn.increment_flow_control_window(WINDOW - 65535)
    bodies: dict[int, int] = {}
    try:
        with trio.fail_after(10):
            if isinstance(stream, trio.SSLStream):
                await stream.do_handshake()
        await stream.send_all(conn.data_to_send())
        while data := await stream.receive_some(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    bodies[event.stream_id] = 0
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    bodies[event.stream_id] = bodies.get(event.stream_id, 0) + len(event.data)
                elif isinstance(event, h2.events.StreamEnded):
                    bodies.pop(event.stream_id, None)
                    conn.send_headers(event.stream_id, ANSWER_HEADERS)
                    conn.send_data(event.stream_id, ANSWER, end_stream=True)
                elif isinstance(event, h2.events.StreamReset):
                    bodies.pop(event.stream_id, None)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    return
            if out := conn.data_to_send():
                await stream.send_all(out)
    except (trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError, h2.exceptions.ProtocolError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def main(args: argparse.Namespace) -> None:
    ctx = None if args.plain else tls_context(args.cert, args.key, args.ca)
    listeners = await trio.open_tcp_listeners(args.port, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    if ctx is not None:
        listeners = [trio.SSLListener(listener, ctx, https_compatible=True) for listener in listeners]
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, serve_connection, listeners)
            print(f"READY {port}", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_server", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--plain", action="store_true", help="cleartext HTTP/2 (prior knowledge)")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--ca", help="the CA client certificates must chain to")
    args = parser.parse_args(argv)
    if not args.plain and not (args.cert and args.key and args.ca):
        parser.error("--cert, --key and --ca are required unless --plain")
    return args


if __name__ == "__main__":
    trio.run(main, parse_args(sys.argv[1:]))

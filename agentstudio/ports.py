"""The listening socket of a role's HTTP server, bound before anything else starts.

uvicorn binds only after the app and NATS are up, and reports a taken port as one log line among
many before exiting 3; binding first lets a role say in words what is wrong and stop before it has
started anything (or taken calls it could not serve). uvicorn then serves the socket we hand it.
"""

from __future__ import annotations

import errno
import socket


class CannotListen(Exception):
    """The port cannot be bound; the message says why and what to do, for a person."""


def bind(host: str, port: int, hint: str, guess: str = "") -> socket.socket:
    """A TCP socket bound to host:port (not yet listening; uvicorn does that). `hint` says how to pick
    another port ("use --port"), `guess` what may hold this one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # As uvicorn does: a restart must not wait for the old connections' TIME_WAIT. On Linux this
    # never allows binding a port another socket listens on.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # uvicorn takes a socket handed to it as a Unix one (socket.fromfd(fd, AF_UNIX, ...)), so neither
    # uvloop nor asyncio turns Nagle off on its connections as they do for TCP: a response written in
    # two parts then waits for the client's delayed ACK (40 ms). Linux copies the option from the
    # listening socket to each connection it accepts.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CannotListen(f"port {port} is in use{f' ({guess})' if guess else ''}; {hint}") from None
        raise CannotListen(f"cannot listen on {host}:{port}: {exc.strerror or exc}; {hint}") from None
    sock.set_inheritable(True)  # uvicorn's workers (ingest --workers N) inherit it
    return sock

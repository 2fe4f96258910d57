"""A hostile (or merely hand-driven) client: a plain socket to an agent, frames by hand."""

from __future__ import annotations

import socket

from kvxfer.agent import decode_metadata
from kvxfer.backends.base import parse_host_port
from kvxfer.protocol import NEED_DATA, Connection


def raw_client(meta: bytes, prefix: bytes = b"") -> tuple[socket.socket, Connection]:
    """A socket connected where ``meta``'s agent listens (tcp, nccl), and a parser for
    what it answers; ``prefix`` goes first (nccl's 16-byte rendezvous key)."""
    sock = socket.create_connection(parse_host_port(decode_metadata(meta).address), timeout=10)
    if prefix:
        sock.sendall(prefix)
    return sock, Connection()


def events(sock: socket.socket, conn: Connection, n: int) -> list:
    """The next ``n`` frames from the agent; "EOF" for each once it closed."""
    out: list = []
    while len(out) < n:
        ev = conn.next_event()
        if ev is NEED_DATA:
            data = sock.recv(65536)
            conn.receive_data(data)
            if not data:
                out.append("EOF")
            continue
        out.append(ev)
    return out

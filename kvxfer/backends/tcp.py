"""TCP backend: kvxfer frames over one TCP connection per peer.

Theory of operation
-------------------
Everything above the byte stream (requests, chunks, credits, serving) is shared with
the other two-sided backends in :mod:`kvxfer.backends.twosided`. This module only
listens, accepts and connects, and wraps each connected socket in a
:class:`~kvxfer.backends.sockio.SocketChannel`, whose scatter-gather I/O moves host
blocks straight between the socket and the engine's tensors::

    listen socket --HandshakeGate (accept, handshake; one thread for all)-->
                     SocketChannel --serve_channel--> ServerSide thread
    connect() -----> SocketChannel --handshake------> ClientSide threads
"""

from __future__ import annotations

import socket
import threading
from ..errors import PeerUnreachable
from ..protocol import Connection
from ..protocol.handshake import ServerHandshake
from .base import BackendConfig, PeerInfo, parse_host_port
from .gate import HandshakeGate
from .sockio import SocketChannel, shutdown_socket
from .twosided import Channel, TwoSidedBackend

SOCK_BUF = 4 << 20


def tune_socket(sock: socket.socket) -> None:
    """No Nagle delay; 4 MiB kernel buffers where the system allows."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
        except OSError:
            pass


class TcpBackend(TwoSidedBackend):
    name = "tcp"
    prefix_len = 0  # bytes a connecting side sends before its HELLO

    def __init__(self, agent_name: str, listen: str, config: BackendConfig) -> None:
        super().__init__(agent_name, listen, config)
        host, port = parse_host_port(listen)
        try:
            self._lsock = socket.create_server((host, port), backlog=128)
        except OSError as exc:
            raise PeerUnreachable(f"cannot listen on {listen!r}: {exc}") from exc
        self._gate = HandshakeGate(self._lsock, self.server_handshake, self._ready,
                                   hello_timeout=config.hello_timeout,
                                   max_handshakes=config.max_handshakes,
                                   prefix_len=self.prefix_len, name=agent_name)

    def address(self) -> str:
        host, port = self._lsock.getsockname()[:2]
        if host in ("0.0.0.0", "::"):
            host = socket.gethostbyname(socket.gethostname())
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _listen(self) -> None:
        self._gate.start()

    def _ready(self, sock: socket.socket, conn: Connection, shake: ServerHandshake,
               prefix: bytes) -> None:
        """A peer finished its handshake (on the gate's thread): serve it."""
        tune_socket(sock)
        self.serve_channel(self._server_channel(sock, conn, prefix), shake)

    def _server_channel(self, sock: socket.socket, conn: Connection, prefix: bytes) -> Channel:
        return SocketChannel(sock, conn)

    def _open_channel(self, peer: PeerInfo) -> Channel:
        host, port = parse_host_port(peer.address)
        try:
            sock = socket.create_connection((host, port), timeout=self.config.connect_timeout)
        except OSError as exc:
            raise PeerUnreachable(f"cannot reach peer {peer.name!r} at {peer.address}: {exc}") \
                from exc
        tune_socket(sock)
        return SocketChannel(sock)

    def _stop_listening(self) -> list[threading.Thread]:
        thread = self._gate.stop()
        if thread.ident is not None:
            thread.join(timeout=10)
        shutdown_socket(self._lsock)
        self._lsock.close()
        return []

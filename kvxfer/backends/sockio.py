"""Blocking scatter-gather socket I/O for frames whose payload is many buffers.

``send_buffers`` hands a list of buffers to ``sendmsg`` (at most IOV_MAX per call) and
resumes after partial sends; ``recv_payload`` fills a list of memoryviews with
``recvmsg_into``, after first draining what the protocol Connection already buffered.
No payload byte is copied in Python except that buffered remainder (<= one read).
:class:`SocketChannel` puts both behind the two-sided backends' Channel interface.
"""

from __future__ import annotations

import os
import socket
from typing import Optional, Sequence

from ..errors import PeerUnreachable
from ..protocol import NEED_DATA, Connection, Event
from .twosided import Abandoned, Channel, Guard

try:
    IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
except (ValueError, OSError, AttributeError):
    IOV_MAX = 512
READ_SIZE = 64 << 10


def _guarded_sendmsg(sock: socket.socket, views: list[memoryview], guard: Optional[Guard],
                     total: int) -> int:
    if guard is None:
        return sock.sendmsg(views)
    with guard.data_lock:
        if not guard.active:
            raise Abandoned(total)
        return sock.sendmsg(views)


def _advance(views: list[memoryview], i: int, n: int) -> int:
    """Consume ``n`` bytes from ``views[i:]`` (trimming a partly done view in place);
    return the index of the first view with bytes left."""
    while n:
        v = views[i]
        if n >= v.nbytes:
            n -= v.nbytes
            i += 1
        else:
            views[i] = v[n:]
            n = 0
    return i


def send_buffers(sock: socket.socket, buffers: Sequence[object],
                 guard: Optional[Guard] = None) -> None:
    """Send every buffer in order.

    Raises:
        Abandoned: ``guard`` became inactive; ``.sent`` bytes of the frame went out.
    """
    views = [memoryview(b).cast("B") for b in buffers]  # type: ignore[arg-type]
    views = [v for v in views if v.nbytes]
    i = total = 0
    while i < len(views):
        sent = _guarded_sendmsg(sock, views[i:i + IOV_MAX], guard, total)
        total += sent
        i = _advance(views, i, sent)


class FrameReader:
    """Reads protocol events from a socket through a sans-I/O Connection."""

    def __init__(self, sock: socket.socket, conn: Connection) -> None:
        self.sock = sock
        self.conn = conn
        self._buf = bytearray(READ_SIZE)

    def next_event(self) -> Event:
        while True:
            ev = self.conn.next_event()
            if ev is not NEED_DATA:
                return ev
            n = self.sock.recv_into(self._buf)
            self.conn.receive_data(memoryview(self._buf)[:n] if n else b"")

    def recv_payload(self, views: Sequence[memoryview]) -> None:
        """Fill ``views`` (total = the frame's payload) in order."""
        pending = []
        for v in views:
            n = self.conn.take_payload_into(v)
            if n < v.nbytes:
                pending.append(v[n:])
        i = 0
        while i < len(pending):
            got = self.sock.recvmsg_into(pending[i:i + IOV_MAX])[0]
            if got == 0:
                raise PeerUnreachable("peer closed the connection in the middle of a payload")
            self.conn.payload_received_elsewhere(got)
            i = _advance(pending, i, got)

    def drain_payload(self) -> None:
        """Read and discard the rest of the current payload."""
        scratch = memoryview(self._buf)
        while self.conn.payload_remaining:
            n = self.conn.take_payload_into(scratch)
            if n == 0:
                got = self.sock.recv_into(scratch, min(len(scratch), self.conn.payload_remaining))
                if got == 0:
                    raise PeerUnreachable("peer closed the connection in the middle of a payload")
                self.conn.payload_received_elsewhere(got)


def shutdown_socket(sock: socket.socket) -> None:
    """Shut both directions, waking threads blocked on ``sock``; errors ignored."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class SocketChannel(Channel):
    """A connected stream socket as a frame channel (TCP backend)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = FrameReader(sock, Connection())

    def send(self, buffers: Sequence[object], guard: Optional[Guard] = None) -> None:
        send_buffers(self.sock, buffers, guard)

    def next_event(self) -> Event:
        return self.reader.next_event()

    def recv_payload(self, buffers: Sequence[object]) -> None:
        self.reader.recv_payload(buffers)  # type: ignore[arg-type]

    def drain_payload(self) -> None:
        self.reader.drain_payload()

    def set_timeout(self, seconds: float | None) -> None:
        self.sock.settimeout(seconds)

    def shutdown(self) -> None:
        shutdown_socket(self.sock)

    def close(self) -> None:
        self.sock.close()

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
import threading
from typing import Optional, Protocol, Sequence

from ..errors import PeerUnreachable
from ..protocol import NEED_DATA, Connection, Event
from .twosided import Channel

try:
    IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
except (ValueError, OSError, AttributeError):
    IOV_MAX = 512
READ_SIZE = 64 << 10


class Guard(Protocol):
    data_lock: threading.Lock

    @property
    def active(self) -> bool: ...


class Abandoned(Exception):
    """The guarded transfer stopped being active during a send."""

    def __init__(self, sent: int) -> None:
        super().__init__(f"transfer abandoned after {sent} bytes of its frame were sent")
        self.sent = sent


def _guarded_sendmsg(sock: socket.socket, views: list[memoryview], guard: Optional[Guard],
                     total: int) -> int:
    if guard is None:
        return sock.sendmsg(views)
    with guard.data_lock:
        if not guard.active:
            raise Abandoned(total)
        return sock.sendmsg(views)


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
        while sent:
            v = views[i]
            if sent >= v.nbytes:
                sent -= v.nbytes
                i += 1
            else:
                views[i] = v[sent:]
                sent = 0


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_LOCK = _NoLock()


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

    def recv_payload(self, views: Sequence[memoryview], guard: Optional[Guard] = None) -> bool:
        """Fill ``views`` (total = the frame's payload) in order.

        Returns:
            False if ``guard`` became inactive: the rest of the payload was drained and
            no byte was written into ``views`` after that.
        """
        lock = guard.data_lock if guard is not None else _NO_LOCK
        pending = []
        with lock:
            if guard is not None and not guard.active:
                self.drain_payload()
                return False
            for v in views:
                n = self.conn.take_payload_into(v)
                if n < v.nbytes:
                    pending.append(v[n:])
        i = 0
        while i < len(pending):
            with lock:
                if guard is not None and not guard.active:
                    self.drain_payload()
                    return False
                got = self.sock.recvmsg_into(pending[i:i + IOV_MAX])[0]
            if got == 0:
                raise PeerUnreachable("peer closed the connection in the middle of a payload")
            self.conn.payload_received_elsewhere(got)
            while got:
                v = pending[i]
                if got >= v.nbytes:
                    got -= v.nbytes
                    i += 1
                else:
                    pending[i] = v[got:]
                    got = 0
        return True

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

    def send(self, buffers: Sequence[object]) -> None:
        send_buffers(self.sock, buffers)

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

"""Blocking scatter-gather socket I/O for frames whose payload is many buffers.

``send_buffers`` hands a list of buffers to ``sendmsg`` (at most IOV_MAX per call) and
resumes after partial sends; ``recv_payload`` fills a list of memoryviews with
``recvmsg_into``, after first draining what the protocol Connection already buffered.
No payload byte is copied in Python except that buffered remainder (<= one read).
Guarded calls (a transfer's engine memory) never block holding the transfer's lock:
they are non-blocking, and the wait for the socket happens between them (see
:mod:`kvxfer.backends.channel`).
:class:`SocketChannel` puts both behind the two-sided backends' Channel interface.
"""

from __future__ import annotations

import os
import select
import socket
from typing import Optional, Sequence

from ..errors import PeerUnreachable
from ..protocol import NEED_DATA, Connection, Event
from .channel import Abandoned, Channel, Guard

try:
    IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
except (ValueError, OSError, AttributeError):
    IOV_MAX = 512
READ_SIZE = 64 << 10


_ZEROS = memoryview(bytes(READ_SIZE))  # filler for the rest of an abandoned frame
FILLER_STALL = 5.0  # seconds without progress before finishing a frame counts as stalled
GUARD_POLL = 0.1  # a guarded call waiting for the socket looks at its transfer this often


def _poll(sock: socket.socket, events: int, timeout: Optional[float]) -> bool:
    """Wait until ``sock`` is ready (or hung up) or ``timeout`` passes; holds no lock."""
    poller = select.poll()
    poller.register(sock.fileno(), events | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(None if timeout is None else int(timeout * 1000) + 1))


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


def _send_filler(sock: socket.socket, n: int) -> None:
    """Finish an abandoned frame with ``n`` zero bytes. A peer that takes none of them
    for FILLER_STALL seconds is stalled, not slow: then the connection is given up."""
    while n:
        try:
            n -= sock.send(_ZEROS[:min(n, _ZEROS.nbytes)], socket.MSG_DONTWAIT)
        except BlockingIOError:
            if not _poll(sock, select.POLLOUT, FILLER_STALL):
                raise PeerUnreachable(f"the peer took no byte for {FILLER_STALL} s while an "
                                      "abandoned frame was being finished")


def send_buffers(sock: socket.socket, buffers: Sequence[object],
                 guard: Optional[Guard] = None) -> None:
    """Send every buffer in order.

    With a ``guard``, each ``sendmsg`` is non-blocking and made under ``guard.data_lock``
    while ``guard.active``; waiting for room in the socket happens without the lock.
    If the guard goes inactive, the rest of the frame is sent as zeros (the buffers
    are not read again) and Abandoned says how much of it was real.

    Raises:
        Abandoned: ``guard`` became inactive; ``.sent`` bytes of the frame went out.
    """
    views = [memoryview(b).cast("B") for b in buffers]  # type: ignore[arg-type]
    views = [v for v in views if v.nbytes]
    i = total = 0
    while i < len(views):
        if guard is None:
            sent = sock.sendmsg(views[i:i + IOV_MAX])
        else:
            with guard.data_lock:
                if not guard.active:
                    if total:
                        _send_filler(sock, sum(v.nbytes for v in views[i:]))
                    raise Abandoned(total)
                try:
                    sent = sock.sendmsg(views[i:i + IOV_MAX], (), socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = -1
            if sent < 0:  # wait for room, looking at the guard again every GUARD_POLL
                _poll(sock, select.POLLOUT, GUARD_POLL)
                continue
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

    def recv_payload(self, views: Sequence[memoryview], guard: Optional[Guard] = None) -> bool:
        """Fill ``views`` (total = the frame's payload) in order.

        With a ``guard``, each receive is non-blocking and made under
        ``guard.data_lock`` while ``guard.active`` (waiting for bytes happens without
        the lock); once it is not, the rest of the payload is drained.

        Returns:
            True if every byte was placed.
        """
        if guard is None:
            self._fill(views, None)
            return True
        with guard.data_lock:
            if not guard.active:
                self.drain_payload()
                return False
            pending = self._take_buffered(views)
        if not self._fill(pending, guard):
            self.drain_payload()
            return False
        return True

    def _take_buffered(self, views: Sequence[memoryview]) -> list[memoryview]:
        """Copy what the Connection already holds; returns the views' unfilled parts."""
        pending = []
        for v in views:
            n = self.conn.take_payload_into(v)
            if n < v.nbytes:
                pending.append(v[n:])
        return pending

    def _fill(self, views: Sequence[memoryview], guard: Optional[Guard]) -> bool:
        pending = self._take_buffered(views) if guard is None else list(views)
        i = 0
        while i < len(pending):
            if guard is None:
                got = self.sock.recvmsg_into(pending[i:i + IOV_MAX])[0]
            else:
                with guard.data_lock:
                    if not guard.active:
                        return False
                    try:
                        got = self.sock.recvmsg_into(pending[i:i + IOV_MAX], 0,
                                                     socket.MSG_DONTWAIT)[0]
                    except BlockingIOError:
                        got = -1
                if got < 0:
                    _poll(self.sock, select.POLLIN, GUARD_POLL)
                    continue
            if got == 0:
                raise PeerUnreachable("peer closed the connection in the middle of a payload")
            self.conn.payload_received_elsewhere(got)
            i = _advance(pending, i, got)
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

    def __init__(self, sock: socket.socket, conn: Optional[Connection] = None) -> None:
        """``conn``: the parser, holding what came after the handshake (serving side)."""
        self.sock = sock
        self.reader = FrameReader(sock, conn if conn is not None else Connection())

    def send(self, buffers: Sequence[object], guard: Optional[Guard] = None) -> None:
        send_buffers(self.sock, buffers, guard)

    def next_event(self) -> Event:
        return self.reader.next_event()

    def recv_payload(self, buffers: Sequence[object], guard: Optional[Guard] = None) -> bool:
        return self.reader.recv_payload(buffers, guard)  # type: ignore[arg-type]

    def drain_payload(self) -> None:
        self.reader.drain_payload()

    def set_timeout(self, seconds: float | None) -> None:
        self.sock.settimeout(seconds)

    def shutdown(self) -> None:
        shutdown_socket(self.sock)

    def close(self) -> None:
        self.sock.close()

"""Blocking scatter-gather socket I/O for frames whose payload is many buffers.

``send_buffers`` hands a list of buffers to ``sendmsg`` (at most IOV_MAX per call) and
resumes after partial sends; ``recv_payload`` fills a list of memoryviews with
``recvmsg_into``, after first draining what the protocol Connection already buffered.
No payload byte is copied in Python except that buffered remainder (<= one read).
"""

from __future__ import annotations

import os
import socket
from typing import Sequence

from ..errors import PeerUnreachable
from ..protocol import NEED_DATA, Connection, Event

try:
    IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
except (ValueError, OSError, AttributeError):
    IOV_MAX = 512
READ_SIZE = 64 << 10


def send_buffers(sock: socket.socket, buffers: Sequence[object]) -> None:
    views = [memoryview(b).cast("B") for b in buffers]  # type: ignore[arg-type]
    views = [v for v in views if v.nbytes]
    i = 0
    while i < len(views):
        sent = sock.sendmsg(views[i:i + IOV_MAX])
        while sent:
            v = views[i]
            if sent >= v.nbytes:
                sent -= v.nbytes
                i += 1
            else:
                views[i] = v[sent:]
                sent = 0


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
            while got:
                v = pending[i]
                if got >= v.nbytes:
                    got -= v.nbytes
                    i += 1
                else:
                    pending[i] = v[got:]
                    got = 0

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

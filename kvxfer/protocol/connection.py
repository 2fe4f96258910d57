"""Sans-I/O connection: bytes in, frames out; frames in, buffers out.

Theory of operation
-------------------
A :class:`Connection` owns no socket. The transport feeds it whatever bytes arrived
(``receive_data``) and pulls events (``next_event``) until it gets ``NEED_DATA``::

    bytes --receive_data--> [ buffer ] --next_event--> Frame
                                                   \\-> PayloadData ... (last=True)
                                                   \\-> NEED_DATA | CLOSED

A frame with a payload (WRITE, DATA) is returned as soon as its header and body are
in; its payload then follows. A transport that wants the payload in place (straight
into KV blocks) takes what is already buffered with ``take_payload`` and reads the rest
itself, reporting it with ``payload_received_elsewhere``; a simple caller just keeps
calling ``next_event`` and gets ``PayloadData`` pieces. Either way the byte stream may be
split anywhere.

Sending is ``send(frame, payload)``: it returns ``[header+body, *payload]`` with the
caller's payload buffers untouched, ready for ``sendmsg`` or a UCX/RDMA post.

Errors in the peer's bytes raise :class:`RemoteProtocolError`; misuse by our caller
raises :class:`LocalProtocolError`. After either, the connection refuses every call.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Sequence, Union

from ..errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from . import frames as F


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")
CLOSED = _Sentinel("CLOSED")  # the peer ended the stream at a frame boundary


@dataclass(frozen=True, slots=True)
class PayloadData:
    data: bytes
    last: bool  # True on the piece that completes the frame's payload


Event = Union[F.Frame, PayloadData, _Sentinel]

DEFAULT_MAX_BODY = 4 << 20  # 4 MiB: half a million runs
DEFAULT_MAX_PAYLOAD = F.MAX_PAYLOAD  # per chunk; real chunks are a few MiB


def _nbytes(buf: object) -> int:
    return memoryview(buf).nbytes  # type: ignore[arg-type]


class Connection:
    """One direction-agnostic kvxfer protocol endpoint.

    Args:
        max_body: largest body accepted from the peer.
        max_payload: largest payload accepted from the peer in one frame.
        expect_hello: the peer's first frame must be HELLO, and only the first.
    """

    def __init__(self, *, max_body: int = DEFAULT_MAX_BODY,
                 max_payload: int = DEFAULT_MAX_PAYLOAD, expect_hello: bool = True) -> None:
        self.max_body = max_body
        self.max_payload = max_payload
        self._buf = bytearray()
        self._pos = 0  # read position in _buf
        self._header: F.Header | None = None  # parsed header awaiting its body
        self._payload_left = 0  # payload bytes of the current frame not yet consumed
        self._eof = False
        self._error: ProtocolError | None = None
        self._need_hello = expect_hello
        self._frames_in = 0

    # ------------------------------------------------------------------ state
    @property
    def failed(self) -> bool:
        return self._error is not None

    @property
    def payload_remaining(self) -> int:
        """Payload bytes of the current frame the caller has not consumed yet."""
        return self._payload_left

    def _check(self) -> None:
        if self._error is not None:
            raise LocalProtocolError(f"connection already failed: {self._error}") from self._error

    def fail(self, error: ProtocolError) -> ProtocolError:
        """Mark the connection failed; returns the error for raising."""
        if self._error is None:
            self._error = error
        return error

    # ---------------------------------------------------------------- sending
    def send(self, frame: F.Frame, payload: Sequence[object] = ()) -> list[object]:
        """Encode a frame; returns ``[header+body, *payload]`` (payload not copied).

        Raises:
            LocalProtocolError: payload size differs from the frame's ``payload_len``,
                or the frame cannot be encoded.
        """
        self._check()
        try:
            ftype, flags, body, payload_len = F.encode_body(frame)
        except (TypeError, ValueError, OverflowError, struct.error) as exc:
            raise LocalProtocolError(f"cannot encode {type(frame).__name__}: {exc}") from exc
        given = sum(_nbytes(b) for b in payload)
        if given != payload_len:
            raise LocalProtocolError(f"{type(frame).__name__} says payload_len={payload_len} "
                                     f"but {given} payload bytes were given")
        if len(body) > 0xFFFFFFFF:
            raise LocalProtocolError(f"frame body of {len(body)} bytes is too large")
        head = F.HEADER.pack(F.MAGIC, F.VERSION, ftype, flags, len(body), payload_len)
        return [head + body, *payload]

    def encode(self, frame: F.Frame) -> bytes:
        """Header and body of a frame without payload, as one bytes object."""
        return b"".join(self.send(frame))  # type: ignore[arg-type]

    # -------------------------------------------------------------- receiving
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the transport; ``b""`` means the peer closed its side."""
        self._check()
        if not data:
            self._eof = True
            return
        if self._pos > 65536 and self._pos * 2 > len(self._buf):
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    def _buffered(self) -> int:
        return len(self._buf) - self._pos

    def next_event(self) -> Event:
        """The next frame, payload piece, NEED_DATA or CLOSED.

        Raises:
            RemoteProtocolError: the peer's bytes are not a valid frame (the connection
                is then failed).
        """
        self._check()
        try:
            return self._next()
        except RemoteProtocolError as exc:
            raise self.fail(exc)

    def _next(self) -> Event:
        if self._payload_left:
            n = min(self._payload_left, self._buffered())
            if n == 0:
                return self._need_or_truncated()
            return PayloadData(self.take_payload(n), last=self._payload_left == 0)
        if self._header is None:
            if self._buffered() < F.HEADER_SIZE:
                return self._need_or_truncated(allow_eof=self._buffered() == 0)
            h = F.parse_header(memoryview(self._buf)[self._pos:self._pos + F.HEADER_SIZE])
            if h.body_len > self.max_body:
                raise RemoteProtocolError(f"frame body of {h.body_len} bytes exceeds the "
                                          f"limit of {self.max_body}")
            if h.payload_len > self.max_payload:
                raise RemoteProtocolError(f"payload of {h.payload_len} bytes exceeds the "
                                          f"limit of {self.max_payload}")
            self._pos += F.HEADER_SIZE
            self._header = h
        h = self._header
        if self._buffered() < h.body_len:
            return self._need_or_truncated()
        with memoryview(self._buf) as view:
            body = view[self._pos:self._pos + h.body_len]
            try:
                frame = F.decode_body(h, body)
            finally:
                body.release()
        self._pos += h.body_len
        self._header = None
        is_hello = isinstance(frame, F.Hello)
        if self._need_hello and self._frames_in == 0 and not is_hello:
            if not isinstance(frame, (F.Error, F.Close)):
                raise RemoteProtocolError(f"expected HELLO first, got {type(frame).__name__}")
        elif is_hello and self._frames_in > 0:
            raise RemoteProtocolError("HELLO sent twice on one connection")
        self._frames_in += 1
        self._payload_left = h.payload_len
        return frame

    def _need_or_truncated(self, allow_eof: bool = False) -> _Sentinel:
        if not self._eof:
            return NEED_DATA
        if allow_eof:
            return CLOSED
        raise RemoteProtocolError("stream ended inside a frame (truncated)")

    def take_payload(self, n: int) -> bytes:
        """Up to ``n`` already-buffered bytes of the current payload (may be fewer)."""
        self._check()
        n = min(n, self._payload_left, self._buffered())
        out = bytes(self._buf[self._pos:self._pos + n])
        self._pos += n
        self._payload_left -= n
        return out

    def take_payload_into(self, dest: memoryview) -> int:
        """Copy already-buffered payload bytes into ``dest``; returns how many."""
        self._check()
        n = min(len(dest), self._payload_left, self._buffered())
        if n:
            dest[:n] = memoryview(self._buf)[self._pos:self._pos + n]
            self._pos += n
            self._payload_left -= n
        return n

    def payload_received_elsewhere(self, n: int) -> None:
        """The transport read ``n`` payload bytes itself, bypassing the buffer."""
        self._check()
        if self._buffered():
            raise LocalProtocolError("payload must be taken from the buffer before the socket")
        if not 0 <= n <= self._payload_left:
            raise LocalProtocolError(f"{n} payload bytes reported, {self._payload_left} expected")
        self._payload_left -= n

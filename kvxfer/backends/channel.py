"""What a two-sided backend's transport supplies: an ordered, reliable frame channel.

A :class:`Channel` carries kvxfer frames to one peer (a TCP socket, a UCX endpoint).
Payloads may be read straight from or written straight into engine memory, so every
transport call that touches a transfer's blocks runs under that transfer's ``Guard``:

- the call holds ``guard.data_lock`` and runs only while ``guard.active``;
- it never blocks while holding the lock (it waits for the transport without it), so a
  cancel or a deadline waits for one short call at most, however slow the link;
- a frame whose transfer stops being active half-way is still finished, with filler
  bytes instead of engine memory (send) or by discarding the rest (receive), so the
  stream stays in step and the connection goes on serving every other transfer.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Optional, Protocol, Sequence

from ..protocol import Event


class Guard(Protocol):
    """What a channel needs of a transfer to stop touching engine memory (a TransferHandle)."""

    data_lock: threading.Lock

    @property
    def active(self) -> bool: ...


class Abandoned(Exception):
    """A guarded send found its transfer no longer active.

    Attributes:
        sent: bytes of the frame sent before that. 0: nothing went out and the frame
            is simply skipped. More: the rest of the frame went out as filler, so the
            peer will answer it (and the answer is to be ignored).
    """

    def __init__(self, sent: int) -> None:
        super().__init__(f"transfer abandoned after {sent} bytes of its frame were sent")
        self.sent = sent


class Channel(ABC):
    """An ordered, reliable stream of kvxfer frames to one peer (one transport connection).

    Failures of the transport raise ``OSError`` or :class:`PeerUnreachable`; a peer's
    malformed bytes raise :class:`RemoteProtocolError`.
    """

    @abstractmethod
    def send(self, buffers: Sequence[object], guard: Optional[Guard] = None) -> None:
        """Send ``[header+body, *payload]`` as returned by ``Connection.send``.

        With a ``guard``, every transport call that reads the payload runs under
        ``guard.data_lock`` and only while ``guard.active``.

        Raises:
            Abandoned: the guard went inactive (see its ``sent``).
        """

    @abstractmethod
    def next_event(self) -> Event:
        """The next frame from the peer (or CLOSED at a clean end of stream)."""

    @abstractmethod
    def recv_payload(self, buffers: Sequence[object], guard: Optional[Guard] = None) -> bool:
        """Fill ``buffers`` (together the current frame's payload) in order.

        With a ``guard``, each transport call writing into the buffers runs under
        ``guard.data_lock`` and only while ``guard.active``; once it is not, the rest
        of the payload is read and discarded.

        Returns:
            True if every byte was placed (always, without a guard).
        """

    @abstractmethod
    def drain_payload(self) -> None:
        """Read and discard the rest of the current frame's payload."""

    def established(self) -> None:
        """Called once the HELLO exchange succeeded, on both sides, before any request:
        a transport may finish its set-up with the peer here (nccl forms its process
        groups). Raising OSError or PeerUnreachable refuses the connection."""

    @abstractmethod
    def set_timeout(self, seconds: Optional[float]) -> None:
        """Bound every later blocking call (None: no bound)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Wake every thread blocked on this channel; later calls fail. Idempotent."""

    @abstractmethod
    def close(self) -> None:
        """Release the transport's resources (after ``shutdown``). Idempotent."""

"""ChunkQueue: which part of which transfer a backend moves next, to one peer.

Theory of operation
-------------------
Every backend keeps, per peer connection, the transfers submitted to it and the parts
it has posted but not yet seen answered. The rule for what goes next is the same for
all of them, so it lives here once::

    demand:    A[a0 a1 a2]  C[c0 L0 c1 L1 F]      round-robin over transfers, demand
    prefetch:  B[b0 b1 b2 b3]                      first; at most ``max_inflight``
    posted:    a0 c0 L0 a1 ... (then b0 b1 ...)    posted, demand and prefetch together

- Parts are a transfer's chunks (:class:`~kvxfer.plan.Chunk`) and its messages
  (:class:`~kvxfer.plan.Message`: a write's notify, a stream's "layer landed" and
  "finished" notes). Both carry ``index``, their number on the wire.
- A small transfer waits for at most ``max_inflight`` parts of a large one, never for
  the whole of it; a demand transfer waits for no queued prefetch part at all, only for
  the prefetch parts already posted, and prefetches together hold at most
  ``max_prefetch_inflight`` slots (a quarter, at least one): a demand read arriving
  while a long prefetch streams waits behind one of its chunks, not four. A prefetch
  promoted to demand (a demand read joined it) moves over at the next look.
- Within a transfer the first part that is ready goes: a stream's layers in whatever
  order the engine signals them. A part that is not ready is passed over, not waited
  for, so no thread blocks on it: the handle says whether it waits for a signal (the
  engine calls ``layer_ready``, which wakes the backend through ``handle.kick``) or
  for a CUDA event (``waiting`` is set: the backend looks again shortly).
- A message goes only after the chunks it announces: once every chunk of its layer
  (or of the whole transfer) is posted when the transport keeps order (a two-sided
  connection: the peer takes frames in order), or once they are all finished when it
  does not (one-sided NIXL: a notification may overtake the data).
- A transfer that is no longer active (failed, cancelled, past its deadline) posts
  nothing more; its entries are dropped when they come up.
- Posted parts are keyed by (request id, part index); ``finish`` frees the slot.

A ChunkQueue does no locking: its owner (a connection's condition, a poll thread's
lock) guards it.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Iterator, Optional, Sequence, Union

from .handle import DEMAND, POLL, READY, TransferHandle
from .plan import Chunk, Message

Part = Union[Chunk, Message]
ALL = None  # Counter key: every chunk of the transfer


class _Entry:
    """One queued transfer: its parts not yet posted, and what gates its messages."""

    __slots__ = ("handle", "parts", "unposted", "unfinished")

    def __init__(self, handle: TransferHandle, parts: Sequence[Part]) -> None:
        self.handle = handle
        self.parts = list(parts)
        self.unposted: Counter = Counter()  # layer (or ALL) -> chunks not yet posted
        for part in parts:
            if isinstance(part, Chunk):
                self.unposted.update(part.layers)
                self.unposted[ALL] += 1
        self.unfinished = Counter(self.unposted)  # -> chunks not yet finished

    def gated(self, message: Message, after_finish: bool) -> bool:
        """Some chunk that ``message`` announces has not gone (or not finished) yet."""
        counts = self.unfinished if after_finish else self.unposted
        return counts[ALL if message.layer is None else message.layer] > 0

    def count(self, counts: Counter, chunk: Chunk) -> None:
        counts.subtract(chunk.layers)
        counts[ALL] -= 1


class ChunkQueue:
    """Demand before prefetch, round-robin within each, a cap on posted parts.

    Args:
        max_inflight: at most this many parts posted and not yet finished.
        messages_after_finish: a message waits until the chunks it announces have
            *finished*, not merely been posted (for transports that do not keep order).
    """

    def __init__(self, max_inflight: int, messages_after_finish: bool = False) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, got {max_inflight}")
        self.max_inflight = max_inflight
        self.max_prefetch_inflight = max(1, max_inflight // 4)
        self._prefetch_posted: set[tuple[int, int]] = set()  # posted parts of prefetches
        self.messages_after_finish = messages_after_finish
        self._demand: deque[_Entry] = deque()
        self._prefetch: deque[_Entry] = deque()
        self._entries: dict[int, _Entry] = {}  # request id -> its entry, until finished
        self._posted: dict[tuple[int, int], tuple[TransferHandle, Part]] = {}
        self.waiting = False  # the last next() passed over parts waiting for a CUDA event

    def push(self, handle: TransferHandle, parts: Sequence[Part]) -> None:
        """Queue a transfer's parts (chunks, then messages)."""
        if not parts:
            return
        entry = _Entry(handle, parts)
        self._entries[handle.request_id] = entry
        (self._demand if handle.priority == DEMAND else self._prefetch).append(entry)

    def next(self) -> Optional[tuple[TransferHandle, Part]]:
        """The next part to post, or None when nothing may go now.

        Returns:
            (handle, part); the part counts as posted. None with ``waiting`` set: only
            parts waiting for a CUDA event could go; ask again shortly.
        """
        self.waiting = False
        self._promote()
        for queue in (self._demand, self._prefetch):
            for _ in range(len(queue)):
                if len(self._posted) >= self.max_inflight:
                    return None
                if queue is self._prefetch and \
                        len(self._prefetch_posted) >= self.max_prefetch_inflight:
                    return None
                entry = queue.popleft()
                handle = entry.handle
                if not handle.active:
                    self._entries.pop(handle.request_id, None)
                    continue
                part = self._take(entry)
                if entry.parts:
                    queue.append(entry)
                if part is not None:
                    key = (handle.request_id, part.index)
                    self._posted[key] = (handle, part)
                    if queue is self._prefetch:
                        self._prefetch_posted.add(key)
                    return handle, part
        return None

    def _promote(self) -> None:
        """Prefetches promoted to demand (a demand read joined them) move over."""
        if any(e.handle.priority == DEMAND for e in self._prefetch):
            moved = [e for e in self._prefetch if e.handle.priority == DEMAND]
            self._prefetch = deque(e for e in self._prefetch if e.handle.priority != DEMAND)
            self._demand.extend(moved)

    def _take(self, entry: _Entry) -> Optional[Part]:
        """Remove and return the entry's first part that may go now (its urgent chunks,
        those a joining demand read waits for, first)."""
        urgent = entry.handle.urgent
        order = enumerate(entry.parts)
        if urgent:
            order = sorted(order, key=lambda ip: ip[1].index not in urgent)  # type: ignore
        for i, part in order:
            if isinstance(part, Message) and entry.gated(part, self.messages_after_finish):
                continue
            readiness = entry.handle.readiness(part)
            if readiness == READY:
                del entry.parts[i]
                if isinstance(part, Chunk):
                    entry.count(entry.unposted, part)
                return part
            if readiness == POLL:
                self.waiting = True
        return None

    def finish(self, request_id: int, index: int) -> Optional[tuple[TransferHandle, Part]]:
        """Free a posted part's slot; returns it, or None if it was not posted."""
        posted = self._posted.pop((request_id, index), None)
        self._prefetch_posted.discard((request_id, index))
        if posted is not None and isinstance(posted[1], Chunk):
            entry = self._entries.get(request_id)
            if entry is not None:
                entry.count(entry.unfinished, posted[1])
        entry = self._entries.get(request_id)
        if entry is not None and not entry.parts and not any(
                k[0] == request_id for k in self._posted):
            del self._entries[request_id]
        return posted

    def posted(self, request_id: int, index: int) -> Optional[tuple[TransferHandle, Part]]:
        """A posted part, left posted."""
        return self._posted.get((request_id, index))

    def handles(self) -> list[TransferHandle]:
        """Every transfer with a part queued or posted (each once)."""
        seen = {id(h): h for h, _ in self._posted.values()}
        seen.update((id(e.handle), e.handle) for e in (*self._demand, *self._prefetch))
        return list(seen.values())

    def clear(self) -> list[TransferHandle]:
        """Forget everything; returns the transfers that were queued or posted."""
        handles = self.handles()
        self._demand.clear()
        self._prefetch.clear()
        self._entries.clear()
        self._posted.clear()
        self._prefetch_posted.clear()
        return handles

    def __iter__(self) -> Iterator[tuple[TransferHandle, Part]]:
        """Posted parts, oldest first."""
        return iter(list(self._posted.values()))

    @property
    def busy(self) -> bool:
        """Something is queued or posted."""
        return bool(self._demand or self._prefetch or self._posted)

    @property
    def has_room(self) -> bool:
        return len(self._posted) < self.max_inflight

    def __len__(self) -> int:
        """Parts posted and not finished."""
        return len(self._posted)

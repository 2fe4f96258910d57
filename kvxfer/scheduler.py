"""ChunkQueue: which chunk of which transfer a backend moves next, to one peer.

Theory of operation
-------------------
Every backend keeps, per peer connection, the transfers submitted to it and the chunks
it has posted but not yet seen answered. The rule for what goes next is the same for
all of them, so it lives here once::

    submitted:  A[a0 a1 a2 a3]  B[b0]  C[c0 c1]        round-robin over transfers,
    posted:     a0 b0 c0 a1 c1 a2 a3                    at most ``max_inflight`` posted

- A small transfer waits for at most ``max_inflight`` chunks of a large one, never for
  the whole of it.
- A transfer that is no longer active (failed, cancelled, past its deadline) posts
  nothing more; its entries are dropped when they come up.
- A write whose source is not ready (the engine's CUDA event for it has not completed)
  is passed over, not waited for: the others go first, and no thread blocks on it.
- Posted chunks are keyed by (request id, chunk index); ``finish`` frees the slot.

A ChunkQueue does no locking: its owner (a connection's condition, a poll thread's
lock) guards it. Items are opaque to it: a backend queues the plan's chunks and, where
it needs one, a trailing item of its own (a write's notify message, say).
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Generic, Iterator, Optional, Sequence, TypeVar

from .handle import TransferHandle

Item = TypeVar("Item")


class ChunkQueue(Generic[Item]):
    """Round-robin over submitted transfers with a cap on posted chunks.

    Args:
        max_inflight: at most this many items posted and not yet finished.
    """

    def __init__(self, max_inflight: int) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, got {max_inflight}")
        self.max_inflight = max_inflight
        self._queue: deque[list] = deque()  # [handle, items, next index]
        self._posted: dict[tuple[int, int], tuple[TransferHandle, Item]] = {}
        self.waiting = False  # the last next() passed over transfers not yet ready

    def push(self, handle: TransferHandle, items: Sequence[Item]) -> None:
        """Queue a transfer's items, in the order they must be posted."""
        if items:
            self._queue.append([handle, list(items), 0])

    def next(self, key: Callable[[Item], int]) -> Optional[tuple[TransferHandle, Item, bool]]:
        """The next item to post, or None when nothing may go now.

        Args:
            key: the item's chunk index on the wire (unique within its transfer).

        Returns:
            (handle, item, is the transfer's last item); the item counts as posted.
            None with ``waiting`` set: only transfers whose source is not ready yet
            (a CUDA event not yet complete) could go; ask again shortly.
        """
        self.waiting = False
        skipped = 0
        while self._queue and len(self._posted) < self.max_inflight \
                and skipped < len(self._queue):
            entry = self._queue.popleft()
            handle, items, i = entry
            if not handle.active:
                continue
            if not handle.source_ready():  # a write whose engine event has not fired
                self._queue.append(entry)
                skipped += 1
                self.waiting = True
                continue
            entry[2] = i + 1
            last = i + 1 == len(items)
            if not last:
                self._queue.append(entry)
            self._posted[(handle.request_id, key(items[i]))] = (handle, items[i])
            return handle, items[i], last
        return None

    def finish(self, request_id: int, chunk: int) -> Optional[tuple[TransferHandle, Item]]:
        """Free a posted item's slot; returns it, or None if it was not posted."""
        return self._posted.pop((request_id, chunk), None)

    def posted(self, request_id: int, chunk: int) -> Optional[tuple[TransferHandle, Item]]:
        """A posted item, left posted."""
        return self._posted.get((request_id, chunk))

    def handles(self) -> list[TransferHandle]:
        """Every transfer with an item queued or posted (each once)."""
        seen = {id(h): h for h, _ in self._posted.values()}
        seen.update((id(e[0]), e[0]) for e in self._queue)
        return list(seen.values())

    def clear(self) -> list[TransferHandle]:
        """Forget everything; returns the transfers that were queued or posted."""
        handles = self.handles()
        self._queue.clear()
        self._posted.clear()
        return handles

    def __iter__(self) -> Iterator[tuple[TransferHandle, Item]]:
        """Posted items, oldest first."""
        return iter(list(self._posted.values()))

    @property
    def busy(self) -> bool:
        """Something is queued or posted."""
        return bool(self._queue or self._posted)

    @property
    def has_room(self) -> bool:
        return len(self._posted) < self.max_inflight

    def __len__(self) -> int:
        """Items posted and not finished."""
        return len(self._posted)

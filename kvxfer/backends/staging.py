"""Staging: reusable contiguous buffers that packed chunks pass through, within a budget.

Chunks are packed into a staging buffer before a send and unpacked from one after a
receive when the KV cache is on a GPU, when a transport moves one buffer per frame
(UCX), or when a chunk's blocks are too scattered for scatter-gather I/O to pay. Each
connection role (a client's sends, its receives, a server) keeps one buffer, grown to
the largest chunk it carried, never past the protocol's chunk limit.

All buffers of a backend share one :class:`StagingBudget` (``transfer_buffer_bytes``),
pinned memory when the KV cache is on a GPU::

    held = buffers in use + idle cached ones        <= limit (see below)
    a buffer must grow:  evict other roles' idle cached buffers first; then
        a send waits until a buffer is given back (it holds nothing while it waits);
        a receive never waits (its header is read: its peer is already sending, and
        waiting could close a cycle of peers that all wait on each other), so held may
        pass the limit by the receives in progress, each one chunk.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from ..memory import RegisteredMemory
from ..plan import MAX_CHUNK_BYTES


class StagingBudget:
    """The bytes a backend's staging buffers may hold together.

    Args:
        limit: bytes; None for no limit.
    """

    def __init__(self, limit: Optional[int] = None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"transfer_buffer_bytes must be positive, got {limit}")
        self.limit = limit
        self.cond = threading.Condition()
        self.held = 0  # bytes of every buffer, in use or cached (under cond)
        self.peak = 0  # the most ``held`` has been
        self.waits = 0  # sends that had to wait for a buffer
        self._members: weakref.WeakSet[Staging] = weakref.WeakSet()

    def join(self, staging: "Staging") -> None:
        with self.cond:
            self._members.add(staging)

    def _evict_idle(self, need: int, keep: "Staging") -> None:
        """Free idle cached buffers of other roles until ``need`` more bytes fit."""
        for member in list(self._members):
            if self.limit is None or self.held + need <= self.limit:
                return
            if member is not keep and not member.in_use and member.tensor is not None:
                self.held -= member.tensor.numel()
                member.tensor = None

    def grow(self, staging: "Staging", old: int, new: int, wait: bool) -> None:
        """Account for ``staging``'s buffer going from ``old`` to ``new`` bytes. Caller
        holds ``cond``."""
        self.held -= old
        while self.limit is not None and self.held + new > self.limit:
            self._evict_idle(new, staging)
            if self.held + new <= self.limit or not wait or self.held == 0:
                break  # fits; or a receive (never waits); or one chunk above the limit
            self.waits += 1
            self.cond.wait()
        self.held += new
        self.peak = max(self.peak, self.held)

    def freed(self, nbytes: int) -> None:
        """A buffer went (released, or given back to be reused). Caller holds ``cond``."""
        self.held -= nbytes
        self.cond.notify_all()


class Staging:
    """One role's reusable contiguous buffer for packed chunks, grown on demand.

    Args:
        memory: the registered memory whose chunks are packed.
        device: where the buffer lives; None for the memory's host staging buffer
            (pinned when the KV cache is on a GPU).
        budget: the backend's budget (a private unlimited one if None).
    """

    def __init__(self, memory: RegisteredMemory, device: Optional[torch.device] = None,
                 budget: Optional[StagingBudget] = None) -> None:
        self.memory = memory
        self.device = device
        self.budget = budget or StagingBudget()
        self.tensor: Optional[torch.Tensor] = None  # under budget.cond
        self.in_use = False  # under budget.cond
        self._released = False  # release() came while in use: free it once done
        self.budget.join(self)

    @contextmanager
    def use(self, nbytes: int, wait: bool = True) -> Iterator[tuple[torch.Tensor, object]]:
        """(tensor, buffer for the transport) of at least ``nbytes``, for the block.

        Args:
            wait: a send (True) waits for room in the budget; a receive (False) never does.
        """
        if nbytes > MAX_CHUNK_BYTES:
            raise ValueError(f"a chunk of {nbytes} bytes exceeds the limit {MAX_CHUNK_BYTES}")
        budget = self.budget
        with budget.cond:
            self.in_use = True
            if self.tensor is None or self.tensor.numel() < nbytes:
                old = 0 if self.tensor is None else self.tensor.numel()
                self.tensor = None  # free the old buffer before taking a larger one
                budget.grow(self, old, nbytes, wait)
                grown = True
            else:
                grown = False
        try:
            if grown:
                try:
                    self.tensor = (self.memory.staging_buffer(nbytes) if self.device is None
                                   else torch.empty(nbytes, dtype=torch.uint8,
                                                    device=self.device))
                except BaseException:
                    with budget.cond:
                        budget.freed(nbytes)
                    raise
            tensor = self.tensor
            assert tensor is not None
            if tensor.device.type == "cpu":
                yield tensor, memoryview(tensor.numpy()).cast("B")[:nbytes]
            else:
                yield tensor, tensor[:nbytes]
        finally:
            with budget.cond:
                self.in_use = False
                over = budget.limit is not None and budget.held > budget.limit
                if (over or self._released) and self.tensor is not None:
                    budget.freed(self.tensor.numel())  # over the limit: give it back
                    self.tensor = None
                else:
                    budget.cond.notify_all()  # an idle buffer may now be evicted

    def release(self) -> None:
        """Free the buffer (pinned memory goes back at once); ``use`` makes a new one."""
        with self.budget.cond:
            if self.in_use:
                self._released = True
            elif self.tensor is not None:
                self.budget.freed(self.tensor.numel())
                self.tensor = None

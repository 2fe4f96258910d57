"""TransferGate: an agent-wide cap on transfers in flight; the rest wait their turn.

Theory of operation
-------------------
Every transfer holds memory while it runs: its handle and plan, a slot in its
connection's queue, staging buffers while its chunks move. Under load (a decode worker
prefetching for a thousand requests) that must stay bounded, and a submission must
never fail or be dropped for load. So the Agent passes every handle through a gate::

    submit(handle) -> gate.admit -- fewer than max_inflight running --> backend.submit
                                 \\- else: queued (demand before prefetch, FIFO within)
    handle done (any way) -> its slot frees -> the oldest queued demand (else prefetch)
                                               that is still pending goes to the backend

- A queued handle is an ordinary pending handle: it can be waited on, cancelled (it then
  never reaches the backend) and it fails at its deadline like any other.
- ``queued`` and ``running`` tell the engine the depth of the queue.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from .handle import DEMAND, TransferHandle

Submit = Callable[[TransferHandle], None]


class TransferGate:
    """Admits at most ``max_inflight`` transfers at once; see the module docstring.

    Args:
        max_inflight: transfers running (submitted to the backend, not yet done).
    """

    def __init__(self, max_inflight: int) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight_transfers must be at least 1, got {max_inflight}")
        self.max_inflight = max_inflight
        self._lock = threading.Lock()
        self._running = 0
        self._local = threading.local()  # draining: this thread is in _drain
        self._demand: deque[tuple[TransferHandle, Submit]] = deque()
        self._prefetch: deque[tuple[TransferHandle, Submit]] = deque()

    @property
    def running(self) -> int:
        """Transfers handed to the backend and not yet done."""
        return self._running

    @property
    def queued(self) -> int:
        """Transfers waiting for a slot (some may have been cancelled meanwhile)."""
        with self._lock:
            return sum(h.active for h, _ in (*self._demand, *self._prefetch))

    def admit(self, handle: TransferHandle, submit: Submit) -> None:
        """Run ``submit(handle)`` now if a slot is free, else once one frees."""
        with self._lock:
            queue = self._demand if handle.priority == DEMAND else self._prefetch
            queue.append((handle, submit))
        self._drain()

    def _release(self, _: TransferHandle) -> None:
        with self._lock:
            self._running -= 1
        self._drain()

    def _drain(self) -> None:
        """Start queued transfers while slots are free. A transfer that finishes inside
        its own submit (a dead peer) releases its slot re-entrantly: that call returns
        at once and this loop goes on, so a long queue never recurses."""
        if getattr(self._local, "draining", False):
            return
        self._local.draining = True
        try:
            while True:
                with self._lock:
                    if self._running >= self.max_inflight:
                        return
                    nxt = self._pop()
                    if nxt is None:
                        return
                    self._running += 1
                handle, submit = nxt
                handle.add_done_callback(self._release)
                submit(handle)
        finally:
            self._local.draining = False

    def _pop(self) -> tuple[TransferHandle, Submit] | None:
        for queue in (self._demand, self._prefetch):
            while queue:
                handle, submit = queue.popleft()
                if handle.active:
                    return handle, submit
        return None

"""ucxx requests for the UCX backend: blocking waits on them, and letting go of them.

Theory of operation
-------------------
A worker made with ``enable_python_future`` hands every request it completes (on
ucxx's progress thread) to its request notifier. One :class:`Notifier` thread per
worker sleeps in that notifier and, after each round, sets the Event of every channel
thread whose requests have all completed::

    channel thread                 notifier thread               ucxx progress thread
    post(ops) -- budget ------------------------------------------> UCP works
    wait(requests) -- Event.wait   wait_request_notifier  <------- request completed
                   <-- Event.set   run_request_notifier, wake
                                   refill the futures pool

- A wait ends when its requests are done, when its channel goes down (the channel
  calls :meth:`Notifier.wake_channel`), when the notifier stops, or at its deadline;
  the notifier also looks round every ``NOTIFY_PERIOD_NS``, so no wake-up is lost for
  long.
- Every request takes one of ucxx's pre-made futures, made as asyncio futures, which
  needs an event loop on the making thread. The notifier thread has a private one
  (never run; its handler drops the "exception never retrieved" of futures nobody
  awaits) and refills the pool each round; every post takes one of ``FUTURES_BUDGET``
  per refill, so the pool never runs dry and no channel thread ever makes a future.
- A closed endpoint must let go of the requests it cancelled, or it keeps its worker
  alive; ucxx 0.52 does not (see :func:`release_cancelled_requests`).
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import functools
import threading
import time
from typing import Any, Callable, Optional, Sequence

from ..errors import PeerUnreachable
from ..logs import get_logger

log = get_logger("kvxfer.ucx")

NOTIFY_PERIOD_NS = 200_000_000  # the notifier looks round at least this often
# ucxx refills its futures pool to 100 when it is below 50; we post at most this many
# requests between two refills, so the pool never runs dry.
FUTURES_BUDGET = 48

# size_t ucxx::Endpoint::getCancelingSize() const, which ucxx's Python API leaves out.
_CANCELING_SIZE = "_ZNK4ucxx8Endpoint16getCancelingSizeEv"
SETTLE_PERIOD_S = 0.2  # wait at most this long for a closed endpoint's requests to settle


@functools.cache
def _canceling_size() -> Optional[Callable[[int], int]]:
    """libucxx's ``Endpoint::getCancelingSize`` as a function of ``ep.ucxx_ptr``."""
    try:
        import libucxx

        fn = getattr(libucxx.load_library(), _CANCELING_SIZE)
    except (ImportError, OSError, AttributeError) as exc:
        log.warning("libucxx has no %s (%s): every UCX endpoint closed with a receive "
                    "posted will keep its worker alive", _CANCELING_SIZE, exc)
        return None
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_void_p]
    return fn  # a CDLL function: called without the GIL, which ~Future takes itself


def release_cancelled_requests(ep: Any, period_s: float = SETTLE_PERIOD_S) -> int:
    """Drop the closed endpoint ``ep``'s hold on its requests that were cancelled.

    ``Endpoint::closeBlocking`` first cancels the endpoint's requests; a stream receive
    cannot be cancelled, so ucxx moves it to the endpoint's "canceling" set, and the
    forced close then completes it. ucxx only prunes that set (of completed requests)
    when it is counted, which closeBlocking does before the close and nothing does
    after. So the endpoint keeps the request, the request keeps the endpoint, and the
    endpoint keeps the worker: every agent closed while its reader waited for a header
    left its UCX worker behind (11 fds, 4 MiB). Counting the set once more, after the
    close, frees them; a request the close has not completed yet is given ``period_s``.
    (``ep.close()``, the request form, skips the cancelling, but it hands back an empty
    request that crashes when freed whenever the peer's disconnect closed the endpoint
    first.)

    Args:
        ep: a UCXEndpoint this side has closed (``close_blocking``), still referenced.
        period_s: how long to wait for requests the close has not completed yet.

    Returns:
        How many requests the endpoint still holds (0 unless UCX never completed one).
    """
    count = _canceling_size()
    if count is None:
        return 0
    deadline = time.monotonic() + period_s
    while (left := count(ep.ucxx_ptr)) and time.monotonic() < deadline:
        time.sleep(1e-3)
    return left


@dataclasses.dataclass(eq=False)
class _Wait:
    """A channel thread blocked until ``requests`` have all completed."""

    requests: Sequence[Any]
    channel: object  # whose going down ends the wait (compared by identity)
    event: threading.Event = dataclasses.field(default_factory=threading.Event)

    def done(self) -> bool:
        return all(r.completed for r in self.requests)


class Notifier:
    """Wakes the channel threads whose UCX requests completed; one per worker.

    Args:
        worker: a UCXWorker made with ``enable_python_future=True``.
        name: the agent's name, for the thread's name.
        states: ucxx's ``PythonRequestNotifierWaitState`` (passed in, so that only the
            UCX backend module imports ucxx, and does so its own way).
    """

    def __init__(self, worker: Any, name: str, states: Any) -> None:
        self.worker = worker
        self._states = states
        self._cond = threading.Condition()
        self._budget = 0  # posts allowed until the next refill (under _cond)
        self._pending = 0  # posts counted but not yet made (under _cond)
        self._waits: set[_Wait] = set()  # blocked channel threads (under _cond)
        self._stopped = False  # set once, by stop() or the thread's end
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"kvxfer-ucx-notify[{name}]")
        self.thread.start()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(lambda _loop, ctx: log.debug("ucxx future: %s", ctx))
        asyncio.set_event_loop(loop)
        try:
            while not self._stopped:
                self._refill()
                state = self.worker.wait_request_notifier(period_ns=NOTIFY_PERIOD_NS)
                if state == self._states.Shutdown:
                    break
                if state == self._states.Ready:
                    self.worker.run_request_notifier()
                self._wake(_Wait.done)
        except Exception:  # noqa: BLE001 - never die silently: waiters must hear of it
            log.exception("the UCX request notifier failed")
        finally:
            with self._cond:
                self._stopped = True
                self._cond.notify_all()
            self._wake(lambda w: True)
            self._leave_stopped()
            self.worker.clear_python_futures_pool()
            asyncio.set_event_loop(None)
            loop.close()

    def _leave_stopped(self) -> None:
        """Leave ucxx's notifier stopped, or the worker's destructor warns that it runs.

        A wait that finds the notifier stopping sets it running again (and returns
        Shutdown); that happens when stop() comes just before a wait, and a
        notification that came after the last wait leaves it "ready". So: stop,
        let the wait set it running, take what is ready, stop for good."""
        try:
            self.worker.stop_request_notifier_thread()
            self.worker.wait_request_notifier(period_ns=1)
            if self.worker.wait_request_notifier(period_ns=1) == self._states.Ready:
                self.worker.run_request_notifier()
            self.worker.stop_request_notifier_thread()
        except Exception as exc:  # noqa: BLE001 - only a warning at stake
            log.debug("stopping ucxx's request notifier: %s", exc)

    def _refill(self) -> None:
        """Top the pool up; allow as many posts as it surely holds. Posts counted before
        the refill may take their futures after it, so they come off the new budget."""
        with self._cond:
            self._budget, pending = 0, self._pending
        self.worker.populate_python_futures_pool()
        with self._cond:
            self._budget = max(0, FUTURES_BUDGET - pending)
            self._cond.notify_all()

    def _wake(self, which: Callable[[_Wait], bool]) -> None:
        with self._cond:
            waits = list(self._waits)
        for w in waits:
            if which(w):
                w.event.set()

    def wake_channel(self, channel: object) -> None:
        """Wake every thread waiting on ``channel`` (it went down)."""
        self._wake(lambda w: w.channel is channel)

    def post(self, ops: Sequence[Callable[[], Any]]) -> list:
        """Call each op (it posts one ucxx request and returns it) within the budget.

        Raises:
            PeerUnreachable: the notifier stopped before the budget allowed the posts.
        """
        n = len(ops)
        with self._cond:  # never held while calling ucxx: its callbacks take it too
            while self._budget < n:
                if self._stopped:
                    raise PeerUnreachable("the UCX worker is stopping")
                self._cond.wait()
            self._budget -= n
            self._pending += n
        try:
            return [op() for op in ops]
        finally:
            with self._cond:
                self._pending -= n

    def wait(self, requests: Sequence[Any], channel: object,
             why_down: Callable[[], Optional[str]], deadline: Optional[float],
             timeout: Optional[float]) -> None:
        """Block until every request has completed.

        Args:
            requests: ucxx requests posted through :meth:`post`.
            channel: what :meth:`wake_channel` names to end this wait early.
            why_down: returns why ``channel`` went down, or None while it is up.
            deadline: monotonic time to give up at, or None.
            timeout: the seconds ``deadline`` stands for (for the error message).

        Raises:
            PeerUnreachable: ``channel`` went down, the notifier stopped, or
                ``deadline`` passed first.
        """
        w = _Wait(requests, channel)
        with self._cond:
            self._waits.add(w)
        try:
            while not w.done():
                left = None if deadline is None else deadline - time.monotonic()
                down = why_down()
                if down is not None or self._stopped or (left is not None and left <= 0):
                    why = down or ("the UCX worker stopped" if self._stopped else
                                   f"no progress within {timeout} s")
                    raise PeerUnreachable(f"UCX channel is down: {why}")
                w.event.wait(left)
                w.event.clear()
        finally:
            with self._cond:
                self._waits.discard(w)

    def stop(self) -> None:
        """End the thread (waking every waiter); idempotent."""
        self._stopped = True
        self.worker.stop_request_notifier_thread()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=10)

"""TransferHandle: per-layer readiness, deadlines, cancel, callbacks, await."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from kvxfer.errors import RemoteError, TransferFailed, TransferTimeout
from kvxfer.handle import TransferHandle
from kvxfer.plan import Chunk, Message


def handle(deadline: float = 5.0) -> TransferHandle:
    chunks = [Chunk(0, (0, 1), ((0, 0, 2),), 64), Chunk(1, (2,), ((0, 0, 1),), 16),
              Chunk(2, (2,), ((1, 1, 1),), 16)]
    return TransferHandle(1, "peer", "read", (0, 1, 2), chunks, b"", time.monotonic() + deadline)


def test_layers_become_ready_as_their_chunks_land():
    h = handle()
    h.chunk_done(h.chunks[0])
    h.wait_layer(0, timeout=0)
    h.wait_layer(1, timeout=0)
    with pytest.raises(TransferTimeout, match="layer 2"):
        h.wait_layer(2, timeout=0.01)
    h.chunk_done(h.chunks[1])
    assert not h.done()
    h.chunk_done(h.chunks[2])
    assert h.done() and h.status == "done"
    h.wait(0)
    with pytest.raises(ValueError):
        h.wait_layer(3)


def test_failure_reaches_every_waiter_with_its_cause():
    h = handle()
    errors = []

    def waiter():
        try:
            h.wait_layer(2)
        except TransferFailed as exc:
            errors.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    h.fail(RemoteError("no such block", 2))
    t.join(5)
    assert isinstance(errors[0].cause, RemoteError) and errors[0].peer == "peer"
    assert not h.fail(RemoteError("second"))  # first failure wins
    h.chunk_done(h.chunks[0])  # late chunks change nothing
    assert h.status == "failed"


def test_deadline_fails_the_transfer():
    h = handle(deadline=0.05)
    with pytest.raises(TransferTimeout):
        h.wait()
    assert h.status == "failed" and isinstance(h.error, TransferTimeout)


def test_short_wait_does_not_fail_the_transfer():
    h = handle()
    with pytest.raises(TransferTimeout, match="goes on"):
        h.wait(timeout=0.01)
    assert h.status == "pending"


def test_cancel_waits_for_bytes_in_flight():
    h = handle()
    landed = []
    h.data_lock.acquire()  # a backend is placing a chunk

    def cancel():
        landed.append(h.cancel())

    t = threading.Thread(target=cancel)
    t.start()
    time.sleep(0.05)
    assert landed == [] and h.status == "pending"  # cancel waits for the chunk ...
    assert not h.active  # ... and no new backend call may start meanwhile
    h.data_lock.release()
    t.join(5)
    assert landed == [True] and h.status == "cancelled" and not h.active


def test_callbacks_and_await():
    h = handle()
    seen = []
    h.add_done_callback(lambda x: seen.append(x.status))

    async def main():
        threading.Timer(0.02, lambda: [h.chunk_done(c) for c in h.chunks]).start()
        await h

    asyncio.run(main())
    assert seen == ["done"]
    h.add_done_callback(lambda x: seen.append("late"))
    assert seen == ["done", "late"]

    failed = handle()
    failed.fail(RemoteError("x"))

    async def fails():
        await failed

    with pytest.raises(TransferFailed):
        asyncio.run(fails())


def test_nothing_to_do_is_done_at_once():
    h = TransferHandle(1, "p", "read", (), [], b"", time.monotonic() + 1)
    assert h.done() and h.nbytes == 0


def test_failure_aborts_a_stuck_backend_call_before_waking_waiters():
    from kvxfer.errors import PeerUnreachable
    from kvxfer.handle import ABORT_AFTER

    h = handle()
    in_call, unblocked = threading.Event(), threading.Event()
    seen_during_call = []

    def backend_call():  # a receive into engine memory on a dead link
        with h.data_lock:
            in_call.set()
            unblocked.wait(10)
            seen_during_call.append(h.status)  # still the last moment bytes could land

    t = threading.Thread(target=backend_call)
    t.start()
    in_call.wait(5)
    h.abort = unblocked.set  # what a backend's abort does: make the stuck call return
    t0 = time.monotonic()
    assert h.fail(PeerUnreachable("link down"))
    assert ABORT_AFTER <= time.monotonic() - t0 < ABORT_AFTER + 5
    t.join(5)
    assert seen_during_call == ["pending"] and h.status == "failed"
    with pytest.raises(TransferFailed):
        h.wait(0)


def test_the_first_failure_names_the_cause_even_if_it_locks_last():
    from kvxfer.errors import PeerUnreachable

    h = handle()
    h.data_lock.acquire()
    first = threading.Thread(target=h.expire)
    first.start()
    time.sleep(0.05)  # expire() has recorded its cause and waits for the lock
    second = threading.Thread(target=h.fail, args=(PeerUnreachable("reset"),))
    second.start()
    time.sleep(0.05)
    h.data_lock.release()
    first.join(5)
    second.join(5)
    assert isinstance(h.error, TransferTimeout)


def test_a_raising_callback_is_logged_and_changes_nothing(caplog):
    h = handle()
    seen = []
    h.add_done_callback(lambda _: 1 / 0)
    h.add_done_callback(lambda x: seen.append(x.status))
    for c in h.chunks:
        h.chunk_done(c)  # a backend thread: must not see the ZeroDivisionError
    assert h.status == "done" and seen == ["done"]
    assert "ZeroDivisionError" in caplog.text and f"#{h.request_id}" in caplog.text
    h.add_done_callback(lambda _: 1 / 0)  # already done: called at once, still isolated


def test_await_after_the_loop_closed_is_tolerated():
    h = handle()

    async def give_up():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(h, 0.01)

    asyncio.run(give_up())  # the loop is closed now; its wake-up callback stays behind
    for c in h.chunks:
        h.chunk_done(c)  # completes on a closed loop: no "Event loop is closed"
    assert h.status == "done"


def test_fail_waits_for_quiesce_before_waiters_see_it():
    h = handle()
    order = []

    def quiesce(x):
        assert x is h and not x.active and x.status == "pending"
        order.append("quiesced")

    h.quiesce = quiesce
    h.add_done_callback(lambda x: order.append(x.status))
    assert h.cancel()
    assert order == ["quiesced", "cancelled"]


def test_no_chunk_counts_once_a_failure_began():
    h = handle()
    h.data_lock.acquire()
    t = threading.Thread(target=h.cancel)
    t.start()
    time.sleep(0.05)
    for c in h.chunks:
        h.chunk_done(c)  # a half-drained chunk must not complete the transfer
    h.data_lock.release()
    t.join(5)
    assert h.status == "cancelled"


def test_a_notify_message_is_awaited_after_the_chunks():
    chunks = handle().chunks
    h = TransferHandle(1, "peer", "write", (0, 1, 2), chunks, b"hi", time.monotonic() + 5,
                       messages=[Message(3, None, b"\x00hi")])
    for c in h.chunks:
        h.chunk_done(c)
    assert h.status == "pending"
    h.message_done()
    assert h.status == "done"


def test_an_unknown_priority_is_refused():
    with pytest.raises(ValueError, match="priority"):
        TransferHandle(1, "peer", "read", (0,), [], b"", time.monotonic() + 5, priority="urgent")


def test_promoting_a_prefetch_wakes_its_backend_once():
    h = TransferHandle(1, "peer", "read", (0, 1, 2), handle().chunks, b"",
                       time.monotonic() + 5, priority="prefetch")
    kicks = []
    h.kick = lambda: kicks.append(1)
    h.promote()
    h.promote()
    assert h.priority == "demand" and kicks == [1]

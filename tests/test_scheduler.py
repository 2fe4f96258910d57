"""ChunkQueue: demand before prefetch, readiness gating, message ordering, slots."""

from __future__ import annotations

import time

from kvxfer.handle import TransferHandle
from kvxfer.plan import Chunk, Message
from kvxfer.scheduler import ChunkQueue
from kvxfer.streams import StreamHandle, stream_messages


def chunks(n: int, layer_of=lambda i: (0,)) -> list[Chunk]:
    return [Chunk(i, tuple(layer_of(i)), ((i, i, 1),), 16) for i in range(n)]


def read(rid: int, n: int, priority: str = "demand") -> TransferHandle:
    return TransferHandle(rid, "p", "read", (0,), chunks(n), b"", time.monotonic() + 60,
                          priority=priority)


def drain(q: ChunkQueue) -> list[tuple[int, int]]:
    """Post and finish everything that may go now, in order."""
    out = []
    while (nxt := q.next()) is not None:
        h, part = nxt
        out.append((h.request_id, part.index))
        q.finish(h.request_id, part.index)
    return out


def test_prefetches_hold_a_quarter_of_the_slots():
    q = ChunkQueue(max_inflight=8)
    a, b = read(1, 6, "prefetch"), read(2, 6, "prefetch")
    q.push(a, a.chunks)
    q.push(b, b.chunks)
    assert [q.next() is not None for _ in range(3)] == [True, True, False]
    d = read(3, 8)
    q.push(d, d.chunks)
    assert sum(q.next() is not None for _ in range(8)) == 6  # the rest of the 8 slots


def test_demand_parts_overtake_queued_prefetch_parts():
    q = ChunkQueue(max_inflight=4)
    pre = read(1, 6, "prefetch")
    q.push(pre, pre.chunks)
    first = q.next()
    assert first is not None and first[0] is pre  # a prefetch alone goes
    dem = read(2, 3)
    q.push(dem, dem.chunks)
    order = [q.next() for _ in range(3)]  # three slots left: the demand takes them
    assert all(o is not None and o[0] is dem for o in order)
    assert q.next() is None  # every slot taken (the prefetch's posted one counts)
    for i in range(3):
        q.finish(2, i)
    assert q.next() is None  # the prefetch already holds its one slot
    q.finish(1, 0)
    assert [r for r, _ in drain(q)] == [1] * 5


def test_transfers_of_one_priority_take_turns():
    q = ChunkQueue(max_inflight=8)
    a, b = read(1, 3), read(2, 2)
    q.push(a, a.chunks)
    q.push(b, b.chunks)
    assert drain(q) == [(1, 0), (2, 0), (1, 1), (2, 1), (1, 2)]


def test_a_promoted_prefetch_moves_ahead_of_other_prefetches():
    q = ChunkQueue(max_inflight=1)
    a, b = read(1, 3, "prefetch"), read(2, 3, "prefetch")
    q.push(a, a.chunks)
    q.push(b, b.chunks)
    b.promote()
    assert drain(q)[:3] == [(2, 0), (2, 1), (2, 2)]


def test_an_inactive_transfer_posts_nothing_more():
    q = ChunkQueue(max_inflight=4)
    a = read(1, 3)
    q.push(a, a.chunks)
    a.cancel()
    assert q.next() is None and not q.busy


class Event:
    def __init__(self) -> None:
        self.fired = False

    def query(self) -> bool:
        return self.fired


def stream(rid: int, layers: int, chunks_per_layer: int = 2) -> StreamHandle:
    parts = [Chunk(i, (i // chunks_per_layer,), ((i, i, 1),), 16)
             for i in range(layers * chunks_per_layer)]
    return StreamHandle(rid, "p", "write", tuple(range(layers)), parts, b"",
                        time.monotonic() + 60, key=b"k",
                        messages=stream_messages(b"k", range(layers), len(parts)))


def test_a_streams_layers_go_in_the_order_they_are_signalled_with_their_notes():
    q = ChunkQueue(max_inflight=16)
    s = stream(1, 3)
    q.push(s, [*s.chunks, *s.messages])
    assert q.next() is None and not q.waiting  # nothing signalled: no polling either
    s.signal(2, None)
    assert drain(q) == [(1, 4), (1, 5), (1, 8)]  # layer 2's chunks, then its note
    ev = Event()
    s.signal(0, ev)
    assert q.next() is None and q.waiting  # a pending event: poll
    ev.fired = True
    s.signal(1, None)
    got = drain(q)
    assert set(got) == {(1, 0), (1, 1), (1, 6), (1, 2), (1, 3), (1, 7)}
    assert got.index((1, 6)) > got.index((1, 1)) and got.index((1, 7)) > got.index((1, 3))
    assert q.next() is None  # the finish note waits for finish()
    s.finish_with(b"bye")
    assert drain(q) == [(1, 9)]


def test_notes_wait_for_finished_chunks_where_order_is_not_kept():
    q = ChunkQueue(max_inflight=16, messages_after_finish=True)
    s = stream(1, 1)
    q.push(s, [*s.chunks, *s.messages])
    s.signal(0, None)
    s.finish_with(b"")
    posted = [q.next(), q.next()]
    assert [p[1].index for p in posted if p] == [0, 1]
    assert q.next() is None  # the layer note waits for both chunks to finish
    q.finish(1, 0)
    assert q.next() is None
    q.finish(1, 1)
    assert drain(q) == [(1, 2), (1, 3)]


def test_a_plain_writes_notify_goes_after_its_chunks():
    q = ChunkQueue(max_inflight=16)
    cs = chunks(2)
    w = TransferHandle(1, "p", "write", (0,), cs, b"n", time.monotonic() + 60,
                       messages=[Message(2, None, b"\x00n")])
    q.push(w, [*w.chunks, *w.messages])
    assert drain(q) == [(1, 0), (1, 1), (1, 2)]

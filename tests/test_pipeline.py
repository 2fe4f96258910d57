"""TransferGate (the agent-wide cap) and PrefetchFills (what prefetches fill)."""

from __future__ import annotations

import sys
import time

from kvxfer.errors import PeerUnreachable
from kvxfer.handle import TransferHandle
from kvxfer.pipeline import PrefetchFills, TransferGate
from kvxfer.plan import Chunk


def handle(rid: int, priority: str = "demand", layers=(0,)) -> TransferHandle:
    return TransferHandle(rid, "p", "read", layers, [Chunk(0, tuple(layers), ((rid, rid, 1),), 8)],
                          b"", time.monotonic() + 60, priority=priority)


def test_past_the_cap_transfers_queue_demand_first_and_start_as_slots_free():
    gate, started = TransferGate(2), []
    hs = [handle(1), handle(2), handle(3, "prefetch"), handle(4), handle(5)]
    for h in hs:
        gate.admit(h, started.append)
    assert started == hs[:2] and gate.running == 2 and gate.queued == 3
    hs[4].cancel()  # cancelled while queued: never started
    hs[0].chunk_done(hs[0].chunks[0])
    assert started[-1] is hs[3]  # the queued demand before the older prefetch
    hs[1].chunk_done(hs[1].chunks[0])
    assert started[-1] is hs[2] and gate.queued == 0
    for h in (hs[2], hs[3]):
        h.chunk_done(h.chunks[0])
    assert gate.running == 0 and hs[4] not in started


def test_transfers_that_fail_inside_submit_do_not_recurse():
    gate = TransferGate(1)
    blocker = handle(0)
    gate.admit(blocker, lambda h: None)
    n = sys.getrecursionlimit() * 2
    hs = [handle(i + 1) for i in range(n)]
    for h in hs:
        gate.admit(h, lambda h: h.fail(PeerUnreachable("dead")))
    blocker.chunk_done(blocker.chunks[0])  # each queued one fails at once, in a loop
    assert all(h.status == "failed" for h in hs) and gate.running == 0


def test_fills_cover_only_pairs_of_pending_prefetches_with_the_layers():
    fills = PrefetchFills()
    pre = handle(1, "prefetch", layers=(0, 1))
    fills.add("p", [(10, 20, 4)], pre)
    assert fills.covering("p", [(11, 21, 2)], [1]) == {pre: [(11, 21, 1), (12, 22, 1)]}
    assert fills.covering("p", [(11, 22, 1)], [0]) is None  # another remote block
    assert fills.covering("p", [(13, 23, 2)], [0]) is None  # block 14 is not filled
    assert fills.covering("p", [(10, 20, 1)], [2]) is None  # layer 2 is not moved
    assert fills.covering("q", [(10, 20, 1)], [0]) is None  # another peer
    pre.cancel()
    assert fills.covering("p", [(10, 20, 1)], [0]) is None  # no longer pending

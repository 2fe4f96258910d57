"""Backend conformance, faults: what must hold over every backend when transfers are
cancelled, time out, misbehave or outlive their peer.

- Once ``cancel()`` returns, or a deadline has failed a transfer, no byte of it lands:
  the destination does not change afterwards, and blocks around it never do.
- A transfer's failure is its own: a cancelled transfer, a done-callback that raises or
  an awaiting event loop that is gone leave the other transfers to that peer running.
- A peer that restarts under the same name replaces its predecessor, and nothing of the
  old connection stays: fds, threads and memory stay flat over 50 restarts.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

import kvxfer

from kvpeer import Spec, block_bytes, snapshot
from kvpeer import local_agent as _local_agent

# 2048 blocks of 8 layers x K,V x 512 B: a read of half of them is 8 MiB.
LARGE = Spec("nhd", "float32", num_blocks=2048, layers=8)
SMALL = Spec("nhd", "bfloat16")


def local_agent(backend: str, spec: Spec, name: str = "local", **options):
    return _local_agent(spec, 2, name, backend=backend, **options)


def _zero(layout: kvxfer.KVLayout) -> None:
    for region in layout.regions:
        region.view.zero_()


def _region_blocks(layout: kvxfer.KVLayout, ids: list[int]) -> list[bytes]:
    return block_bytes(layout, ids)


@pytest.fixture(scope="module")
def large_peer(backend):
    from kvpeer import PeerProcess

    p = PeerProcess([LARGE, SMALL], backend=backend)
    yield p
    p.stop()


DEST = list(range(512, 1536))  # the read's destination; 511 and 1536 are the canaries
SOURCE = list(range(0, 2048, 2))
# Scattered ids travel through staging buffers; one long run goes by scatter-gather I/O
# straight into the blocks (host memory): both must stop at cancel.
SOURCES = {"scattered": SOURCE, "contiguous": list(range(1024, 2048))}


@pytest.mark.parametrize("ids", sorted(SOURCES))
@pytest.mark.parametrize("delay_ms", [0, 1, 3, 10])
def test_no_byte_lands_after_cancel_returns(backend, large_peer, delay_ms, ids):
    agent, layout = local_agent(backend, LARGE, chunk_bytes=256 << 10, max_inflight=4)
    with agent:
        _zero(layout)
        peer = agent.add_peer(large_peer.meta[LARGE.key])
        canaries = _region_blocks(layout, [511, 1536])
        h = agent.read(peer, SOURCES[ids], DEST)
        time.sleep(delay_ms / 1000)
        cancelled = h.cancel()
        at_cancel = snapshot(layout)
        time.sleep(0.3)  # anything still posted or on the wire would land by now
        assert snapshot(layout) == at_cancel
        assert _region_blocks(layout, [511, 1536]) == canaries
        assert h.status == ("cancelled" if cancelled else "done")
        agent.read(peer, [1, 3], [0, 1]).wait(10)  # the connection carries on
        assert block_bytes(layout, [0, 1]) == large_peer.call("blocks", LARGE.key, [1, 3])
        assert peer.alive


def test_no_byte_lands_after_a_deadline_failed_the_transfer(backend, large_peer):
    agent, layout = local_agent(backend, LARGE, chunk_bytes=256 << 10, max_inflight=4)
    with agent:
        _zero(layout)
        peer = agent.add_peer(large_peer.meta[LARGE.key])
        agent.read(peer, [0], [0]).wait(10)  # connected and warm: the deadline is the test
        h = agent.read(peer, SOURCE, DEST, timeout=0.002)
        try:
            h.wait()
        except kvxfer.TransferTimeout:
            pass  # the usual outcome; finishing within 2 ms is allowed too
        at_failure = snapshot(layout)
        time.sleep(0.3)
        assert snapshot(layout) == at_failure
        assert _region_blocks(layout, [511, 1536]) == [bytes(len(b)) for b in
                                                       _region_blocks(layout, [511, 1536])]
        agent.read(peer, [5], [5]).wait(10)
        assert peer.alive


@pytest.mark.parametrize("ids", sorted(SOURCES))
def test_cancelling_a_transfer_mid_frame_leaves_the_others_running(backend, large_peer, ids):
    """One 4 MiB chunk per frame (its frame is mid-flight when cancelled), and a small
    read queued behind it on the same connection."""
    agent, layout = local_agent(backend, LARGE, chunk_bytes=4 << 20, max_inflight=2)
    with agent:
        peer = agent.add_peer(large_peer.meta[LARGE.key])
        for trial in range(4):
            big = agent.read(peer, SOURCES[ids], DEST)
            small = agent.read(peer, [7 + trial], [100 + trial])
            time.sleep(0.002 * trial)
            big.cancel()
            small.wait(20)
            assert block_bytes(layout, [100 + trial]) == \
                large_peer.call("blocks", LARGE.key, [7 + trial])
            assert peer.alive
        agent.write(peer, [3], [2000], notify=b"still here").wait(20)
        assert large_peer.call("blocks", LARGE.key, [2000]) == block_bytes(layout, [3])


def test_a_write_cancelled_mid_frame_is_never_announced(backend, large_peer):
    """Every other block (a frame of scatter-gather I/O would need thousands of iovecs)
    and one long run; cancelled writes deliver no notify, and the connection goes on."""
    agent, layout = local_agent(backend, LARGE, chunk_bytes=4 << 20, max_inflight=2)
    with agent:
        peer = agent.add_peer(large_peer.meta[LARGE.key])
        for trial in range(4):
            if trial % 2:  # one run each side: scatter-gather straight from our blocks
                h = agent.write(peer, list(range(1024)), list(range(1024, 2048)),
                                notify=b"cancelled")
            else:
                h = agent.write(peer, SOURCE, list(range(1, 2048, 2)), notify=b"cancelled")
            time.sleep(0.001 * trial)
            h.cancel()
        agent.write(peer, [9], [1999], notify=b"kept").wait(20)
        deadline = time.monotonic() + 5
        notes: list = []
        while not notes and time.monotonic() < deadline:
            notes = large_peer.call("notes", LARGE.key)
            time.sleep(0.01)
        time.sleep(0.2)
        notes += large_peer.call("notes", LARGE.key)
        # A cancel that came after the write completed may let its notify through.
        assert notes[-1] == ("local", b"kept")
        assert large_peer.call("blocks", LARGE.key, [1999]) == block_bytes(layout, [9])


def test_a_raising_done_callback_harms_no_other_transfer(backend, large_peer):
    agent, layout = local_agent(backend, SMALL)
    with agent:
        peer = agent.add_peer(large_peer.meta[SMALL.key])
        bad = agent.read(peer, [1, 2], [1, 2])
        bad.add_done_callback(lambda _: 1 / 0)
        others = [agent.read(peer, [i], [i]) for i in range(3, 9)]
        bad.wait(10)
        for h in others:
            h.wait(10)
        assert peer.alive
        assert block_bytes(layout, list(range(1, 9))) == \
            large_peer.call("blocks", SMALL.key, list(range(1, 9)))


def test_an_await_abandoned_by_its_event_loop_harms_no_other_transfer(backend, large_peer):
    agent, layout = local_agent(backend, LARGE, chunk_bytes=256 << 10)
    with agent:
        peer = agent.add_peer(large_peer.meta[LARGE.key])
        left = []

        async def impatient():
            h = agent.read(peer, SOURCE, DEST)
            left.append(h)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(h, 0.0005)

        asyncio.run(impatient())  # the loop is closed; the read finishes after it
        other = agent.read(peer, [4], [4])
        left[0].wait(20)
        other.wait(20)
        assert peer.alive
        assert block_bytes(layout, DEST) == large_peer.call("blocks", LARGE.key, SOURCE)


def test_concurrent_add_peer_makes_one_connection(backend, large_peer):
    agent, _ = local_agent(backend, SMALL)
    with agent:
        meta = large_peer.meta[SMALL.key]
        got: list = []
        threads = [threading.Thread(target=lambda: got.append(agent.add_peer(meta)))
                   for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(got) == 6 and all(p is got[0] for p in got)
        agent.read(got[0], [1], [1]).wait(10)
        if hasattr(agent.backend, "_clients"):
            assert len(agent.backend._clients) == 1


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def test_a_peer_restarted_50_times_leaks_nothing(backend, peer_process):
    p = peer_process([SMALL])
    agent, layout = local_agent(backend, SMALL, name="survivor")
    with agent:
        peer = agent.add_peer(p.meta[SMALL.key])
        agent.read(peer, [1], [1]).wait(10)

        def restart() -> kvxfer.Peer:
            new = agent.add_peer(p.call("restart", SMALL.key))
            agent.read(new, [2, 3], [2, 3]).wait(10)
            return new

        for _ in range(5):  # warm: first-use allocations are not leaks
            old, peer = peer, restart()
        time.sleep(0.2)
        fds, threads, rss = _fds(), threading.active_count(), _rss_mib()
        for _ in range(50):
            old, peer = peer, restart()
        time.sleep(0.5)  # connections closed by the peer are freed by their own threads
        assert len(agent.peers) == 1
        with pytest.raises(kvxfer.PeerUnreachable, match="added again"):
            agent.read(old, [1], [1])
        assert _fds() <= fds + 4, f"{_fds() - fds} fds more after 50 restarts"
        assert threading.active_count() <= threads + 2
        assert _rss_mib() <= rss + 24, f"RSS grew {_rss_mib() - rss:.1f} MiB over 50 restarts"
        assert block_bytes(layout, [2, 3]) == p.call("blocks", SMALL.key, [2, 3])


def test_transfers_to_a_replaced_peer_fail_with_the_cause(backend, peer_process):
    p = peer_process([LARGE])
    agent, _ = local_agent(backend, LARGE, chunk_bytes=64 << 10, max_inflight=1,
                           transfer_timeout=20)
    with agent:
        old = agent.add_peer(p.meta[LARGE.key])
        h = agent.read(old, SOURCE, DEST)
        h.wait_layer(0, timeout=20)
        if h.done():
            pytest.skip("the read finished before the peer restarted")
        agent.add_peer(p.call("restart", LARGE.key))
        with pytest.raises(kvxfer.TransferFailed) as info:
            h.wait(20)
        cause = info.value.cause
        assert isinstance(cause, kvxfer.PeerUnreachable), cause


class _EngineEvent:
    """Stands in for a torch.cuda.Event on host memory: query() is False until fired."""

    def __init__(self) -> None:
        self.fired = threading.Event()
        self.queried = 0

    def query(self) -> bool:
        self.queried += 1
        return self.fired.is_set()

    def synchronize(self) -> None:  # a backend must never block on it
        raise AssertionError("a backend blocked on the engine's event")


def test_a_write_reads_its_source_only_after_the_engines_event(backend, large_peer):
    agent, layout = local_agent(backend, SMALL)
    with agent:
        peer = agent.add_peer(large_peer.meta[SMALL.key])
        event = _EngineEvent()
        h = agent.write(peer, [1, 2], [20, 21], notify=b"after the event", event=event)
        other = agent.read(peer, [5], [5])  # not held up by the waiting write
        other.wait(10)
        time.sleep(0.05)
        assert not h.done() and event.queried
        for region in layout.regions:  # the engine finishes computing the source KV
            region.view[[1, 2]] = region.view[[9, 10]]
        event.fired.set()
        h.wait(10)
        assert large_peer.call("blocks", SMALL.key, [20, 21]) == block_bytes(layout, [9, 10])

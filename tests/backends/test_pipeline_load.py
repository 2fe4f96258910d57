"""Backend conformance, load: 1000 concurrent requests across 8 peer processes.

Demand reads, prefetch reads and writes to 8 real peer processes, all submitted at
once (the agent runs at most ``max_inflight_transfers`` of them; the rest queue). Every
transfer completes with the right bytes, and the agent's memory stays bounded: a second
and third wave of 1000 leave RSS where the first left it.
"""

from __future__ import annotations

import ctypes
import gc
import os
import random

import pytest

from kvpeer import PeerProcess, Spec, block_bytes
from kvpeer import local_agent as _local_agent

SPEC = Spec("nhd", "bfloat16", num_blocks=4096, layers=4)  # 512 B per block and layer
PEERS = 8
REQUESTS = 1000


def rss_mib() -> float:
    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc keeps freed heap
    if trim is not None:
        trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture(scope="module")
def eight_peers(backend):
    procs = [PeerProcess([SPEC], seed=10 + i, prefix=f"load{i}", backend=backend)
             for i in range(PEERS)]
    yield procs
    for p in procs:
        p.stop()


def wave(agent, peers, rng: random.Random) -> list:
    """1000 transfers at once, every one on blocks of its own: reads of 4 blocks (a
    third of them prefetch) into distinct local blocks below 3200, and writes of 4
    local blocks above it into distinct blocks of the peers' upper half."""
    handles = []
    local_free = iter(range(4096))
    for i in range(REQUESTS):
        k = i % PEERS
        peer = peers[k]
        if i % 5 == 4:  # from local blocks no read lands in
            source = rng.sample(range(3200, 4096), 4)
            dest = [2048 + (i // PEERS) * 4 + j for j in range(4)]
            handles.append(("write", k, (source, dest), agent.write(peer, source, dest)))
            continue
        remote = rng.sample(range(2048), 4)
        local = [next(local_free) for _ in range(4)]
        priority = "prefetch" if i % 3 == 0 else "demand"
        handles.append(("read", k, (remote, local),
                        agent.read(peer, remote, local, priority=priority)))
    return handles


def test_a_thousand_concurrent_requests_to_eight_peers_stay_bounded(backend, eight_peers):
    agent, layout = _local_agent(SPEC, 2, "loader", backend=backend, max_inflight_transfers=64)
    with agent:
        peers = [agent.add_peer(p.meta[SPEC.key]) for p in eight_peers]
        rng = random.Random(7)
        rss = []
        for _ in range(3):
            handles = wave(agent, peers, rng)
            queued = agent.queued_transfers
            for *_, h in handles:
                h.wait(120)
            assert queued > 0 and agent.queued_transfers == 0  # the cap held them back
            rss.append(rss_mib())
        for op, k, (remote, other), _ in handles[::9]:  # the bytes of the last wave
            theirs = eight_peers[k].call("blocks", SPEC.key, other if op == "write" else remote)
            assert theirs == block_bytes(layout, remote if op == "write" else other)
        print(f"RSS after each wave of {REQUESTS} ({backend}): "
              + ", ".join(f"{r:.1f}" for r in rss) + " MiB")
        assert rss[2] - rss[0] < 24, f"RSS grew {rss[2] - rss[0]:.1f} MiB over two waves"

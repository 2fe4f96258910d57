"""NIXL-only checks: per-peer setup cost, quiescence of cancelled reads, isolation.

Costs are measured as descriptor rows and memory, never as speed.
"""

from __future__ import annotations

import os
import resource
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
from kvpeer import PeerProcess, Spec, local_agent, snapshot, usable_backend  # noqa: E402

import kvxfer  # noqa: E402


@pytest.fixture(autouse=True)
def _nixl() -> None:
    usable_backend("nixl")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _page1_layout(num_blocks: int) -> kvxfer.KVLayout:
    # SGLang-like page size 1: a block is one token (1 head x 8 x fp16 = 16 B)
    return kvxfer.KVLayout.vllm([torch.zeros((2, num_blocks, 1, 1, 8), dtype=torch.float16)
                                 for _ in range(2)])


def test_descriptor_rows_do_not_grow_with_blocks() -> None:
    from kvxfer.backends.nixl_descriptors import strided_rows
    for n in (16, 1 << 20):
        table = [[0x1000 * (r + 1), 16, 16, n] for r in range(64)]
        assert strided_rows(table, 0).shape == (64, 5)


@pytest.mark.parametrize("order,peer_tp,expected", [
    ("NHD", 1, True),  # 1 KiB pieces, 1 KiB of each token left out: whole blocks
    ("HND", 1, False),  # one 16 KiB piece per block, 16 KiB left out: per piece
    ("NHD", 8, True),  # the peer's whole block is all we need of it: one op per run
    ("HND", 8, True),
    ("NHD", 2, False),  # the same shard: whole blocks pair up, nothing to pick
])
def test_reads_over_read_only_pieces_that_leave_little_of_a_block_out(order, peer_tp,
                                                                     expected) -> None:
    from kvxfer.backends.nixl_descriptors import head_pieces, over_reads
    from kvxfer.memory import RegisteredMemory

    def rank(tp_size: int, tp_rank: int) -> kvxfer.KVLayout:  # Llama-3.1-8B, 8 KV heads
        heads = 8 // tp_size
        shape = (2, 4, 16, heads, 128) if order == "NHD" else (2, 4, heads, 16, 128)
        return kvxfer.KVLayout.vllm([torch.zeros(shape, dtype=torch.bfloat16)],
                                    kv_layout=order, tp_rank=tp_rank, tp_size=tp_size,
                                    total_kv_heads=8)

    ours, peer = RegisteredMemory(rank(2, 1)), rank(peer_tp, peer_tp // 2)
    _, theirs = head_pieces(ours, peer.descriptor)
    assert over_reads(ours, theirs, peer.block_bytes) is expected
    ours.is_host = False  # a CUDA cache: its landing buffer is unpacked by the kernel
    assert not over_reads(ours, theirs, peer.block_bytes)


def test_add_peer_memory_does_not_grow_with_blocks() -> None:
    # 4 regions x 2M blocks: one row per (region, block) would be 8M rows (~190 MiB of
    # numpy rows alone); strided rows are 4.
    blocks = 2 << 20
    a_layout, b_layout = _page1_layout(blocks), _page1_layout(blocks)
    with kvxfer.Agent("src", backend="nixl") as a, kvxfer.Agent("dst", backend="nixl") as b:
        a.register_kv_cache(a_layout)
        b.register_kv_cache(b_layout)
        meta = a.metadata()
        before, peak_before = _rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peer = b.add_peer(meta)
        grew = _rss_mb() - before
        assert grew < 32, f"add_peer grew RSS by {grew:.0f} MiB"
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 32 << 10
        b.read(peer, [blocks - 1, 0], [5, blocks - 2]).wait(20)


SPEC = Spec("nhd", "float32", num_blocks=1100, layers=32)  # a 1024-block read: 32 MiB


@pytest.fixture(scope="module")
def big_peer():
    p = PeerProcess([SPEC], seed=1, backend="nixl")
    yield p
    p.stop()


@pytest.mark.parametrize("delay_ms", [0, 0.5, 2, 5])
def test_cancel_leaves_nothing_posted(big_peer: PeerProcess, delay_ms: float) -> None:
    agent, layout = local_agent(SPEC, seed=2, backend="nixl")
    try:
        peer = agent.add_peer(big_peer.meta[SPEC.key])
        before = snapshot(layout)
        h = agent.read(peer, list(range(1024)), list(range(1024)))
        time.sleep(delay_ms / 1000)
        h.cancel()
        posted = [k for p in agent.backend._peers for k in p.xfers if k[0] == h.request_id]
        assert posted == []  # every xfer of it settled before cancel returned
        after = snapshot(layout)
        time.sleep(0.3)
        assert snapshot(layout) == after  # nothing landed after cancel returned
        cut = [len(region) * 1024 // SPEC.num_blocks for region in before]
        assert [r[c:] for r, c in zip(after, cut)] == [r[c:] for r, c in zip(before, cut)]
        h2 = agent.read(peer, [1, 2], [3, 4])  # the connection carries on
        h2.wait(20)
    finally:
        agent.close()


def test_raising_callback_and_bad_remote_block_fail_only_their_own(big_peer) -> None:
    agent, _ = local_agent(SPEC, seed=2, backend="nixl")
    try:
        peer = agent.add_peer(big_peer.meta[SPEC.key])
        h = agent.read(peer, [1], [2])
        h.add_done_callback(lambda _: 1 / 0)
        h.wait(20)
        bad = agent.read(peer, [SPEC.num_blocks + 5], [3])
        with pytest.raises(kvxfer.TransferFailed):
            bad.wait(20)
        assert agent.backend._thread.is_alive() and peer.alive
        agent.read(peer, [4, 5], [6, 7]).wait(20)
    finally:
        agent.close()

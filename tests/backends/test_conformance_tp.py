"""Backend conformance for different tensor-parallel sizes on the two sides.

A model of 8 KV heads; prefill ranks of TP 1, 2, 4 and 16 (GQA replication: two ranks
per head) live in one peer process per backend, and this process plays the other side.
Every rank's tensors are its heads of one single-process reference (kvpeer), so after a
read or write the whole KV of the receiving rank must equal the reference with exactly
the shared heads of exactly the named blocks replaced: each byte moved is checked, and
every head and block not moved is a canary.

The whole matrix (5 TP pairs x NHD, HND x read, write) runs over every backend: the
transfers are small (2 layers, 6 blocks), so a backend costs about its peer process's
start (18 agents) plus 1-5 s.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import kvxfer
from kvxfer.heads import shard_heads

from kvpeer import PeerProcess, Spec, reference_tensors, shard_layout, snapshot

HEADS, BLOCKS, LAYERS = 8, 24, 2
READ_FROM = list(range(8))  # prefill blocks that reads take (never written)
PREFILL_SEED, DECODE_SEED = 1, 2

# name -> (our (tp_size, rank), the peers' (tp_size, rank)): we gather from every peer.
CASES = {
    "1to2": ((2, 1), [(1, 0)]),
    "2to1": ((1, 0), [(2, 0), (2, 1)]),
    "2to4": ((4, 1), [(2, 0)]),
    "4to2": ((2, 1), [(4, 2), (4, 3)]),
    "gqa16to2": ((2, 1), [(16, 8), (16, 11), (16, 12), (16, 15)]),
}
ORDERS = ("nhd", "hnd")
_names = itertools.count()


def spec(order: str, tp: tuple[int, int]) -> Spec:
    return Spec(order, "bfloat16", num_blocks=BLOCKS, layers=LAYERS, heads=HEADS,
                tp_size=tp[0], tp_rank=tp[1])


PEER_SPECS = sorted({spec(o, tp) for o in ORDERS for _, peers in CASES.values() for tp in peers},
                    key=lambda s: s.key)


@pytest.fixture(scope="module")
def prefill(backend):
    p = PeerProcess(PEER_SPECS, seed=PREFILL_SEED, prefix="prefill", backend=backend)
    yield p
    p.stop()


def held(s: Spec) -> range:
    shard = shard_heads(s.tp_rank, s.tp_size, s.heads)
    return range(shard.first, shard.first + shard.count)


def moved(full: list[torch.Tensor], src: list[torch.Tensor], s: Spec, heads: range,
          dst_blocks: list[int], src_blocks: list[int]) -> None:
    """In the unsharded ``full``, put ``src``'s ``heads`` of ``src_blocks`` into
    ``dst_blocks`` (what a transfer of those heads does), in place."""
    axis = 0 if s.ctor == "hnd" else 1  # heads in one block: [H, T, D] or [T, H, D]
    for dst, src_t in zip((shard_layout(s.whole(), full).regions),
                          shard_layout(s.whole(), src).regions):
        for d, b in zip(dst_blocks, src_blocks):
            dst.view[d].narrow(axis, heads.start, len(heads)).copy_(
                src_t.view[b].narrow(axis, heads.start, len(heads)))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_a_rank_reads_exactly_the_heads_it_shares_with_each_peer(backend, prefill, case,
                                                                 order):
    read_and_check(backend, prefill, case, order)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("over_read", [False, True])
def test_nixl_reads_heads_per_piece_or_as_whole_blocks_alike(backend, request, order,
                                                              over_read, monkeypatch):
    """NIXL reads small head pieces as the peer's whole blocks and picks the heads while
    unpacking (nixl_descriptors.over_reads); forced either way, every byte and canary
    holds, replicated heads (GQA) and gathers from two peers included."""
    if backend != "nixl":
        pytest.skip("the over-read is NIXL's (two-sided backends pack on the serving side)")
    prefill = request.getfixturevalue("prefill")  # after the skip: no peer process for it
    from kvxfer.backends import nixl_descriptors
    from kvxfer.memory import RegisteredMemory

    monkeypatch.setattr(nixl_descriptors, "OVERREAD_EXTRA", 1 << 30 if over_read else 0)
    picked = []
    unpack_picked = RegisteredMemory.unpack_picked
    monkeypatch.setattr(RegisteredMemory, "unpack_picked",
                        lambda self, *a: picked.append(a) or unpack_picked(self, *a))
    for case in ("1to2", "4to2", "gqa16to2"):
        read_and_check(backend, prefill, case, order)
    assert bool(picked) == over_read


def read_and_check(backend: str, prefill: PeerProcess, case: str, order: str) -> None:
    """Read case's blocks from each of its peers into one rank; each read must move
    exactly the shared heads of exactly the named blocks (the rest are canaries)."""
    ours, theirs = CASES[case]
    me = spec(order, ours)
    decode_full = reference_tensors(me, DECODE_SEED)
    prefill_full = reference_tensors(me, PREFILL_SEED)
    expected = [t.clone() for t in decode_full]
    layout = shard_layout(me, decode_full)
    local = [3, 7, 8, 9, 10, 20]
    with kvxfer.Agent(f"decode-{next(_names)}", backend=backend) as agent:
        agent.register_kv_cache(layout)
        gathered: set[int] = set()
        for i, tp in enumerate(theirs):
            peer_spec = spec(order, tp)
            peer = agent.add_peer(prefill.meta[peer_spec.key])
            shared = range(max(held(me).start, held(peer_spec).start),
                           min(held(me).stop, held(peer_spec).stop))
            assert peer.shared_heads == shared
            remote = [READ_FROM[(i + j) % len(READ_FROM)] for j in range(len(local))]
            agent.read(peer, remote, local).wait(10)
            moved(expected, prefill_full, me, shared, local, remote)
            # every byte of our KV: the shared heads of the named blocks moved, no other
            assert snapshot(layout) == snapshot(shard_layout(me, expected))
            gathered.update(shared)
        assert gathered == set(held(me))  # the peers together gave all our heads


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_a_rank_writes_exactly_the_heads_each_peer_holds(backend, prefill, case, order):
    ours, theirs = CASES[case]
    me = spec(order, ours)
    decode_full = reference_tensors(me, DECODE_SEED)
    layout = shard_layout(me, decode_full)
    # each case writes its own peer blocks, so the module's peers stay predictable
    dst = [8 + 3 * list(CASES).index(case) + j for j in range(3)]
    src = [5, 0, 11]
    with kvxfer.Agent(f"decode-{next(_names)}", backend=backend) as agent:
        agent.register_kv_cache(layout)
        before = snapshot(layout)
        for tp in theirs:
            peer_spec = spec(order, tp)
            peer = agent.add_peer(prefill.meta[peer_spec.key])
            agent.write(peer, src, dst).wait(10)
            expected = reference_tensors(me, PREFILL_SEED)
            moved(expected, decode_full, me, peer.shared_heads, dst, src)
            want = shard_layout(peer_spec, expected)
            ids = READ_FROM + dst
            got = prefill.call("blocks", peer_spec.key, ids)
            assert got == [r.view[ids].contiguous().view(torch.uint8).numpy().tobytes()
                           for r in want.regions]
        assert snapshot(layout) == before  # a write leaves its source as it was


def test_a_peer_of_another_model_or_sharing_no_head_is_refused_naming_the_field(backend,
                                                                               prefill):
    others = {"total_kv_heads": Spec("nhd", "bfloat16", num_blocks=BLOCKS, layers=LAYERS,
                                     heads=4, tp_size=2, tp_rank=0),
              "heads": spec("nhd", (4, 1))}  # holds heads 2-3; the TP 2 rank 1 peer 4-7
    for field, mine in others.items():
        with kvxfer.Agent(f"decode-{next(_names)}", backend=backend) as agent:
            agent.register_kv_cache(shard_layout(mine, reference_tensors(mine, DECODE_SEED)))
            with pytest.raises(kvxfer.LayoutMismatch) as info:
                agent.add_peer(prefill.meta[spec("nhd", (2, 1)).key])
            assert info.value.field == field
            assert not agent.peers


@pytest.mark.parametrize("views", [False, True])
def test_two_sided_head_slices_move_alike_as_views_or_packed(backend, views, monkeypatch):
    """Both ends in this process, so that both take the path forced here: head pieces
    sent and received as one view each (pieces of HEAD_SCATTER_MIN or more), or packed
    by a strided copy per run (smaller ones). A TP 2 rank reads from and writes to a TP 1
    peer, a TP 1 rank gathers from two TP 2 peers; every byte and canary is checked."""
    if backend == "nixl":
        pytest.skip("two-sided backends only (nixl reads per descriptor or over-reads)")
    from kvxfer import memory

    monkeypatch.setattr(memory, "HEAD_SCATTER_MIN", 1 if views else 1 << 30)
    viewed = []
    head_buffers = memory.RegisteredMemory._head_buffers
    monkeypatch.setattr(memory.RegisteredMemory, "_head_buffers",
                        lambda self, *a: viewed.append(a) or head_buffers(self, *a))
    for order in ORDERS:
        for ours, theirs in (((2, 1), [(1, 0)]), ((1, 0), [(2, 0), (2, 1)])):
            me = spec(order, ours)
            decode_full, prefill_full = (reference_tensors(me, s) for s in (DECODE_SEED,
                                                                              PREFILL_SEED))
            layout = shard_layout(me, decode_full)
            expected = [t.clone() for t in decode_full]
            with kvxfer.Agent(f"decode-{next(_names)}", backend=backend) as agent:
                agent.register_kv_cache(layout)
                for tp in theirs:
                    peer_spec = spec(order, tp)
                    peer_layout = shard_layout(peer_spec, [t.clone() for t in prefill_full])
                    with kvxfer.Agent(f"prefill-{next(_names)}", backend=backend) as server:
                        server.register_kv_cache(peer_layout)
                        peer = agent.add_peer(server.metadata())
                        agent.read(peer, [1, 2, 3, 9], [4, 5, 6, 0]).wait(10)
                        moved(expected, prefill_full, me, peer.shared_heads, [4, 5, 6, 0],
                              [1, 2, 3, 9])
                        agent.write(peer, [11, 12], [20, 22]).wait(10)
                        written = [t.clone() for t in prefill_full]
                        moved(written, decode_full, me, peer.shared_heads, [20, 22], [11, 12])
                        assert snapshot(peer_layout) == snapshot(shard_layout(peer_spec,
                                                                              written))
                assert snapshot(layout) == snapshot(shard_layout(me, expected))
    assert bool(viewed) == (views and backend == "tcp")  # ucx and nccl always pack

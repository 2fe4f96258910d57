"""RegisteredMemory: range checks and wire-order views equal the packed order."""

from __future__ import annotations

import pytest
import torch

from kvxfer import KVLayout
from kvxfer.errors import BlockOutOfRange, LayoutMismatch
from kvxfer.memory import RegisteredMemory


def layout(kv_dim: int = 0) -> KVLayout:
    gen = torch.Generator().manual_seed(0)
    shape = (2, 8, 4, 2, 3) if kv_dim == 0 else (8, 2, 4, 2, 3)
    return KVLayout.vllm([torch.randn(shape, generator=gen).half() for _ in range(3)],
                         kv_dim=kv_dim)


def test_check_counts_bytes_and_refuses_out_of_range():
    mem = RegisteredMemory(layout())
    assert mem.check((0, 2), ((1, 3), (6, 2))) == 2 * 5 * 2 * 4 * 2 * 3 * 2
    for layers, runs in [((3,), ((0, 1),)), ((1, 1), ((0, 1),)), ((2, 1), ((0, 1),)),
                         ((0,), ((7, 2),)), ((0,), ((0, 0),)), ((0,), ((-1, 1),))]:
        with pytest.raises(BlockOutOfRange):
            mem.check(layers, runs)


@pytest.mark.parametrize("kv_dim", [0, 1])
def test_host_buffers_follow_wire_order(kv_dim):
    lay = layout(kv_dim)
    mem = RegisteredMemory(lay)
    layers, runs = (0, 2), ((5, 2), (1, 1))
    got = b"".join(bytes(v) for v in mem.host_buffers(layers, runs))
    expected = b"".join(lay.region(layer, part).view[[5, 6, 1]].contiguous().numpy().tobytes()
                        for layer in layers for part in ("K", "V"))
    assert got == expected
    packed = torch.empty(len(got), dtype=torch.uint8)
    mem.pack_into(layers, runs, packed)
    assert packed.numpy().tobytes() == got


def test_host_buffers_are_writable_views_of_the_tensors():
    lay = layout()
    mem = RegisteredMemory(lay)
    (view,) = RegisteredMemory(KVLayout.mla([torch.zeros(4, 2, 8)])).host_buffers((0,), ((2, 1),))
    view[:] = b"\x01" * len(view)
    mem.host_buffers((1,), ((3, 1),))[1][:2] = b"\x00\x3c"  # fp16 1.0 into V of block 3
    assert lay.region(1, "V").view[3].flatten()[0].item() == 1.0


def test_unpack_round_trip():
    lay = layout()
    mem = RegisteredMemory(lay, staged=True)
    src = torch.arange(mem.check((1,), ((2, 2),)), dtype=torch.int64).to(torch.uint8)
    mem.unpack_from((1,), ((2, 2),), src)
    out = torch.empty_like(src)
    mem.pack_into((1,), ((2, 2),), out)
    assert torch.equal(out, src)


def test_a_chunk_of_no_blocks_packs_and_unpacks_nothing():
    lay = layout()
    before = [r.view.clone() for r in lay.regions]
    mem = RegisteredMemory(lay, staged=True)
    assert mem.check((0, 1), ()) == 0
    empty = torch.empty(0, dtype=torch.uint8)
    mem.pack_into((0, 1), (), empty)  # a notify-only write on the staged (CUDA) path
    mem.unpack_from((0, 1), (), empty)
    assert all(torch.equal(r.view, b) for r, b in zip(lay.regions, before))


def test_peer_descriptor_checks():
    mem = RegisteredMemory(layout())
    mem.check_peer(layout().descriptor.to_bytes())
    with pytest.raises(LayoutMismatch):
        mem.check_peer(KVLayout.mla([torch.zeros(4, 2, 8)]).descriptor.to_bytes())
    with pytest.raises(LayoutMismatch):
        mem.check_peer(b"\xff")


def test_check_refuses_blocks_named_twice_and_chunks_over_the_frame_limit(monkeypatch):
    mem = RegisteredMemory(layout())
    for runs in [((0, 4), (3, 1)), ((2, 2), (2, 2)), ((0, 8), (0, 8)), ((5, 1),) * 3]:
        with pytest.raises(BlockOutOfRange, match="more than once"):
            mem.check((0,), runs)
    monkeypatch.setattr("kvxfer.memory.MAX_CHUNK_BYTES", 1000)
    with pytest.raises(BlockOutOfRange, match="limit"):
        mem.check((0, 1), ((0, 8),))  # 2 layers x 8 blocks x 96 B = 1536 B
    assert mem.check((0,), ((0, 4),)) == 384


@pytest.mark.parametrize("kv_dim", [0, 1])
def test_scattered_blocks_are_staged_and_land_in_place(kv_dim):
    src, dst = layout(kv_dim), layout(kv_dim)
    for region in dst.regions:
        region.view.zero_()
    a, b = RegisteredMemory(src), RegisteredMemory(dst)
    runs = ((6, 1), (0, 1), (3, 2))
    assert a.stages(runs)  # 48-byte pieces: gathered, not one view per block
    packed = torch.empty(a.check((1, 2), runs), dtype=torch.uint8)
    a.pack_into((1, 2), runs, packed)
    b.unpack_from((1, 2), ((1, 1), (2, 1), (5, 2)), packed)
    for layer in (1, 2):
        for part in ("K", "V"):
            assert torch.equal(dst.region(layer, part).view[[1, 2, 5, 6]],
                               src.region(layer, part).view[[6, 0, 3, 4]])
    assert not dst.region(0, "K").view.any() and not dst.region(1, "K").view[[0, 3, 4]].any()


@pytest.mark.parametrize("order,kv_dim", [("NHD", 0), ("NHD", 1), ("HND", 0)])
@pytest.mark.parametrize("heads", [(0, 1), (1, 3), (3, 4)])
@pytest.mark.parametrize("runs", [((5, 2), (1, 1)), ((1, 3), (6, 2)), ((6, 1), (0, 1), (3, 1))])
@pytest.mark.parametrize("run_copy_min", [1, 1 << 30])
def test_a_head_slice_moves_the_packing_modules_bytes_and_only_those(order, kv_dim, heads,
                                                                     runs, run_copy_min,
                                                                     monkeypatch):
    from kvxfer.packing import pack

    monkeypatch.setattr("kvxfer.memory.RUN_COPY_MIN", run_copy_min)  # per run, or fancy

    gen = torch.Generator().manual_seed(1)
    shape = (2, 8, 4, 4, 3) if kv_dim == 0 else (8, 2, 4, 4, 3)
    lay = KVLayout.vllm([torch.randn(shape, generator=gen).half() for _ in range(3)],
                        kv_layout=order, kv_dim=kv_dim)
    layers = (0, 2)
    ids = [b for start, count in runs for b in range(start, start + count)]
    want = pack(lay, ids, layers, heads=heads).numpy().tobytes()
    for mem in (RegisteredMemory(lay), RegisteredMemory(lay, staged=True)):
        assert mem.check(layers, runs, heads) == len(want)
        got = b"".join(bytes(v) for v in mem.host_buffers(layers, runs, heads))
        assert got == want  # scatter-gather views
        packed = torch.empty(len(want), dtype=torch.uint8)
        mem.pack_into(layers, runs, packed, heads)  # the numpy gather
        assert packed.numpy().tobytes() == want
        other = RegisteredMemory(KVLayout.vllm(
            [torch.zeros(shape, dtype=torch.half) for _ in range(3)], kv_layout=order,
            kv_dim=kv_dim))
        other.unpack_from(layers, ((0, len(ids)),), packed, heads)
        landed = list(range(len(ids)))
        moved = pack(other.layout, landed, layers, heads=heads).numpy().tobytes()
        assert moved == want
        everything = pack(other.layout, list(range(8))).numpy()
        assert int((everything != 0).sum()) == int((pack(other.layout, landed, layers,
                                                          heads=heads).numpy() != 0).sum())


def test_a_head_range_outside_the_layout_is_refused_before_any_work():
    mem = RegisteredMemory(layout())  # 2 heads
    for heads in [(0, 3), (2, 2), (1, 0)]:
        with pytest.raises(BlockOutOfRange, match="head range"):
            mem.check((0,), ((0, 1),), heads)
    mla = RegisteredMemory(KVLayout.mla([torch.zeros(4, 2, 8)]))
    with pytest.raises(BlockOutOfRange, match="MLA"):
        mla.check((0,), ((0, 1),), (0, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("order", ["NHD", "HND"])
def test_a_head_slice_of_a_cuda_cache_packs_as_the_host_reference(order):
    from kvxfer.packing import pack

    gen = torch.Generator().manual_seed(2)
    host = [torch.randn(2, 8, 4, 4, 3, generator=gen).half() for _ in range(2)]
    cpu = KVLayout.vllm(host, kv_layout=order)
    mem = RegisteredMemory(KVLayout.vllm([t.cuda() for t in host], kv_layout=order))
    want = pack(cpu, [5, 6, 1], (0, 1), heads=(1, 3))
    for out in (torch.empty(want.numel(), dtype=torch.uint8, device="cuda"),
                torch.empty(want.numel(), dtype=torch.uint8).pin_memory()):
        mem.pack_into((0, 1), ((5, 2), (1, 1)), out, (1, 3))
        assert torch.equal(out.cpu(), want)
    mem.unpack_from((0, 1), ((0, 3),), want.cuda(), (1, 3))
    assert torch.equal(pack(mem.layout, [0, 1, 2], (0, 1), heads=(1, 3)).cpu(), want)


@pytest.mark.parametrize("order", ["NHD", "HND"])
@pytest.mark.parametrize("runs", [((1, 3), (6, 2)), ((6, 1), (0, 1), (3, 1))])
@pytest.mark.parametrize("run_copy_min", [1, 1 << 30])
def test_heads_picked_from_whole_landed_blocks_land_as_a_packed_slice_would(order, runs,
                                                                            run_copy_min,
                                                                            monkeypatch):
    """NIXL's over-read: the peer's whole blocks land packed; our heads (1, 3) take its
    heads (2, 4), and every other head and block of ours stays as it was (canaries)."""
    from kvxfer.packing import pack

    monkeypatch.setattr("kvxfer.memory.RUN_COPY_MIN", run_copy_min)  # per run, or fancy

    gen = torch.Generator().manual_seed(3)
    peer = KVLayout.vllm([torch.randn(2, 8, 4, 4, 3, generator=gen).half() for _ in range(2)],
                         kv_layout=order)
    ours = KVLayout.vllm([torch.randn(2, 8, 4, 4, 3, generator=gen).half() for _ in range(2)],
                         kv_layout=order)
    remote = [7, 2, 5, 0, 4, 1][:sum(n for _, n in runs)]
    landed = pack(peer, remote, (0, 1))  # whole blocks, packed chunk order
    before = [r.view for r in ours.regions]  # (L0 K, L0 V, L1 K, L1 V)
    want = RegisteredMemory(KVLayout.vllm([torch.stack([k, v]) for k, v in
                                           zip(before[::2], before[1::2])], kv_layout=order))
    mem = RegisteredMemory(ours)
    want.unpack_from((0, 1), runs, pack(peer, remote, (0, 1), heads=(2, 4)), (1, 3))
    picked = RegisteredMemory(peer).segments((2, 4))
    mem.unpack_picked((0, 1), runs, landed, (1, 3), peer.block_bytes, picked)
    assert all(torch.equal(a.view, b.view) for a, b in zip(ours.regions, want.layout.regions))
    with pytest.raises(LayoutMismatch):
        mem.unpack_picked((0, 1), runs, landed, (1, 2), peer.block_bytes, picked)

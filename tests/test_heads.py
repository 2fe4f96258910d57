"""Tensor-parallel shards: who holds which KV heads, what two shards share, where in a block."""

from __future__ import annotations

import pytest
import torch

from kvxfer import KVLayout, LayoutMismatch
from kvxfer.heads import block_segments, exchange_heads, shard_heads
from kvxfer.layout import LayoutDescriptor
from kvxfer.packing.pack_plan import make_plan


@pytest.mark.parametrize("tp_size,expected", [
    (1, [(0, 8)]),
    (2, [(0, 4), (4, 4)]),
    (4, [(0, 2), (2, 2), (4, 2), (6, 2)]),
    (8, [(h, 1) for h in range(8)]),
    (16, [(r // 2, 1) for r in range(16)]),  # GQA replication: two ranks per head
])
def test_each_rank_holds_its_range_of_heads(tp_size, expected):
    assert [(s.first, s.count) for s in (shard_heads(r, tp_size, 8)
                                         for r in range(tp_size))] == expected


@pytest.mark.parametrize("rank,size,total,field", [
    (2, 2, 8, "tp_rank"), (-1, 2, 8, "tp_rank"), (0, 3, 8, "tp_size"), (0, 12, 8, "tp_size"),
    (0, 0, 8, "tp_size"), (0, 2, 0, "total_kv_heads")])
def test_impossible_shards_are_refused_naming_the_field(rank, size, total, field):
    with pytest.raises(LayoutMismatch) as info:
        shard_heads(rank, size, total)
    assert info.value.field == field


def nhd(heads: int, rank: int = 0, size: int = 1, total: int | None = None,
        order: str = "NHD") -> KVLayout:
    shape = (2, 4, 16, heads, 8) if order == "NHD" else (2, 4, heads, 16, 8)
    return KVLayout.vllm([torch.zeros(shape)], kv_layout=order, tp_rank=rank, tp_size=size,
                         total_kv_heads=total)


def test_layouts_record_their_shard_and_refuse_tensors_of_another():
    d = nhd(4, 1, 2, 8).descriptor
    assert (d.head_start, d.num_kv_heads, d.total_kv_heads) == (4, 4, 8)
    assert LayoutDescriptor.from_bytes(d.to_bytes()) == d
    gqa = nhd(1, 11, 16, 8).descriptor
    assert (gqa.head_start, gqa.num_kv_heads) == (5, 1)
    split = KVLayout.split_kv([torch.zeros(64, 2, 8)], [torch.zeros(64, 2, 8)], 16,
                              tp_rank=3, tp_size=4, total_kv_heads=8).descriptor
    assert (split.head_start, split.num_kv_heads) == (6, 2)
    with pytest.raises(LayoutMismatch) as info:
        nhd(2, 1, 2, 8)  # rank 1 of 2 holds 4 of 8 heads
    assert info.value.field == "num_kv_heads"
    with pytest.raises(LayoutMismatch) as info:
        nhd(4, 1, 2)  # which model? the total is needed
    assert info.value.field == "total_kv_heads"
    bad = d.to_bytes().replace(b'"head_start":4', b'"head_start":6')
    with pytest.raises(LayoutMismatch) as info:
        LayoutDescriptor.from_bytes(bad)
    assert info.value.field == "head_start"


def test_shards_of_one_model_share_their_common_heads():
    tp1, tp2r1 = nhd(8).descriptor, nhd(4, 1, 2, 8).descriptor
    ex = exchange_heads(tp2r1, tp1)
    assert (ex.shared, ex.local, ex.remote, ex.sliced) == (range(4, 8), None, (4, 8), True)
    assert ex.explicit() == ((0, 4), (4, 8)) and ex.nbytes(1000) == 1000
    back = exchange_heads(tp1, tp2r1)
    assert (back.local, back.remote, back.nbytes(1000)) == ((4, 8), None, 500)
    same = exchange_heads(tp2r1, nhd(4, 1, 2, 8).descriptor)
    assert not same.sliced and same.shared == range(4, 8)
    gqa = exchange_heads(tp2r1, nhd(1, 11, 16, 8).descriptor)
    assert (gqa.shared, gqa.local, gqa.remote) == (range(5, 6), (1, 2), None)
    mla = KVLayout.mla([torch.zeros(4, 16, 8)]).descriptor
    assert exchange_heads(mla, mla).shared == range(0, 1) and not exchange_heads(mla, mla).sliced


@pytest.mark.parametrize("mine,theirs,field", [
    (nhd(2, 1, 4, 8), nhd(4, 1, 2, 8), "heads"),  # heads 2-3 and 4-7
    (nhd(4, 0, 2, 8), nhd(4, 0, 1, 4), "total_kv_heads"),  # another model
    (nhd(4, 0, 2, 8), nhd(4, 0, 2, 8, "HND"), "block_order"),
])
def test_a_real_mismatch_is_refused_naming_the_field(mine, theirs, field):
    with pytest.raises(LayoutMismatch) as info:
        mine.descriptor.check_compatible(theirs.descriptor)
    assert info.value.field == field


def test_block_bytes_must_agree_per_head():
    mine = nhd(4, 0, 2, 8).descriptor
    tp1 = nhd(8).descriptor
    raw = tp1.to_bytes()
    assert b'"block_bytes":%d' % tp1.block_bytes in raw
    forged = LayoutDescriptor.from_bytes(raw.replace(b'"block_bytes":%d' % tp1.block_bytes,
                                                     b'"block_bytes":%d' % (2 * tp1.block_bytes)))
    with pytest.raises(LayoutMismatch) as info:
        mine.check_compatible(forged)
    assert info.value.field == "block_bytes"


@pytest.mark.parametrize("order", ["NHD", "HND"])
@pytest.mark.parametrize("heads", [None, (0, 8), (2, 5), (7, 8)])
def test_block_segments_are_the_packing_plans(order, heads):
    layout = nhd(8, order=order)
    seg = block_segments(layout.descriptor, heads)
    plan = make_plan(layout, [0], None, heads)
    assert (seg.count, seg.offset, seg.pitch, seg.nbytes) == \
        (plan.num_segs, plan.seg_off, plan.seg_pitch, plan.seg_bytes)

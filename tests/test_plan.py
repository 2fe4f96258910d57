"""Chunk planning: run merging and bounded chunks that cover every byte once."""

from __future__ import annotations

import random

import pytest

from kvxfer.errors import BlockOutOfRange
from kvxfer.plan import MIN_CHUNK, chunk_size, merge_runs, plan_chunks


def test_runs_merge_only_where_both_sides_are_contiguous():
    assert merge_runs([4, 5, 6, 9, 10, 2], [0, 1, 2, 3, 7, 8]) == [
        (4, 0, 3), (9, 3, 1), (10, 7, 1), (2, 8, 1)]
    assert merge_runs([], []) == []


def test_bad_block_lists():
    with pytest.raises(ValueError, match="3 local blocks but 2"):
        merge_runs([1, 2, 3], [1, 2])
    with pytest.raises(BlockOutOfRange):
        merge_runs([-1], [0])
    with pytest.raises(BlockOutOfRange):
        merge_runs([0], [2**32])
    with pytest.raises(TypeError):
        merge_runs([1.5], [0])


@pytest.mark.parametrize("seed", range(20))
def test_chunks_cover_every_block_of_every_layer_once_within_budget(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 300)
    local, remote = rng.sample(range(1000), n), rng.sample(range(1000), n)
    if seed % 3 == 0:
        local, remote = sorted(local), sorted(remote)
    layers = sorted(rng.sample(range(40), rng.randint(1, 40)))
    layer_block_bytes = rng.choice([64, 512, 4096])
    budget = rng.choice([64, 1000, 8192, 1 << 20])
    chunks = plan_chunks(merge_runs(local, remote), layers, layer_block_bytes, budget,
                         max_runs=rng.choice([2, 1000]))
    seen = []
    for i, chunk in enumerate(chunks):
        assert chunk.index == i
        assert chunk.nbytes == chunk.num_blocks * layer_block_bytes * len(chunk.layers)
        assert chunk.nbytes <= max(budget, layer_block_bytes)
        for layer in chunk.layers:
            for lo, ro, count in chunk.runs:
                seen.extend((layer, lo + k, ro + k) for k in range(count))
    expected = [(layer, lo, ro) for layer in layers for lo, ro in zip(local, remote)]
    assert sorted(seen) == sorted(expected) and len(seen) == len(expected)
    # layer-major: a layer's last chunk comes before the next layer's first
    order = [chunk.layers[0] for chunk in chunks]
    assert order == sorted(order)


def test_nothing_to_move_is_no_chunks():
    assert plan_chunks([], [0, 1], 64, 1024) == []
    assert plan_chunks([(0, 0, 3)], [], 64, 1024) == []


def test_chunk_size_overlaps_small_requests_and_caps_large_ones():
    assert chunk_size(512 << 20, 4 << 20, 4) == 4 << 20
    assert chunk_size(16 << 20, 4 << 20, 4) == 1 << 20
    assert chunk_size(100 << 10, 4 << 20, 4) == MIN_CHUNK
    assert chunk_size(512 << 20, 8 << 10, 2) == 8 << 10  # a small budget is a hard cap

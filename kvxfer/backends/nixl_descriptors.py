"""NIXL descriptor lists for a KV layout: one strided row per region, flat block indices.

NIXL (1.5 and later) takes a prepared descriptor list as an Nx5 array of strided rows
``(address, length, device, stride, count)``: ``count`` blocks of ``length`` bytes,
``stride`` bytes apart. One row per region describes every block of the cache, so
preparing the list costs O(regions) in time and memory whatever the block count
(SGLang's page size 1 has millions of blocks per region). Indices into the prepared
list stay flat, region-major::

    row (region)     L0/K            L0/V              ...   L(n-1)/V
    flat index       0 .. NB-1       NB .. 2NB-1       ...   (R-1)NB .. R*NB-1
    address          base_r + b * block_stride_r,  length block_bytes_r

A chunk (layers x runs) becomes the flat indices of its blocks on each side; NIXL
merges indices that are consecutive on both sides of a dense region into one
operation, so a run of blocks costs one operation however long it is.
"""

from __future__ import annotations

import numpy as np

from ..memory import RegisteredMemory
from ..plan import Chunk

RegionTable = list[list[int]]  # per region: [base, block_stride, block_bytes, num_blocks]


def region_table(memory: RegisteredMemory) -> RegionTable:
    """Our regions as the peer needs them (shipped in ``backend_metadata``)."""
    return [[r.base, r.block_stride, r.block_bytes, r.num_blocks] for r in memory.layout.regions]


def strided_rows(table: RegionTable, device: int) -> np.ndarray:
    """Rx5 (address, length, device, stride, count): one row per region."""
    rows = [[base, nbytes, device, stride, n] for base, stride, nbytes, n in table]
    return np.ascontiguousarray(np.asarray(rows, dtype=np.uint64).reshape(-1, 5))


def chunk_indices(chunk: Chunk, parts: int, num_blocks: int, side: int) -> np.ndarray:
    """Flat descriptor indices of a chunk on one side (0: local runs, 1: remote runs).

    Layer-major, then part, then the chunk's blocks in run order, so that the local and
    remote lists pair block for block.
    """
    starts = np.fromiter((run[side] for run in chunk.runs), dtype=np.int64,
                         count=len(chunk.runs))
    counts = np.fromiter((run[2] for run in chunk.runs), dtype=np.int64,
                         count=len(chunk.runs))
    # blocks of every run, concatenated, without one arange per run
    offsets = np.cumsum(counts) - counts
    blocks = np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(starts - offsets, counts)
    regions = np.asarray([layer * parts + p for layer in chunk.layers for p in range(parts)],
                         dtype=np.int64)
    return (regions[:, None] * num_blocks + blocks[None, :]).ravel().astype(np.int32)

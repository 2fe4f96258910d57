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

For a peer of another tensor-parallel shard, both sides describe only the pieces of a
block that hold the heads they share (:func:`kvxfer.heads.block_segments`): one piece
per block in HND (one row per region, as above, shorter and offset), one per token in
NHD (``block_size`` rows per region, row ``r * S + s`` for token ``s``; flat index
``(r * S + s) * NB + b``). Both sides cut their blocks into the same number of pieces
of the same length, so the lists still pair one to one; NHD costs S times the
descriptors.

Reads over-read where that is cheaper (:func:`over_reads`): a descriptor costs
NIXL/UCX a fixed time however small its piece, so when the bytes a piece leaves out of
the peer's block are few, the read moves the peer's *whole* blocks with its whole-block
list (few large operations, as a homogeneous read) into our landing buffer, and the
heads we share are picked out while unpacking (:meth:`RegisteredMemory.unpack_picked`)::

    per piece                             over-read (host memory, extra bytes per
    R*S rows, S*B descriptors per         piece < OVERREAD_EXTRA): R rows, one
    (layer, part) of a chunk              operation per run of blocks; moves
                                          remote_heads/shared times the bytes

A peer holding fewer heads than we do (a gather from TP 4 into TP 2) gives us all of
its block: the "over-read" then moves no extra byte, only fewer descriptors. Otherwise
the landing buffers of a chunk hold remote / shared heads times its bytes (at most
the model's KV heads times). Writes never over-write (the peer's other heads are not
ours to touch): they keep the per-piece lists.
"""

from __future__ import annotations

import numpy as np

from ..heads import Segments, block_segments, exchange_heads
from ..layout import LayoutDescriptor
from ..memory import RegisteredMemory
from ..plan import Chunk

RegionTable = list[list[int]]  # per region: [base, block_stride, block_bytes, num_blocks]
# A read over-reads when each piece of the peer's block it would post leaves fewer than
# this many bytes of the block out (what reading the whole block costs extra per
# descriptor saved). Loopback on the dev VM (UCX cma, Llama-3.1-8B, 16-token blocks,
# TP 1 -> 2): a descriptor costs about what 14 KiB of bytes do. NHD (1 KiB pieces, 1 KiB
# left out each) read 0.07x a homogeneous read per piece, 0.55x over-read; HND (16 KiB
# pieces, 16 KiB left out) 0.53x against 0.58x: a tie. An RDMA NIC posts small reads
# for less than that, so the threshold sits well below the loopback tie.
OVERREAD_EXTRA = 4 << 10


def region_table(memory: RegisteredMemory) -> RegionTable:
    """Our regions as the peer needs them (shipped in ``backend_metadata``)."""
    return [[r.base, r.block_stride, r.block_bytes, r.num_blocks] for r in memory.layout.regions]


def head_pieces(memory: RegisteredMemory,
                peer: LayoutDescriptor) -> tuple[Segments | None, Segments | None]:
    """(ours, theirs): where the heads we share with a peer of another tensor-parallel
    shard lie in each side's blocks, cut alike; (None, None) when whole blocks pair up.

    Raises:
        LayoutMismatch: the shards share no head.
    """
    mine = memory.layout.descriptor
    heads = exchange_heads(mine, peer)
    if not heads.sliced:
        return None, None
    local, remote = heads.explicit()
    return block_segments(mine, local), block_segments(peer, remote)


def over_reads(memory: RegisteredMemory, theirs: Segments | None, block_bytes: int) -> bool:
    """Whether reads from a peer whose ``block_bytes`` blocks are cut as ``theirs``
    move its whole blocks (module docstring): when each piece leaves fewer than
    ``OVERREAD_EXTRA`` bytes of its block out, on host memory (on a GPU the landing
    buffer is unpacked by the packing kernel, which takes packed pieces only)."""
    return theirs is not None and memory.is_host and \
        block_bytes - theirs.count * theirs.nbytes < OVERREAD_EXTRA * theirs.count


def strided_rows(table: RegionTable, device: int, pieces: Segments | None = None) -> np.ndarray:
    """(R*S)x5 (address, length, device, stride, count): one row per region, or per
    region and piece of a block (``pieces``: where the shared heads lie in a block)."""
    if pieces is None:
        rows = [[base, nbytes, device, stride, n] for base, stride, nbytes, n in table]
    else:
        rows = [[base + pieces.offset + s * pieces.pitch, pieces.nbytes, device, stride, n]
                for base, stride, _, n in table for s in range(pieces.count)]
    return np.ascontiguousarray(np.asarray(rows, dtype=np.uint64).reshape(-1, 5))


def chunk_indices(chunk: Chunk, parts: int, num_blocks: int, side: int,
                  pieces: int = 1) -> np.ndarray:
    """Flat descriptor indices of a chunk on one side (0: local runs, 1: remote runs).

    Layer-major, then part (then piece of a block, for head-sliced lists of ``pieces``
    rows per region), then the chunk's blocks in run order, so that the local and
    remote lists pair block (piece) for block.
    """
    starts = np.fromiter((run[side] for run in chunk.runs), dtype=np.int64,
                         count=len(chunk.runs))
    counts = np.fromiter((run[2] for run in chunk.runs), dtype=np.int64,
                         count=len(chunk.runs))
    # blocks of every run, concatenated, without one arange per run
    offsets = np.cumsum(counts) - counts
    blocks = np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(starts - offsets, counts)
    regions = np.asarray([(layer * parts + p) * pieces + s for layer in chunk.layers
                          for p in range(parts) for s in range(pieces)], dtype=np.int64)
    return (regions[:, None] * num_blocks + blocks[None, :]).ravel().astype(np.int32)

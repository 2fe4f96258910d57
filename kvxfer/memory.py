"""RegisteredMemory: what a backend may touch of a registered KV cache, in bytes.

Backends know nothing of layouts. They get this map, which answers three questions
about a chunk given as (layers, runs of block ids) on this side:

- ``check``: is every layer and block in range, and how many bytes is the chunk? Called
  on every request from a peer before a byte is read or written.
- ``host_buffers``: writable memoryviews over the chunk's blocks, in wire order, for
  host memory (scatter-gather I/O straight from and into the engine's tensors).
- ``pack_into`` / ``unpack_from``: copy the chunk to or from one contiguous staging
  buffer: for CUDA tensors with the packing kernel (into a device or pinned host
  buffer), for host tensors with one memcpy per contiguous run.

Wire order of a chunk: for each layer, for each part, for each run, the run's blocks.
Every method takes ``heads=(h0, h1)`` too: then a block stands for the pieces holding
those of its heads (:func:`kvxfer.heads.block_segments`; the packing module's order),
which is how peers of other tensor-parallel sizes exchange the heads they share.
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np
import torch

from .errors import BlockOutOfRange, LayoutMismatch
from .heads import HeadRange, Segments, block_segments
from .layout import KVLayout, LayoutDescriptor
from .plan import MAX_CHUNK_BYTES

Runs = Sequence[tuple[int, int]]  # (first block, count)
SCATTER_MIN = 16 << 10  # host pieces smaller than this on average: gather instead
# Head-slice pieces smaller than this are packed rather than sent as one view each: a
# strided copy per run costs less than a Python view and an iovec per piece. Server side
# of a 256 MiB HND read over a socketpair, dev VM: CPU 38 ms (views) against 31 ms
# (pack) for 16 KiB pieces, 31 against 29 for 32 KiB, 28 and 28 for 64 KiB.
HEAD_SCATTER_MIN = 64 << 10
# Staged host chunks whose runs average this many bytes or more are copied run by run
# (a slice copy each, ~2 us of Python); fewer per run, one fancy-indexed copy per region.
RUN_COPY_MIN = 16 << 10


class RegisteredMemory:
    """Byte-level access to one KVLayout's blocks.

    Args:
        layout: the registered layout.
        staged: move host memory through a contiguous staging buffer too (CUDA memory
            always is); lets a host-only machine exercise the CUDA code path.
    """

    def __init__(self, layout: KVLayout, staged: bool = False) -> None:
        self.layout = layout
        self.num_layers = layout.num_layers
        self.num_blocks = layout.num_blocks
        self.num_parts = len(layout.parts)
        self.block_bytes = layout.block_bytes
        self.layer_block_bytes = self.block_bytes * self.num_parts
        self.descriptor_bytes = layout.descriptor.to_bytes()
        self.is_host = layout.device.type == "cpu"
        self.staged = staged or not self.is_host
        # Every region stores its blocks back to back: a run of blocks is one buffer.
        self.dense = all(r.block_stride == r.block_bytes for r in layout.regions)
        self._local = threading.local()  # per backend thread: its CUDA stream
        self._arrays: dict[tuple, np.ndarray] = {}  # (region, pieces) -> numpy view (host)
        # Host regions: a flat byte view of each region's storage and the offset of block 0.
        self._views: list[memoryview] = []
        self._offsets: list[int] = []
        self._strides: list[int] = []
        if self.is_host:
            for region in layout.regions:
                storage = torch.empty(0, dtype=torch.uint8).set_(region.view.untyped_storage())
                self._views.append(memoryview(storage.numpy()).cast("B"))
                self._offsets.append(region.view.storage_offset() * region.view.element_size())
                self._strides.append(region.block_stride)

    # ------------------------------------------------------------------ checks
    def segments(self, heads: HeadRange | None) -> Segments:
        """Where heads ``[h0, h1)`` lie in each block (the whole block for None).

        Raises:
            BlockOutOfRange: a head range outside our heads, or any for MLA.
        """
        try:
            return block_segments(self.layout.descriptor, heads)
        except LayoutMismatch as exc:
            raise BlockOutOfRange(str(exc)) from None

    def check(self, layers: Sequence[int], runs: Runs, heads: HeadRange | None = None) -> int:
        """Validate a chunk against the layout; returns its size in bytes.

        Raises:
            BlockOutOfRange: a layer, block or head range is outside the layout, layers
                are not strictly ascending, a block is named twice (overlapping runs), or
                the chunk is larger than one frame may carry. Checked before any work.
        """
        seg = self.segments(heads)
        prev = -1
        for layer in layers:
            if not prev < layer < self.num_layers:
                raise BlockOutOfRange(f"layer {layer} is out of range [0, {self.num_layers}) "
                                      "or out of order")
            prev = layer
        blocks = 0
        for start, count in runs:
            if count <= 0 or start < 0 or start + count > self.num_blocks:
                raise BlockOutOfRange(f"blocks [{start}, {start + count}) outside the "
                                      f"registered [0, {self.num_blocks})")
            blocks += count
        if blocks > self.num_blocks:  # cheap bound first: at most the whole cache
            raise BlockOutOfRange(f"a chunk of {blocks} blocks names some of the "
                                  f"registered {self.num_blocks} more than once")
        nbytes = blocks * seg.count * seg.nbytes * self.num_parts * len(layers)
        if nbytes > MAX_CHUNK_BYTES:
            raise BlockOutOfRange(f"a chunk of {nbytes} bytes exceeds the limit of "
                                  f"{MAX_CHUNK_BYTES} per chunk")
        end = -1
        for start, count in sorted(runs):
            if start < end:
                raise BlockOutOfRange(f"block {start} is named more than once in one chunk")
            end = start + count
        return nbytes

    def check_peer(self, raw_descriptor: bytes) -> LayoutDescriptor:
        """Decode a peer's layout descriptor and check it can exchange blocks with ours.

        Raises:
            LayoutMismatch: naming the first differing field.
        """
        theirs = LayoutDescriptor.from_bytes(raw_descriptor)
        self.layout.descriptor.check_compatible(theirs)
        return theirs

    def stages(self, runs: Runs, heads: HeadRange | None = None) -> bool:
        """Whether a chunk goes through a contiguous staging buffer rather than
        scatter-gather I/O: always when ``staged`` (CUDA memory, UCX), and for host
        memory when its pieces would average under ``SCATTER_MIN`` bytes (SGLang's page
        size 1, scattered slots), where one Python view per piece costs more than a
        gather by the packing code. A head slice is one piece per block (HND) or per
        token (NHD), packed below ``HEAD_SCATTER_MIN`` bytes (a strided copy per run)."""
        if self.staged:
            return True
        blocks = sum(n for _, n in runs)
        if heads is not None:
            seg = self.segments(heads)
            return seg.nbytes < HEAD_SCATTER_MIN
        pieces = len(runs) if self.dense else blocks
        return blocks * self.block_bytes < SCATTER_MIN * pieces

    # ---------------------------------------------------------- host (zero copy)
    def host_buffers(self, layers: Sequence[int], runs: Runs,
                     heads: HeadRange | None = None) -> list[memoryview]:
        """Memoryviews over the chunk's bytes in wire order (host memory only)."""
        if not self.is_host:
            raise LayoutMismatch("host_buffers() needs host memory", field="device")
        if heads is not None:
            return self._head_buffers(layers, runs, self.segments(heads))
        out: list[memoryview] = []
        bb = self.block_bytes
        for layer in layers:
            for r in range(layer * self.num_parts, (layer + 1) * self.num_parts):
                view, base, stride = self._views[r], self._offsets[r], self._strides[r]
                for start, count in runs:
                    off = base + start * stride
                    if stride == bb:
                        out.append(view[off:off + count * bb])
                    else:
                        out.extend(view[off + i * stride:off + i * stride + bb]
                                   for i in range(count))
        return out

    def _head_buffers(self, layers: Sequence[int], runs: Runs,
                      seg: Segments) -> list[memoryview]:
        out: list[memoryview] = []
        for layer in layers:
            for r in range(layer * self.num_parts, (layer + 1) * self.num_parts):
                view, base, stride = self._views[r], self._offsets[r], self._strides[r]
                for start, count in runs:
                    for b in range(start, start + count):
                        off = base + b * stride + seg.offset
                        out.extend(view[off + s * seg.pitch:off + s * seg.pitch + seg.nbytes]
                                   for s in range(seg.count))
        return out

    # ------------------------------------------------------------------ staged
    @staticmethod
    def _block_ids(runs: Runs) -> torch.Tensor:
        """The runs' block ids in order, without a Python step per block or run."""
        table = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
        starts, counts = table[:, 0], table[:, 1]
        first = np.cumsum(counts) - counts  # where each run begins among the ids
        ids = np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(starts - first, counts)
        return torch.from_numpy(ids)

    def pack_into(self, layers: Sequence[int], runs: Runs, out: torch.Tensor,
                  heads: HeadRange | None = None) -> None:
        """Copy the chunk into the contiguous uint8 tensor ``out`` (its first bytes)."""
        self._stage(layers, runs, out, into_blocks=False, heads=heads)

    def unpack_from(self, layers: Sequence[int], runs: Runs, src: torch.Tensor,
                    heads: HeadRange | None = None) -> None:
        """Scatter the contiguous uint8 tensor ``src`` into the chunk's blocks (only the
        pieces of ``heads``, when given: the block's other heads are left as they are)."""
        self._stage(layers, runs, src, into_blocks=True, heads=heads)

    def _stage(self, layers: Sequence[int], runs: Runs, packed: torch.Tensor,
               into_blocks: bool, heads: HeadRange | None = None) -> None:
        """Blocks <-> a packed chunk. Host blocks in long runs: one memcpy per run (the
        same bytes as the packing module's, without a torch call per region, which
        costs more than the copy when a chunk holds few blocks). Scattered host blocks
        and head slices: strided numpy copies per region (:meth:`_gather_host`). CUDA
        blocks: the packing kernel on the calling thread's own stream, waited for (that
        stream only) before the chunk is read or the blocks used."""
        if not runs:  # a write of no blocks (a notify alone) moves nothing
            return
        few_pieces = heads is None and self.dense and \
            len(runs) * SCATTER_MIN <= sum(n for _, n in runs) * self.block_bytes
        if self.is_host and packed.device.type == "cpu" and few_pieces:
            buf = memoryview(packed.numpy()).cast("B")
            off = 0
            for view in self.host_buffers(layers, runs):
                n = view.nbytes
                if into_blocks:
                    view[:] = buf[off:off + n]
                else:
                    buf[off:off + n] = view
                off += n
            return
        if self.is_host:
            self._gather_host(layers, runs, packed, into_blocks, self.segments(heads))
            return
        from .packing import pack, packed_nbytes, unpack

        ids = self._block_ids(runs)
        chunk = packed[:packed_nbytes(self.layout, len(ids), layers, heads)]
        # CUDA: on this thread's own stream, never the engine's; wait for this copy only
        # (a transport reads the chunk next, or the engine may use the blocks).
        stream = self.thread_stream()
        with torch.cuda.stream(stream):
            (unpack(self.layout, ids, layers, chunk, heads=heads) if into_blocks
             else pack(self.layout, ids, layers, out=chunk, heads=heads))
        stream.synchronize()

    def _gather_host(self, layers: Sequence[int], runs: Runs, packed: torch.Tensor,
                     into_blocks: bool, seg: Segments) -> None:
        """Scattered host blocks or head pieces <-> a packed chunk, strided numpy
        copies per region (:func:`_copy_blocks`). Not torch: its copies fan out to
        OpenMP threads, which on a loaded host wait for cores (32 ms against 0.3 ms per
        4 MiB chunk measured here)."""
        ids = self._block_ids(runs).numpy()
        n, bb = len(ids), seg.count * seg.nbytes  # bb: bytes of one block's selection
        out = packed.numpy()
        off = 0
        for layer in layers:
            for r in range(layer * self.num_parts, (layer + 1) * self.num_parts):
                blocks = self._block_array(r, seg)
                piece = out[off:off + n * bb].view(blocks.dtype).reshape(n, *blocks.shape[1:])
                _copy_blocks(blocks, piece, runs, ids, into_blocks)
                off += n * bb

    def unpack_picked(self, layers: Sequence[int], runs: Runs, src: torch.Tensor,
                      heads: HeadRange | None, src_block_bytes: int, picked: Segments) -> None:
        """Place heads read as a peer's *whole* blocks (NIXL's over-read of small head
        pieces): ``src`` holds, in packed chunk order (layer, part, block), one
        ``src_block_bytes`` block of the peer per block of the chunk; the pieces
        ``picked`` of each (the peer's segments of the heads we share) go into our
        pieces of ``heads``, one strided numpy copy per region and run. The rest of
        ``src`` (heads we do not hold) is not read, and our other heads and blocks are
        not touched::

            src:  | peer block b0: [tok0: h0..hN][tok1: h0..hN]... | peer block b1 | ...
                                     ^^^^ picked, pitch apart
            ours: | block l0: [tok0: heads][tok1: heads]... |      (our segments)

        Host memory only.

        Raises:
            LayoutMismatch: CUDA memory, or ``picked`` cut otherwise than our pieces.
        """
        seg = self.segments(heads)
        if not self.is_host or src.device.type != "cpu":
            raise LayoutMismatch("unpack_picked() needs host memory", field="device")
        if (picked.count, picked.nbytes) != (seg.count, seg.nbytes):
            raise LayoutMismatch(f"pieces {picked} do not pair with ours {seg}", field="heads")
        ids = self._block_ids(runs).numpy()
        n = len(ids)
        raw = src.numpy()
        off = 0
        for layer in layers:
            for r in range(layer * self.num_parts, (layer + 1) * self.num_parts):
                blocks = self._block_array(r, seg)
                word = next(w for w in (8, 4, 2, 1) if blocks.itemsize % w == 0 and (
                    off + picked.offset) % w == 0 and picked.pitch % w == 0 and
                    src_block_bytes % w == 0)
                blocks = blocks.view(f"<u{word}")
                got = np.ndarray((n, seg.count, seg.nbytes // word), dtype=blocks.dtype,
                                 buffer=raw, offset=off + picked.offset,
                                 strides=(src_block_bytes, picked.pitch, word))
                _copy_blocks(blocks, got, runs, ids, True)
                off += n * src_block_bytes

    def _block_array(self, r: int, seg: Segments) -> np.ndarray:
        """Region ``r`` as a numpy ``[num_blocks, segments, words]`` view over the
        engine's memory (each block's pieces ``seg``), in the widest word its offsets,
        strides and sizes allow."""
        key = (r, seg)
        cached = self._arrays.get(key)
        if cached is None:
            base, stride = self._offsets[r] + seg.offset, self._strides[r]
            word = next(w for w in (8, 4, 2, 1) if base % w == 0 and stride % w == 0
                        and seg.nbytes % w == 0 and seg.pitch % w == 0)
            cached = self._arrays[key] = np.ndarray(
                (self.num_blocks, seg.count, seg.nbytes // word), dtype=f"<u{word}",
                buffer=self._views[r], offset=base, strides=(stride, seg.pitch, word))
        return cached

    def thread_stream(self) -> "torch.cuda.Stream":
        """The calling backend thread's own CUDA stream on the cache's device."""
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.layout.device)
        return stream

    def staging_buffer(self, nbytes: int) -> torch.Tensor:
        """A host buffer for staged chunks: pinned when the KV cache is on a GPU."""
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=not self.is_host)


def _copy_blocks(blocks: np.ndarray, packed: np.ndarray, runs: Runs, ids: np.ndarray,
                 into_blocks: bool) -> None:
    """``packed[k]`` <-> ``blocks[ids[k]]`` (``ids``: the runs' blocks in order): one
    slice copy per run when runs average ``RUN_COPY_MIN`` bytes or more, else one
    fancy-indexed copy (0.86 against 0.54 ms per 4 MiB head-sliced NHD chunk in one
    run, measured here). Never ``np.take`` from a strided ``blocks`` (a head slice, a
    padded region): it first copies the *whole* region contiguous (1.5 ms)."""
    if len(runs) * RUN_COPY_MIN <= packed.nbytes:
        k = 0
        for start, count in runs:
            if into_blocks:
                blocks[start:start + count] = packed[k:k + count]
            else:
                packed[k:k + count] = blocks[start:start + count]
            k += count
    elif into_blocks:
        blocks[ids] = packed
    elif blocks.flags.c_contiguous:
        np.take(blocks, ids, axis=0, out=packed)
    else:
        packed[...] = blocks[ids]

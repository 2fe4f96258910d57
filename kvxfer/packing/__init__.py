"""Gather the blocks of many layers into one contiguous chunk, and scatter one back.

Theory of operation
-------------------
A transfer of B blocks over L layers touches 2*L*B scattered block slots (K and V). A
backend would rather send a few large buffers, so :func:`pack` gathers those slots into
one contiguous chunk and :func:`unpack` scatters a received chunk into the blocks the
receiver named. The chunk's byte order is what the wire protocol carries, so both sides
must agree on it exactly::

    packed chunk, layers = (l0 < l1 < ...), parts = ("K", "V") or ("L",) for MLA
    +--------------------------- layer l0 ----------------------------+-- layer l1 --+
    |             part K               |             part V           |  K ...  V ...|
    | blk ids[0] | blk ids[1] | ...    | blk ids[0] | blk ids[1] | ...|              |
    +------------+------------+--------+------------+------------+----+--------------+
      <- S ->                            S = bytes of one block's selection

    offset of (layer i, part p, block j) = ((i * len(parts) + p) * B + j) * S

``i`` counts the requested layers (ascending), ``j`` the block ids in the order given.
Without ``heads`` a block's selection is its whole ``block_bytes``. With
``heads=(h0, h1)`` it is heads ``[h0, h1)`` of every token, in the block's own order::

    NHD block [tokens][heads][head_dim]      HND block [heads][tokens][head_dim]
    tok0: h0..h1-1, tok1: h0..h1-1, ...      h0: tok0..tokT-1, h0+1: ..., h1-1: ...
    S = block_size * (h1-h0) * head_dim * elem (both orders)

so two sides with different tensor-parallel sizes exchange the heads they share. MLA
layouts have no heads; asking for a slice of one is an error.

Where it runs: KV caches in CUDA memory go through one launch of ``kvxfer/csrc/
kv_pack.cu`` (cupy, compiled at run time, see :mod:`kvxfer.packing.cuda`), into a device
buffer or pinned host memory; CPU caches go through the torch reference
(:mod:`kvxfer.packing.reference`), one index_select / index_copy_ per (layer, part).
Without cupy a CUDA cache falls back to the torch reference on the device, with one
warning. Everything is validated (:mod:`kvxfer.packing.pack_plan`) before a byte is written.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..layout import KVLayout
from ..logs import get_logger
from . import cuda as _cuda
from .pack_plan import BlockIds, PackPlan, check_buffer, make_plan, segment_geometry
from .reference import pack_reference, unpack_reference

__all__ = ["pack", "unpack", "packed_nbytes"]

_log = get_logger(__name__)
_warned_fallback = False


def packed_nbytes(layout: KVLayout, num_blocks: int, layers: Sequence[int] | None = None,
                  heads: tuple[int, int] | None = None) -> int:
    """Bytes of the chunk that :func:`pack` makes for ``num_blocks`` block ids.

    Args:
        layout: the KV cache's layout.
        num_blocks: how many block ids the chunk holds.
        layers: layer indices (all for None).
        heads: ``(h0, h1)`` to count only heads ``[h0, h1)``.

    Returns:
        ``num_blocks * len(layers) * len(layout.parts) * selection bytes per block``.

    Raises:
        BlockOutOfRange: a layer outside the layout.
        LayoutMismatch: a bad head range, or heads for an MLA layout.
        ValueError: a negative ``num_blocks``.
    """
    if num_blocks < 0:
        raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
    num_layers = len(layout.normalize_layers(layers))
    num_segs, _, _, seg_bytes = segment_geometry(layout, heads)
    return num_blocks * num_layers * len(layout.parts) * num_segs * seg_bytes


def _use_kernel(layout: KVLayout) -> bool:
    global _warned_fallback
    if layout.device.type != "cuda":
        return False
    if _cuda.available():
        return True
    if not _warned_fallback:
        _warned_fallback = True
        _log.warning("kvxfer.packing: cupy is unavailable, packing CUDA memory with the "
                     "slower torch reference; install it with: pip install 'kvxfer[cuda]'")
    return False


def pack(layout: KVLayout, block_ids: BlockIds, layers: Sequence[int] | None = None,
         out: torch.Tensor | None = None,
         heads: tuple[int, int] | None = None) -> torch.Tensor:
    """Gather blocks of the given layers into one contiguous chunk (order: module doc).

    Args:
        layout: the KV cache's layout.
        block_ids: block ids, a sequence of ints or an integer tensor, in packed order;
            any order, repeats allowed.
        layers: layer indices (all for None); packed in ascending order.
        out: where to write, a contiguous uint8 tensor of :func:`packed_nbytes` bytes on
            the cache's device, or pinned host memory for a CUDA cache; allocated on the
            cache's device if None.
        heads: ``(h0, h1)``: pack only heads ``[h0, h1)`` of every token.

    Returns:
        ``out`` (or the new chunk). For a CUDA cache the copy is queued on torch's
        current stream: synchronize before reading a pinned-host ``out`` from the CPU.

    Raises:
        BlockOutOfRange: a block id or layer outside the layout.
        LayoutMismatch: a bad head range, heads for MLA, or an ``out`` of the wrong
            size, dtype, device or contiguity (a ValueError).
        ValueError: block ids that are not a 1-D sequence of integers.
    """
    plan = make_plan(layout, block_ids, layers, heads)
    if out is None:
        out = torch.empty(plan.nbytes, dtype=torch.uint8, device=layout.device)
    check_buffer(layout, plan, out, "out")
    _run(layout, plan, out, gather=True)
    return out


def unpack(layout: KVLayout, block_ids: BlockIds, layers: Sequence[int] | None,
           src: torch.Tensor, heads: tuple[int, int] | None = None) -> None:
    """Scatter a chunk made by :func:`pack` into the layout's blocks.

    Args:
        layout: the KV cache's layout (written to).
        block_ids: where each packed block goes, in packed order; no repeats.
        layers: layer indices the chunk holds (all for None), ascending in the chunk.
        src: the chunk, a contiguous uint8 tensor of :func:`packed_nbytes` bytes on the
            cache's device, or pinned host memory for a CUDA cache.
        heads: ``(h0, h1)``: the chunk holds heads ``[h0, h1)`` only; the other heads of
            the blocks are left as they are.

    Raises:
        BlockOutOfRange: a block id or layer outside the layout.
        LayoutMismatch: a bad head range, heads for MLA, or a ``src`` of the wrong size,
            dtype, device or contiguity (a ValueError).
        ValueError: repeated block ids, or ids that are not a 1-D sequence of integers.
    """
    plan = make_plan(layout, block_ids, layers, heads, unique=True)
    check_buffer(layout, plan, src, "src")
    _run(layout, plan, src, gather=False)


def _run(layout: KVLayout, plan: PackPlan, packed: torch.Tensor, gather: bool) -> None:
    if _use_kernel(layout):
        _cuda.run(layout, plan, packed, gather)
    elif gather:
        pack_reference(plan, packed)
    else:
        unpack_reference(plan, packed)

"""PackPlan: one validated description of a pack or unpack, shared by both implementations.

Everything a caller can get wrong is checked here, before either implementation touches
a byte: block ids, layers, the head range, and the packed buffer's size, dtype, device
and contiguity. The torch reference and the CUDA kernel then only read the plan.

A plan describes every block the same way, as ``num_segs`` segments of ``seg_bytes``
bytes, the first ``seg_off`` bytes into the block and ``seg_pitch`` bytes apart::

    whole block (any order)      S = 1          seg_off = 0         seg_bytes = block_bytes
    NHD, heads [h0, h1)          S = block_size seg_off = h0*H_B    seg_bytes = (h1-h0)*H_B
                                 seg_pitch = heads*H_B   (one segment per token)
    HND, heads [h0, h1)          S = 1          seg_off = h0*T*H_B  seg_bytes = (h1-h0)*T*H_B

    H_B = head_dim * element size (bytes of one head of one token), T = block_size
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import operator

import torch

from ..errors import BlockOutOfRange, LayoutMismatch
from ..heads import block_segments
from ..layout import KVLayout, Region

BlockIds = Union[Sequence[int], torch.Tensor]


@dataclass(frozen=True, slots=True)
class PackPlan:
    """What to move: regions in packed order, block ids, and the per-block segments."""

    regions: tuple[Region, ...]  # (layer, part) in packed order: layers ascending, then parts
    layers: tuple[int, ...]
    ids: torch.Tensor  # int64, on the CPU, 1-D, range-checked
    num_segs: int  # segments per block
    seg_off: int  # bytes from a block's start to its first segment
    seg_pitch: int  # bytes from one segment's start to the next
    seg_bytes: int  # bytes of one segment

    @property
    def num_ids(self) -> int:
        return int(self.ids.numel())

    @property
    def region_nbytes(self) -> int:
        """Packed bytes of one region: every block's segments."""
        return self.num_ids * self.num_segs * self.seg_bytes

    @property
    def nbytes(self) -> int:
        return self.region_nbytes * len(self.regions)


def widest_word(values: Sequence[int], widths: Sequence[int] = (16, 8, 4, 2, 1)) -> int:
    """The largest width in ``widths`` (descending) dividing every value (bytes)."""
    return next(w for w in widths if all(v % w == 0 for v in values))


def segment_geometry(layout: KVLayout, heads: tuple[int, int] | None) -> tuple[int, int, int, int]:
    """``(num_segs, seg_off, seg_pitch, seg_bytes)`` of a block, whole or head-sliced
    (:func:`kvxfer.heads.block_segments`, which NIXL descriptor lists share).

    Raises:
        LayoutMismatch: heads given for an MLA layout, or not ``0 <= h0 < h1 <= heads``.
    """
    seg = block_segments(layout.descriptor, heads)
    return seg.count, seg.offset, seg.pitch, seg.nbytes


def block_id_tensor(layout: KVLayout, block_ids: BlockIds) -> torch.Tensor:
    """Block ids as a 1-D int64 CPU tensor, each checked to be in [0, num_blocks).

    Raises:
        BlockOutOfRange: an id outside the layout.
        ValueError: ids that are not integers or not one-dimensional.
    """
    if isinstance(block_ids, torch.Tensor):
        if block_ids.dtype.is_floating_point or block_ids.dtype.is_complex \
                or block_ids.dtype == torch.bool:
            raise ValueError(f"block ids must be integers, got a {block_ids.dtype} tensor")
        ids = block_ids.detach().to("cpu", torch.int64)
    else:
        try:
            ids = torch.as_tensor([operator.index(b) for b in block_ids], dtype=torch.int64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"block ids must be integers: {exc}") from exc
    if ids.dim() != 1:
        raise ValueError(f"block ids must be one-dimensional, got shape {tuple(ids.shape)}")
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= layout.num_blocks:
            bad = lo if lo < 0 else hi
            raise BlockOutOfRange(f"block id {bad} outside [0, {layout.num_blocks})")
    return ids.contiguous()


def make_plan(layout: KVLayout, block_ids: BlockIds, layers: Sequence[int] | None,
              heads: tuple[int, int] | None, *, unique: bool = False) -> PackPlan:
    """Validate a request and describe it.

    Args:
        unique: refuse repeated block ids (unpack: two copies of one block would race).

    Raises:
        BlockOutOfRange, LayoutMismatch, ValueError: see :func:`kvxfer.packing.pack`.
    """
    layer_idx = layout.normalize_layers(layers)
    ids = block_id_tensor(layout, block_ids)
    if unique and ids.numel() and int(torch.unique(ids).numel()) != ids.numel():
        raise ValueError("block ids repeat: unpack would write one block twice")
    num_segs, seg_off, seg_pitch, seg_bytes = segment_geometry(layout, heads)
    regions = tuple(layout.region(layer, part) for layer in layer_idx for part in layout.parts)
    return PackPlan(regions=regions, layers=layer_idx, ids=ids, num_segs=num_segs,
                    seg_off=seg_off, seg_pitch=seg_pitch, seg_bytes=seg_bytes)


def check_buffer(layout: KVLayout, plan: PackPlan, buf: torch.Tensor, what: str) -> None:
    """Check that ``buf`` can hold the packed bytes of ``plan`` for this layout.

    Raises:
        LayoutMismatch: wrong type, dtype, size, contiguity or device.
    """
    if not isinstance(buf, torch.Tensor):
        raise LayoutMismatch(f"{what} must be a torch.Tensor, got {type(buf).__name__}",
                             field="type")
    if buf.dtype != torch.uint8:
        raise LayoutMismatch(f"{what} must be uint8, got {buf.dtype}", field="dtype")
    if buf.numel() != plan.nbytes:
        raise LayoutMismatch(f"{what} holds {buf.numel()} bytes; {plan.num_ids} blocks x "
                             f"{len(plan.regions)} regions need {plan.nbytes}", field="size")
    if not buf.is_contiguous():
        raise LayoutMismatch(f"{what} must be contiguous", field="stride")
    dev = layout.device
    if buf.device == dev or (dev.type == "cuda" and buf.device.type == "cuda"
                             and dev.index is None):
        return
    if dev.type == "cuda" and buf.device.type == "cpu":
        if buf.is_pinned():
            return
        raise LayoutMismatch(f"{what} is in pageable host memory; the KV cache is on {dev}: "
                             f"pass a CUDA tensor or a pinned one (tensor.pin_memory())",
                             field="device")
    raise LayoutMismatch(f"{what} is on {buf.device}, the KV cache on {dev}", field="device")

"""Torch reference for pack/unpack: one index_select / index_copy_ per region.

Each region is seen as bytes, ``[num_blocks, num_segs, seg_pitch]`` narrowed to the
segment ``[seg_off, seg_off + seg_bytes)``; the packed chunk of a region is the same
shape made contiguous with one row per requested block. This runs on any device torch
supports (it is the CPU path, and the CUDA fallback when cupy is missing), except that
a CUDA cache with a pinned-host chunk is staged through a device buffer.
"""

from __future__ import annotations

import torch

from ..layout import Region
from .plan import PackPlan


def _segments(region: Region, plan: PackPlan) -> torch.Tensor:
    """``[num_blocks, num_segs, seg_bytes]`` uint8 view of a region's selected bytes."""
    blocks = region.view.view(torch.uint8).flatten(1)  # [num_blocks, block_bytes]
    if plan.num_segs == 1:
        return blocks.narrow(1, plan.seg_off, plan.seg_bytes).unsqueeze(1)
    rows = blocks.unflatten(1, (plan.num_segs, plan.seg_pitch))
    return rows.narrow(2, plan.seg_off, plan.seg_bytes)


def _chunks(plan: PackPlan, packed: torch.Tensor) -> list[torch.Tensor]:
    """The packed buffer cut into one ``[num_ids, num_segs, seg_bytes]`` piece per region."""
    shape = (len(plan.regions), plan.num_ids, plan.num_segs, plan.seg_bytes)
    return list(packed.view(shape).unbind(0))


def _staged(plan: PackPlan, packed: torch.Tensor) -> bool:
    return plan.regions[0].view.device != packed.device


def pack_reference(plan: PackPlan, out: torch.Tensor) -> None:
    """Gather the plan's blocks into ``out`` (validated, ``plan.nbytes`` uint8 bytes)."""
    if plan.nbytes == 0:
        return
    dev = plan.regions[0].view.device
    target = torch.empty(plan.nbytes, dtype=torch.uint8, device=dev) if _staged(plan, out) else out
    ids = plan.ids.to(dev)
    for region, chunk in zip(plan.regions, _chunks(plan, target)):
        torch.index_select(_segments(region, plan), 0, ids, out=chunk)
    if target is not out:
        out.copy_(target)


def unpack_reference(plan: PackPlan, src: torch.Tensor) -> None:
    """Scatter ``src`` (validated, ``plan.nbytes`` uint8 bytes) into the plan's blocks."""
    if plan.nbytes == 0:
        return
    dev = plan.regions[0].view.device
    if _staged(plan, src):
        src = src.to(dev)
    ids = plan.ids.to(dev)
    for region, chunk in zip(plan.regions, _chunks(plan, src)):
        _segments(region, plan).index_copy_(0, ids, chunk)

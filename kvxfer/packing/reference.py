"""Torch reference for pack/unpack: one index_select / index_put_ per region.

Each region is seen as words, ``[num_blocks, num_segs, seg_pitch]`` narrowed to the
segment ``[seg_off, seg_off + seg_bytes)``; the packed chunk of a region is the same
shape made contiguous with one row per requested block. Words are the widest integer
type (8, 4, 2 or 1 bytes) that every offset and length allows: moving int64 instead of
bytes makes the scatter about 10x faster on a CPU. This runs on any device torch
supports (it is the CPU path, and the CUDA fallback when cupy is missing), except that
a CUDA cache with a pinned-host chunk is staged through a device buffer.
"""

from __future__ import annotations

import torch

from ..layout import Region
from .pack_plan import PackPlan, widest_word

_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _word(plan: PackPlan, packed: torch.Tensor) -> int:
    """Bytes per word: what torch's dtype views of every region and the chunk allow."""
    values = [plan.seg_off, plan.seg_pitch, plan.seg_bytes, packed.storage_offset()]
    for r in plan.regions:
        values += [r.block_stride, r.block_bytes, r.view.storage_offset() * r.view.element_size()]
    return widest_word(values, tuple(_WORDS))


def _segments(region: Region, plan: PackPlan, word: int) -> torch.Tensor:
    """``[num_blocks, num_segs, seg_words]`` view of a region's selected words."""
    blocks = region.view.view(torch.uint8).flatten(1).view(_WORDS[word])  # [blocks, words]
    off, size = plan.seg_off // word, plan.seg_bytes // word
    if plan.num_segs == 1:
        return blocks.narrow(1, off, size).unsqueeze(1)
    return blocks.unflatten(1, (plan.num_segs, plan.seg_pitch // word)).narrow(2, off, size)


def _chunks(plan: PackPlan, packed: torch.Tensor, word: int) -> list[torch.Tensor]:
    """The packed buffer cut into one ``[num_ids, num_segs, seg_words]`` piece per region."""
    shape = (len(plan.regions), plan.num_ids, plan.num_segs, plan.seg_bytes // word)
    return list(packed.view(_WORDS[word]).view(shape).unbind(0))


def _staged(plan: PackPlan, packed: torch.Tensor) -> bool:
    return plan.regions[0].view.device != packed.device


def pack_reference(plan: PackPlan, out: torch.Tensor) -> None:
    """Gather the plan's blocks into ``out`` (validated, ``plan.nbytes`` uint8 bytes)."""
    if plan.nbytes == 0:
        return
    dev = plan.regions[0].view.device
    target = torch.empty(plan.nbytes, dtype=torch.uint8, device=dev) if _staged(plan, out) else out
    ids, word = plan.ids.to(dev), _word(plan, target)
    for region, chunk in zip(plan.regions, _chunks(plan, target, word)):
        torch.index_select(_segments(region, plan, word), 0, ids, out=chunk)
    if target is not out:
        out.copy_(target)


def unpack_reference(plan: PackPlan, src: torch.Tensor) -> None:
    """Scatter ``src`` (validated, ``plan.nbytes`` uint8 bytes) into the plan's blocks.

    Block ids must not repeat (the plan of :func:`kvxfer.packing.unpack` ensures it):
    index_put_ leaves the winner of a repeated index unspecified.
    """
    if plan.nbytes == 0:
        return
    dev = plan.regions[0].view.device
    if _staged(plan, src):
        src = src.to(dev)
    ids, word = plan.ids.to(dev), _word(plan, src)
    for region, chunk in zip(plan.regions, _chunks(plan, src, word)):
        _segments(region, plan, word).index_put_((ids,), chunk)

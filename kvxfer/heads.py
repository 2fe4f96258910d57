"""Tensor-parallel KV head shards, and which heads two differently sharded peers share.

Theory of operation
-------------------
A model has ``total_kv_heads`` KV heads; a worker at tensor-parallel rank ``r`` of
``tp_size`` holds a contiguous range of them (vLLM's and SGLang's rule)::

    tp_size <= total (8 heads, TP 2)      tp_size > total (GQA replication, 8 heads, TP 16)
    rank 0: heads 0-3  rank 1: heads 4-7  rank 2k and 2k+1 both hold head k

A block of one (layer, part) holds every token of the worker's heads. Two peers with the
same model geometry but other shards exchange the heads both hold, their intersection;
each side addresses them as a range of its *own* heads::

    global heads   0 1 2 3 4 5 6 7
    peer (TP 1)    [0 . . . . . . 7]      remote slice [4, 8) of its 8 heads
    us (TP 2, r1)          [4 . . 7]      local slice  [0, 4) of our 4 = all: None
    shared                  4 5 6 7

:class:`HeadExchange` is that answer; ``None`` for a side means "the whole block", so
homogeneous peers move whole blocks as before. :func:`block_segments` says where a head
range lies inside a block (one contiguous piece in HND, one piece per token in NHD),
from a descriptor alone, for the packing code and for NIXL descriptor lists. Nothing
here imports torch or touches memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import LayoutMismatch

if TYPE_CHECKING:
    from .layout import LayoutDescriptor

HeadRange = tuple[int, int]  # [h0, h1) of one side's own heads


@dataclass(frozen=True, slots=True)
class HeadShard:
    """The global KV heads one tensor-parallel worker holds: ``[first, first + count)``."""

    first: int
    count: int
    total: int  # KV heads of the model


def shard_heads(tp_rank: int, tp_size: int, total_kv_heads: int) -> HeadShard:
    """The KV heads rank ``tp_rank`` of ``tp_size`` holds of a model's ``total_kv_heads``.

    Args:
        tp_rank: this worker's tensor-parallel rank, in ``[0, tp_size)``.
        tp_size: tensor-parallel size; divides ``total_kv_heads`` or is a multiple of it
            (then ``tp_size // total_kv_heads`` ranks hold each head, GQA replication).
        total_kv_heads: KV heads of the model.

    Returns:
        The shard: ``total // tp_size`` heads from ``tp_rank * that``, or one head,
        ``tp_rank // (tp_size // total)``, when heads are replicated.

    Raises:
        LayoutMismatch: a rank outside ``[0, tp_size)`` (field ``tp_rank``), or sizes
            that do not divide (field ``tp_size``).
    """
    for name, value in (("tp_size", tp_size), ("total_kv_heads", total_kv_heads)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise LayoutMismatch(f"{name} must be a positive int, got {value!r}", field=name)
    if not isinstance(tp_rank, int) or isinstance(tp_rank, bool) or not 0 <= tp_rank < tp_size:
        raise LayoutMismatch(f"tp_rank must be in [0, {tp_size}), got {tp_rank!r}",
                             field="tp_rank")
    if tp_size <= total_kv_heads:
        if total_kv_heads % tp_size:
            raise LayoutMismatch(f"{total_kv_heads} KV heads do not split evenly over "
                                 f"tp_size {tp_size}", field="tp_size")
        per_rank = total_kv_heads // tp_size
        return HeadShard(tp_rank * per_rank, per_rank, total_kv_heads)
    if tp_size % total_kv_heads:
        raise LayoutMismatch(f"tp_size {tp_size} is not a multiple of the {total_kv_heads} KV "
                             "heads it replicates", field="tp_size")
    return HeadShard(tp_rank // (tp_size // total_kv_heads), 1, total_kv_heads)


@dataclass(frozen=True, slots=True)
class HeadExchange:
    """Which KV heads this agent and one peer exchange (see the module docstring)."""

    shared: range  # global KV head ids both sides hold
    local: HeadRange | None  # those heads among ours; None: all of ours (whole blocks)
    remote: HeadRange | None  # those heads among the peer's; None: all of theirs
    local_heads: int  # KV heads this agent holds
    remote_heads: int  # KV heads the peer holds

    @property
    def sliced(self) -> bool:
        """Whether either side moves less than its whole blocks."""
        return self.local is not None or self.remote is not None

    def explicit(self) -> tuple[HeadRange, HeadRange]:
        """(local, remote) ranges with "whole" spelled out (NIXL pairs segments, so a
        side that moves all its heads must cut its blocks as the other side does)."""
        return (self.local or (0, self.local_heads), self.remote or (0, self.remote_heads))

    def nbytes(self, whole_bytes: int) -> int:
        """Bytes moved of what ``whole_bytes`` of our whole blocks would be."""
        return whole_bytes * len(self.shared) // self.local_heads


def _own(shared: range, first: int, count: int) -> HeadRange | None:
    lo, hi = shared.start - first, shared.stop - first
    return None if (lo, hi) == (0, count) else (lo, hi)


def exchange_heads(mine: "LayoutDescriptor", theirs: "LayoutDescriptor") -> HeadExchange:
    """The heads two compatible descriptors share, as ranges of each side's own heads.

    Raises:
        LayoutMismatch: the shards share no head (field ``heads``).
    """
    lo = max(mine.head_start, theirs.head_start)
    hi = min(mine.head_start + mine.num_kv_heads, theirs.head_start + theirs.num_kv_heads)
    if lo >= hi:
        raise LayoutMismatch(
            f"the peer holds KV heads [{theirs.head_start}, {theirs.head_start + theirs.num_kv_heads})"
            f" of {theirs.total_kv_heads}, this agent [{mine.head_start}, "
            f"{mine.head_start + mine.num_kv_heads}): they share no head", field="heads")
    shared = range(lo, hi)
    return HeadExchange(shared, _own(shared, mine.head_start, mine.num_kv_heads),
                        _own(shared, theirs.head_start, theirs.num_kv_heads),
                        mine.num_kv_heads, theirs.num_kv_heads)


@dataclass(frozen=True, slots=True)
class Segments:
    """Where a head range lies in a block: ``count`` pieces of ``nbytes``, the first
    ``offset`` bytes in, ``pitch`` bytes apart."""

    count: int
    offset: int
    pitch: int
    nbytes: int


def block_segments(desc: "LayoutDescriptor", heads: HeadRange | None) -> Segments:
    """The pieces of a block that hold heads ``[h0, h1)`` (the whole block for None)::

        whole block (any order)   count 1           offset 0          nbytes block_bytes
        NHD, heads [h0, h1)       count block_size  offset h0*H_B     nbytes (h1-h0)*H_B
                                  pitch heads*H_B  (one piece per token)
        HND, heads [h0, h1)       count 1           offset h0*T*H_B   nbytes (h1-h0)*T*H_B

        H_B: bytes of one head of one token, T: block_size

    Raises:
        LayoutMismatch: heads for an MLA layout, or not ``0 <= h0 < h1 <= heads``
            (field ``heads``).
    """
    if heads is None:
        return Segments(1, 0, desc.block_bytes, desc.block_bytes)
    if desc.block_order == "MLA":
        raise LayoutMismatch("head slicing is undefined for MLA layouts (one latent vector "
                             "per token, no heads)", field="heads")
    try:
        h0, h1 = (int(h) for h in heads)
    except (TypeError, ValueError) as exc:
        raise LayoutMismatch(f"heads must be a pair (h0, h1), got {heads!r}",
                             field="heads") from exc
    if not 0 <= h0 < h1 <= desc.num_kv_heads:
        raise LayoutMismatch(f"head range [{h0}, {h1}) is empty or outside [0, "
                             f"{desc.num_kv_heads})", field="heads")
    head_bytes = desc.block_bytes // (desc.block_size * desc.num_kv_heads)
    if desc.block_order == "NHD":
        pitch = desc.num_kv_heads * head_bytes
        return Segments(desc.block_size, h0 * head_bytes, pitch, (h1 - h0) * head_bytes)
    token_bytes = desc.block_size * head_bytes  # HND: a head is a contiguous run of tokens
    return Segments(1, h0 * token_bytes, desc.block_bytes, (h1 - h0) * token_bytes)

"""Turn a block-id request into chunks of bounded size.

A request pairs local and remote block ids one to one. Pairs that advance by one on
both sides merge into runs ``(local_start, remote_start, count)``. Chunks then group
runs and layers so that each chunk carries at most ``chunk_bytes`` (a single block of a
layer is never split), layer-major so per-layer readiness comes early::

    layers 0..31, runs r0 r1 r2, small request      large request
    chunk 0: layers 0-7  x r0 r1 r2                 chunk 0: layer 0 x r0
    chunk 1: layers 8-15 x r0 r1 r2                 chunk 1: layer 0 x r1 r2
    ...                                             chunk 2: layer 1 x r0 ...
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Sequence

from .errors import BlockOutOfRange
from .protocol.frames import MAX_PAYLOAD as MAX_CHUNK_BYTES

Run = tuple[int, int, int]  # (local_start, remote_start, count)
MAX_RUNS_PER_CHUNK = 65536  # keeps a frame body under 1 MiB
MIN_CHUNK = 256 << 10  # below this, per-chunk overhead outweighs overlap
MAX_BLOCK_ID = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Chunk:
    index: int  # position in the request; the wire's chunk number
    layers: tuple[int, ...]
    runs: tuple[Run, ...]
    nbytes: int

    @property
    def local_runs(self) -> tuple[tuple[int, int], ...]:
        return tuple((lo, n) for lo, _, n in self.runs)

    @property
    def remote_runs(self) -> tuple[tuple[int, int], ...]:
        return tuple((ro, n) for _, ro, n in self.runs)

    @property
    def num_blocks(self) -> int:
        return sum(n for _, _, n in self.runs)


@dataclass(frozen=True, slots=True)
class Message:
    """A part of a write that carries no blocks, only a note for the receiving agent
    (:func:`kvxfer.protocol.frames.encode_note`): a write's notify, or a stream's
    "layer landed" / "finished". It goes after the chunks it announces."""

    index: int  # its number on the wire, after the transfer's chunks
    layer: int | None  # announces this layer's chunks; None: every chunk of the transfer
    note: bytes = b""  # the encoded note; empty: the handle supplies it (handle.note)


def _ids(blocks: Sequence[int], side: str) -> list[int]:
    try:
        ids = [operator.index(b) for b in blocks]
    except TypeError as exc:
        raise TypeError(f"{side} block ids must be integers: {exc}") from None
    for b in ids:
        if not 0 <= b <= MAX_BLOCK_ID:
            raise BlockOutOfRange(f"{side} block id {b} is not a valid block id")
    return ids


def merge_runs(local_blocks: Sequence[int], remote_blocks: Sequence[int]) -> list[Run]:
    """Pair local and remote ids and merge pairs that are contiguous on both sides.

    Raises:
        ValueError: the lists differ in length.
        BlockOutOfRange: an id is negative or too large for the wire.
    """
    local, remote = _ids(local_blocks, "local"), _ids(remote_blocks, "remote")
    if len(local) != len(remote):
        raise ValueError(f"{len(local)} local blocks but {len(remote)} remote blocks")
    runs: list[Run] = []
    for lo, ro in zip(local, remote):
        if runs:
            plo, pro, n = runs[-1]
            if lo == plo + n and ro == pro + n:
                runs[-1] = (plo, pro, n + 1)
                continue
        runs.append((lo, ro, 1))
    return runs


def _split_runs(runs: Sequence[Run], max_blocks: int, max_runs: int) -> list[list[Run]]:
    groups: list[list[Run]] = [[]]
    room = max_blocks
    for lo, ro, n in runs:
        while n:
            if room == 0 or len(groups[-1]) >= max_runs:
                groups.append([])
                room = max_blocks
            take = min(n, room)
            groups[-1].append((lo, ro, take))
            lo, ro, n, room = lo + take, ro + take, n - take, room - take
    return groups if groups[0] else []


def plan_layer_chunks(runs: Sequence[Run], layers: Sequence[int], layer_block_bytes: int,
                      chunk_bytes: int) -> list[Chunk]:
    """Like :func:`plan_chunks`, but every chunk holds exactly one layer, so each layer
    can go as soon as the engine has computed it (a write stream)."""
    chunks: list[Chunk] = []
    for layer in layers:
        for c in plan_chunks(runs, [layer], layer_block_bytes, chunk_bytes):
            chunks.append(Chunk(len(chunks), c.layers, c.runs, c.nbytes))
    return chunks


def chunk_size(total_bytes: int, budget: int, max_inflight: int) -> int:
    """Chunk size for a request: small enough that ~4 windows of ``max_inflight`` chunks
    overlap the peer's sending with our receiving, never below MIN_CHUNK (or the whole
    request) nor above ``budget``."""
    want = total_bytes // (4 * max_inflight)
    return max(1, min(budget, max(want, min(MIN_CHUNK, budget))))


def plan_chunks(runs: Sequence[Run], layers: Sequence[int], layer_block_bytes: int,
                chunk_bytes: int, max_runs: int = MAX_RUNS_PER_CHUNK) -> list[Chunk]:
    """Split (runs x layers) into chunks of at most ``chunk_bytes`` (one block minimum).

    Args:
        runs: merged runs of the request.
        layers: ascending layer indices.
        layer_block_bytes: bytes of one block in one layer, all parts together.
        chunk_bytes: the chunk budget.
    """
    total = sum(n for _, _, n in runs)
    if total == 0 or not layers:
        return []
    per_layer = total * layer_block_bytes
    chunks: list[Chunk] = []
    if per_layer <= chunk_bytes and len(runs) <= max_runs:
        step = max(1, chunk_bytes // per_layer)
        for i in range(0, len(layers), step):
            group = tuple(layers[i:i + step])
            chunks.append(Chunk(len(chunks), group, tuple(runs), per_layer * len(group)))
        return chunks
    groups = _split_runs(runs, max(1, chunk_bytes // layer_block_bytes), max_runs)
    for layer in layers:
        for group in groups:
            nblocks = sum(n for _, _, n in group)
            chunks.append(Chunk(len(chunks), (layer,), tuple(group), nblocks * layer_block_bytes))
    return chunks

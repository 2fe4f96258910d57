"""Worker bitmaps: bit ``w % 64`` of word ``w // 64`` stands for worker id ``w``.

The index ORs a block's tiers into one bitmap row per block and takes the running AND
down a request (``np.bitwise_and.accumulate``), so row ``i`` holds the workers that have
blocks ``0..i``. That running AND only ever loses bits; the helpers here read counts out
of it without a Python loop per block.
"""

from __future__ import annotations

import numpy as np


def set_bits(value: int, base: int = 0) -> list[int]:
    """Positions of the set bits of ``value``, each plus ``base``, ascending."""
    out = []
    while value:
        low = value & -value
        out.append(base + low.bit_length() - 1)
        value ^= low
    return out


def leading_counts(run: np.ndarray) -> dict[int, int]:
    """Worker id -> number of leading rows its bit stays set in a running AND.

    Args:
        run: (rows, words) uint64, each row a subset of the row before.

    Returns:
        Only workers whose bit is set in row 0. A bit can drop once, so only the rows
        where the bitmap changes (at most one per worker) are visited in Python.
    """
    rows = run.shape[0]
    if rows == 0:
        return {}
    counts: dict[int, int] = {}
    change = np.flatnonzero((run[:-1] != run[1:]).any(axis=1))
    for i in change.tolist():
        for word, (now, nxt) in enumerate(zip(run[i].tolist(), run[i + 1].tolist())):
            for wid in set_bits(now & ~nxt, word * 64):
                counts[wid] = i + 1
    for word, bits in enumerate(run[-1].tolist()):
        for wid in set_bits(bits, word * 64):
            counts[wid] = rows
    return counts


def popcount_columns(words: np.ndarray) -> np.ndarray:
    """Per bit position, how many rows of a (rows, words) uint64 array have it set."""
    raw = np.ascontiguousarray(words.astype("<u8", copy=False)).view(np.uint8)
    return np.unpackbits(raw.reshape(words.shape[0], -1), axis=1,
                         bitorder="little").sum(axis=0, dtype=np.int64)


__all__ = ["leading_counts", "popcount_columns", "set_bits"]

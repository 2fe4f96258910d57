"""Worker bitmaps: counts out of a running AND, popcounts per bit."""

from __future__ import annotations

import numpy as np

from kvxfer.prefix.bitmaps import leading_counts, popcount_columns, set_bits


def test_set_bits():
    assert set_bits(0) == []
    assert set_bits(0b1010_0001, 64) == [64, 69, 71]
    assert set_bits(1 << 63) == [63]


def test_leading_counts_against_a_bit_by_bit_count():
    rng = np.random.default_rng(4)
    held = rng.integers(0, 2**63, (50, 3), dtype=np.int64).astype(np.uint64)
    held |= np.uint64(0b111)  # workers 0..2 of word 0 hold every block
    run = np.bitwise_and.accumulate(held, axis=0)
    want = {}
    for w in range(192):
        bit = np.uint64(1 << (w % 64))
        n = 0
        while n < 50 and run[n, w // 64] & bit:
            n += 1
        if n:
            want[w] = n
    assert leading_counts(run) == want
    assert want[0] == want[1] == want[2] == 50
    assert leading_counts(run[:0]) == {}


def test_popcount_columns():
    words = np.array([[1, 1 << 63], [3, 0], [2, 1 << 63]], dtype=np.uint64)
    counts = popcount_columns(words)
    assert counts.shape == (128,)
    assert counts[0] == 2 and counts[1] == 2 and counts[127] == 2 and counts.sum() == 6

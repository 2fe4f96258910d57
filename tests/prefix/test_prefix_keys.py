"""Block hashes -> uint64 keys: a digest and its event int are the same key."""

from __future__ import annotations

import numpy as np
import pytest

from kvxfer.prefix.hashing import BlockHasher, event_hash
from kvxfer.prefix.keys import as_key, as_keys


def test_digests_ints_and_mixes_agree():
    digests = BlockHasher(4, mode="vllm").hash_blocks(range(40))
    ints = [int.from_bytes(d[-8:], "big") for d in digests]
    assert as_keys(digests).tolist() == ints
    assert as_keys(ints).tolist() == ints
    mixed = [digests[0], ints[1], *digests[2:]]
    assert as_keys(mixed).tolist() == ints
    fast = BlockHasher(4).hash_blocks(range(40))
    assert as_keys(fast).tolist() == [event_hash(d) for d in fast]


def test_negative_and_short_hashes_wrap_like_vllm():
    assert as_keys([-1, 5]).tolist() == [2**64 - 1, 5]
    assert as_key(b"\x01\x02") == 0x0102
    assert as_keys([b"\x01" * 40, b"\x02" * 40]).tolist() == [0x0101010101010101,
                                                               0x0202020202020202]
    assert as_keys([]).shape == (0,)
    # Unequal widths whose total looks like equal ones still convert one by one.
    assert as_keys([b"\x01" * 8, b"\x02" * 16, b""]).tolist() == [0x0101010101010101,
                                                                  0x0202020202020202, 0]


def test_bad_hashes_raise():
    with pytest.raises(TypeError):
        as_keys([1.5])
    with pytest.raises(TypeError):
        as_keys(np.zeros(3, dtype=np.int32))
    with pytest.raises(TypeError):
        as_key("abc")  # type: ignore[arg-type]

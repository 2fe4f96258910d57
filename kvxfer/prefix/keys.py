"""Block hashes in any accepted form -> one ``uint64`` key per block.

A digest (bytes) and its 64-bit event form (int) name the same block: the key is the
digest's last 8 bytes read big-endian, which is exactly what vLLM puts in its KV events
when they carry integers. Python ``hash()`` values (negative ints, from old vLLM) are
taken modulo 2**64, as vLLM's own int conversion does.

KV-cache groups: a hybrid model (sliding window plus full attention, say) caches the
same block hash once per group, and vLLM keys its cache by (hash, group). The index
does the same by XOR-ing group g's keys with a fixed 64-bit mask (group 0: none), a
bijection per group, so (hash, group) pairs are distinct keys and a key can be turned
back into its hash.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np

from kvxfer.prefix.hashing import event_hash

_MASK64 = (1 << 64) - 1

#: What the index accepts as block hashes.
BlockHashes = Union[Sequence[bytes], Sequence[int], np.ndarray]


def as_keys(block_hashes: BlockHashes) -> np.ndarray:
    """Convert block hashes to a contiguous ``uint64`` array of event-form keys.

    Args:
        block_hashes: digests (bytes of any length), ints, a mix, or a uint64 array.

    Returns:
        A new or borrowed 1-D ``np.uint64`` array, one key per block.

    Raises:
        TypeError: an element is neither bytes nor int.
    """
    if isinstance(block_hashes, np.ndarray):
        if block_hashes.dtype != np.uint64:
            raise TypeError(f"key arrays must be uint64, got {block_hashes.dtype}")
        return np.ascontiguousarray(block_hashes).reshape(-1)
    n = len(block_hashes)
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    first = block_hashes[0]
    if isinstance(first, (bytes, bytearray)):
        width = len(first)
        if width >= 8 and width % 8 == 0:
            try:
                joined = b"".join(block_hashes)  # type: ignore[arg-type]
            except TypeError:
                joined = b""  # a mix of bytes and ints: take the general path below
            if len(joined) == n * width and len(set(map(len, block_hashes))) == 1:
                words = np.frombuffer(joined, dtype=">u8").reshape(n, width // 8)
                return words[:, -1].astype(np.uint64)
    elif isinstance(first, int):
        try:
            return np.array(block_hashes, dtype=np.uint64)
        except (OverflowError, TypeError, ValueError):
            pass  # negative ints or a mix: take the general path below
    return np.fromiter((_one_key(h) for h in block_hashes), dtype=np.uint64, count=n)


def _one_key(block_hash: object) -> int:
    if isinstance(block_hash, (bytes, bytearray, int)) and not isinstance(block_hash, bool):
        return event_hash(bytes(block_hash) if isinstance(block_hash, bytearray)
                          else block_hash)
    raise TypeError(f"a block hash must be bytes or int, got {type(block_hash).__name__}")


def group_mask(group: int) -> int:
    """The 64-bit mask XOR-ed into group ``group``'s keys (0 for group 0).

    Raises:
        ValueError: a negative or non-integer group.
    """
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 0:
        raise ValueError(f"a KV-cache group is an int >= 0, got {group!r}")
    if group == 0:
        return 0
    z = (int(group) * 0x9E3779B97F4A7C15) & _MASK64  # splitmix64 finaliser
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31) or 1


def in_group(keys: np.ndarray, group: int) -> np.ndarray:
    """``keys`` as group ``group``'s keys (or back: the mapping is its own inverse)."""
    mask = group_mask(group)
    return keys if mask == 0 else keys ^ np.uint64(mask)


def as_key(block_hash: bytes | int) -> int:
    """One block hash -> its ``uint64`` key as a Python int.

    Raises:
        TypeError: neither bytes nor int.
    """
    return _one_key(block_hash)


__all__ = ["BlockHashes", "as_key", "as_keys", "group_mask", "in_group"]

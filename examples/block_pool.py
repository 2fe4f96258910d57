"""A worker's KV block pool with a prefix cache, as a serving engine keeps one.

Blocks are either free, held by running requests (``refs`` > 0), or cached: a full
prompt block whose KV stays valid after its request ended, found again by its block
hash. A request first takes the cached blocks its leading hashes name, then free ones;
when none is free the least recently used cached block nobody holds is evicted. Every
change to what is cached comes back as KV events (vLLM's ``BlockStored`` /
``BlockRemoved``) for the worker to publish, so a router's index follows it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence


class OutOfBlocks(RuntimeError):
    """Every block is held by a running request."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() takes the lowest id
        self._cached: OrderedDict[bytes, int] = OrderedDict()  # hash -> block, LRU first
        self._hash_of: dict[int, bytes] = {}  # cached block -> its hash
        self._refs: dict[int, int] = {}       # block -> running requests holding it

    def cached_prefix(self, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of ``hashes`` are cached here."""
        n = 0
        for h in hashes:
            if h not in self._cached:
                break
            n += 1
        return n

    def allocate(self, hashes: Sequence[bytes], nblocks: int) -> tuple[list[int], int, list[Any]]:
        """Blocks for a request: its cached leading blocks, then fresh ones.

        Args:
            hashes: hashes of the leading blocks that may be reused.
            nblocks: blocks the request needs in all.

        Returns:
            (block table, blocks reused from the cache, KV events of evictions).
        """
        from kvxfer.prefix import BlockRemoved

        hit = min(self.cached_prefix(hashes), nblocks)
        table = [self._cached[h] for h in hashes[:hit]]
        for h in hashes[:hit]:
            self._cached.move_to_end(h)
        for b in table:
            self._refs[b] = self._refs.get(b, 0) + 1
        evicted: list[bytes] = []
        while len(table) < nblocks:
            if not self._free:
                victim = next((h for h, b in self._cached.items() if not self._refs.get(b)), None)
                if victim is None:
                    self.release(table)
                    raise OutOfBlocks(f"no free block for a request of {nblocks} blocks")
                block = self._cached.pop(victim)
                del self._hash_of[block]
                evicted.append(victim)
                self._free.append(block)
            block = self._free.pop()
            self._refs[block] = 1
            table.append(block)
        events = [BlockRemoved(block_hashes=evicted)] if evicted else []
        return table, hit, events

    def commit(self, hashes: Sequence[bytes], table: Sequence[int],
               tokens: Sequence[int]) -> list[Any]:
        """Cache the request's full blocks (``hashes[i]`` is in ``table[i]``).

        Returns:
            The KV events that announce the newly cached blocks.
        """
        from kvxfer.prefix import BlockStored

        bs = self.block_size
        runs: list[list[int]] = []  # runs of consecutive newly cached block indices
        for i, (h, b) in enumerate(zip(hashes, table)):
            if h in self._cached or b in self._hash_of:
                continue
            self._cached[h] = b
            self._hash_of[b] = h
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        return [BlockStored(block_hashes=[hashes[i] for i in run],
                            parent_block_hash=hashes[run[0] - 1] if run[0] else None,
                            token_ids=list(tokens[run[0] * bs:(run[-1] + 1) * bs]),
                            block_size=bs) for run in runs]

    def release(self, table: Sequence[int]) -> None:
        """The request ended: its blocks that are not cached become free."""
        for b in table:
            left = self._refs.get(b, 0) - 1
            if left > 0:
                self._refs[b] = left
                continue
            self._refs.pop(b, None)
            if b not in self._hash_of:
                self._free.append(b)

"""The prefix-cache index: block hash -> which workers hold it, on which tier.

Theory of operation
-------------------
One entry per distinct block (its 64-bit key, see :mod:`kvxfer.prefix.keys`) lives in a
:class:`~kvxfer.prefix.table.SlotTable` slot. Per slot the index keeps::

    masks[slot, tier, word]  uint64   bit w%64 of word w//64 set <=> worker w holds it
    parent[slot]             uint64   key of the parent block (valid when flags=1)
    flags[slot]              uint8    1 = parent known
    used[slot]               uint64   LRU clock of the last store or match touching it

Each (block hash, KV-cache group) is its own entry: group g's keys are XOR-ed with a
fixed mask (:func:`~kvxfer.prefix.keys.in_group`), so a hybrid model's groups are
stored, matched and removed apart; every method takes ``group`` (default 0).

Worker ids are small integers handed out on first store and recycled after
``remove_worker``; the word dimension grows by one per 64 workers.

``match`` looks up all of a request's keys in one vectorised pass, ORs each row's tiers
into a "held" bitmap, and takes the running AND down the rows: bit w of row i is set
iff worker w holds blocks 0..i. Each worker's count is the row where its bit drops,
found from the (at most one per worker) rows where the running AND changes.

An entry whose masks are all zero is deleted at once (remove, clear, worker removal),
so no entry outlives its last holder. LRU eviction within ``max_entries`` drops the
least recently touched entries; a store or match stamps a request's deeper blocks as
older than its shallower ones, so eviction trims chains from the tail.

Thread safety: one lock serialises every operation (readers and writers). Each
operation is a handful of numpy passes, so the lock is held for microseconds to
milliseconds; many readers and one writer per worker are safe.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from kvxfer.prefix.bitmaps import leading_counts, popcount_columns, set_bits
from kvxfer.prefix.keys import BlockHashes, as_key, as_keys, group_mask, in_group
from kvxfer.prefix.locations import TIERS, Location, Overlap, tier_index
from kvxfer.prefix.table import SlotTable

_NT = len(TIERS)


@dataclass(slots=True)
class IndexConfig:
    """Sizing of a :class:`PrefixIndex`."""

    # Most entries (distinct blocks) kept; None = unbounded. Read by store().
    max_entries: int | None = None
    # On overflow, evict least recently used entries down to this share of max_entries.
    evict_to: float = 0.95
    # Initial slot count; the table doubles as needed.
    initial_capacity: int = 1024
    # Rebuild the table when live + deleted slots pass this share of capacity.
    max_load: float = 0.7


@dataclass(frozen=True, slots=True)
class IndexStats:
    """A snapshot of the index's size."""

    # Distinct blocks indexed.
    entries: int
    # Slots in the table, and deleted slots awaiting a rebuild.
    capacity: int
    tombstones: int
    # Workers with an id (stored at least once and not removed).
    workers: int
    # Entries dropped by LRU eviction so far.
    evicted: int
    # Bytes of every per-slot array.
    nbytes: int


class PrefixIndex:
    """Block hash -> locations (worker, tier, block id), with the parent chain.

    Args:
        config: sizing; defaults to an unbounded index.
        metrics: count lookups and the hit ratio in Prometheus (see :mod:`kvxfer.metrics`):
            True, a ``CollectorRegistry``, or None (off).
    """

    def __init__(self, config: IndexConfig | None = None, metrics: object = None) -> None:
        self.config = config or IndexConfig()
        self._metrics = None
        if metrics is not None and metrics is not False:
            from kvxfer.metrics import metrics_for  # prometheus-client only when asked for
            self._metrics = metrics_for(metrics)
        self._lock = threading.Lock()
        # All below are guarded by _lock.
        self._table = SlotTable(self.config.initial_capacity, self.config.max_load)
        self._table.add_column("masks", np.uint64, (_NT, 1))
        self._table.add_column("parent", np.uint64)
        self._table.add_column("flags", np.uint8)
        self._table.add_column("used", np.uint64)
        self._ids: dict[Hashable, int] = {}          # worker -> small id
        self._owner: list[Hashable | None] = []      # small id -> worker
        self._free_ids: list[int] = []               # ids released by remove_worker
        self._block_ids: dict[int, dict[tuple[int, int], int]] = {}  # id -> (tier, key) -> block
        self._clock = 0
        self._evicted = 0

    # ------------------------------------------------------------ writers

    def store(self, worker: Hashable, block_hashes: BlockHashes, tier: str = "gpu",
              parent: bytes | int | None = None,
              block_ids: Sequence[int] | None = None, group: int = 0) -> None:
        """Record that ``worker`` holds a chain of blocks on ``tier``.

        Args:
            worker: the worker's id (any hashable).
            block_hashes: the blocks, parent first; each one's parent is the one before.
            tier: one of ``gpu``, ``cpu``, ``disk``, ``remote``.
            parent: the first block's parent, if it has one.
            block_ids: the worker's block id for each block, if known.
            group: the KV-cache group the blocks belong to.

        Raises:
            ValueError: an unknown tier or group, or block_ids of the wrong length.
            TypeError: a block hash that is neither bytes nor int.
        """
        keys = as_keys(block_hashes)
        parents = np.empty_like(keys)
        has_parent = np.ones(keys.shape[0], dtype=bool)
        if keys.shape[0]:
            parents[1:] = keys[:-1]
            if parent is None:
                has_parent[0] = False
            else:
                parents[0] = as_key(parent)
        self.store_arrays(worker, keys, parents, has_parent, tier, block_ids, group)

    def store_arrays(self, worker: Hashable, keys: np.ndarray, parents: np.ndarray,
                     has_parent: np.ndarray, tier: str = "gpu",
                     block_ids: Sequence[int] | None = None, group: int = 0) -> None:
        """Bulk form of :meth:`store`: keys with explicit per-block parents.

        Args:
            worker: the worker's id.
            keys: uint64 block keys.
            parents: uint64 parent key of each block (ignored where not has_parent).
            has_parent: bool per block.
            tier: the tier name.
            block_ids: the worker's block id for each block, if known.
            group: the KV-cache group.

        Raises:
            ValueError: an unknown tier or group, or arrays / block_ids of mismatched
                length.
        """
        t = tier_index(tier)
        keys, parents = in_group(keys, group), in_group(parents, group)
        n = int(keys.shape[0])
        if parents.shape[0] != n or has_parent.shape[0] != n:
            raise ValueError("keys, parents and has_parent must have the same length")
        if block_ids is not None and len(block_ids) != n:
            raise ValueError(f"{len(block_ids)} block ids for {n} blocks")
        with self._lock:
            wid = self._worker_id(worker)
            if n == 0:
                return
            slots = self._table.insert(keys)
            cols = self._table.columns
            cols["masks"][slots, t, wid >> 6] |= np.uint64(1 << (wid & 63))
            linked = slots[has_parent]
            cols["parent"][linked] = parents[has_parent]
            cols["flags"][linked] = 1
            self._touch(slots)
            if block_ids is not None:
                table = self._block_ids.setdefault(wid, {})
                for key, block in zip(keys.tolist(), block_ids):
                    table[(t, key)] = int(block)
            self._maybe_evict()

    def remove(self, worker: Hashable, block_hashes: BlockHashes,
               tier: str | None = None, group: int = 0) -> None:
        """Forget that ``worker`` holds these blocks of ``group`` (on ``tier``, or on
        every tier). The same hashes in other groups are kept.

        Raises:
            ValueError: an unknown tier or group.
        """
        keys = in_group(as_keys(block_hashes), group)
        tiers = range(_NT) if tier is None else (tier_index(tier),)
        with self._lock:
            wid = self._ids.get(worker)
            if wid is None or keys.shape[0] == 0:
                return
            slots = self._table.lookup(keys)
            slots = slots[slots >= 0]
            masks = self._table.columns["masks"]
            keep = ~np.uint64(1 << (wid & 63))
            for t in tiers:
                masks[slots, t, wid >> 6] &= keep
            self._delete_unheld(slots)
            table = self._block_ids.get(wid)
            if table:
                for key in keys.tolist():
                    for t in tiers:
                        table.pop((t, key), None)

    def clear(self, worker: Hashable) -> None:
        """Forget every block of ``worker`` (it keeps its id)."""
        with self._lock:
            wid = self._ids.get(worker)
            if wid is not None:
                self._clear_id(wid)

    def remove_worker(self, worker: Hashable) -> None:
        """Forget ``worker`` entirely: its blocks, block ids and worker id."""
        with self._lock:
            wid = self._ids.pop(worker, None)
            if wid is None:
                return
            self._clear_id(wid)
            self._owner[wid] = None
            self._free_ids.append(wid)

    def compact(self) -> None:
        """Rebuild the table at the size its entries need, dropping deleted slots."""
        with self._lock:
            self._table.compact()

    # ------------------------------------------------------------ readers

    def match(self, block_hashes: BlockHashes, group: int = 0) -> dict[Hashable, int]:
        """Leading blocks of a request each worker holds (on any tier) in ``group``.

        Args:
            block_hashes: the request's block hashes, in order.
            group: the KV-cache group to match in (a hybrid model asks per group).

        Returns:
            worker -> number of leading blocks it holds; workers holding none are left
            out (use ``.get(worker, 0)``).

        Raises:
            ValueError: a bad group.
        """
        keys = in_group(as_keys(block_hashes), group)
        with self._lock:
            run, slots = self._run(keys)
            self._touch(slots)
            found = {self._owner[w]: c for w, c in leading_counts(run).items()}
        if self._metrics is not None:
            self._metrics.lookup(int(keys.shape[0]), max(found.values(), default=0))
        return found

    def overlap(self, block_hashes: BlockHashes, group: int = 0) -> dict[Hashable, Overlap]:
        """Like :meth:`match`, with each worker's matched blocks split by best tier."""
        keys = in_group(as_keys(block_hashes), group)
        with self._lock:
            run, slots = self._run(keys)
            counts = leading_counts(run)
            if self._metrics is not None:
                self._metrics.lookup(int(keys.shape[0]), max(counts.values(), default=0))
            if not counts:
                return {}
            self._touch(slots)
            tiered = self._table.columns["masks"][slots]
            seen = np.zeros_like(run)
            per_tier = []
            for t in range(_NT):
                best = tiered[:, t, :] & ~seen & run
                seen |= tiered[:, t, :]
                per_tier.append(popcount_columns(best))
            return {self._owner[w]: Overlap(self._owner[w], c,
                                            {TIERS[t]: int(per_tier[t][w]) for t in range(_NT)})
                    for w, c in counts.items()}

    def match_tiers(self, block_hashes: BlockHashes, worker: Hashable,
                    group: int = 0) -> list[str]:
        """Best tier of each leading block ``worker`` holds in ``group`` (empty if none)."""
        keys = in_group(as_keys(block_hashes), group)
        with self._lock:
            wid = self._ids.get(worker)
            if wid is None:
                return []
            run, slots = self._run(keys)
            bit = np.uint64(1 << (wid & 63))
            mine = (run[:, wid >> 6] & bit) != 0
            count = int(np.argmin(mine)) if not mine.all() else int(mine.shape[0])
            has = (self._table.columns["masks"][slots[:count], :, wid >> 6] & bit) != 0
            return [TIERS[t] for t in np.argmax(has, axis=1).tolist()]

    def locations(self, block_hash: bytes | int, group: int = 0) -> list[Location]:
        """Every (worker, tier, block id) holding one block of ``group``, fastest first."""
        key = as_key(block_hash) ^ group_mask(group)
        with self._lock:
            slot = int(self._table.lookup(np.array([key], dtype=np.uint64))[0])
            if slot < 0:
                return []
            masks = self._table.columns["masks"][slot]
            out = []
            for t in range(_NT):
                for word, bits in enumerate(masks[t].tolist()):
                    for wid in set_bits(bits, word * 64):
                        block = self._block_ids.get(wid, {}).get((t, key))
                        out.append(Location(self._owner[wid], TIERS[t], block))
            return out

    def chain(self, block_hash: bytes | int, group: int = 0) -> list[int]:
        """Keys of the block's indexed ancestry in ``group``, root first, ending with the
        block (as event-form hashes, whatever the group)."""
        mask = group_mask(group)
        key = as_key(block_hash) ^ mask
        out: list[int] = []
        with self._lock:
            cols = self._table.columns
            while len(out) <= self._table.live:
                slot = int(self._table.lookup(np.array([key], dtype=np.uint64))[0])
                if slot < 0:
                    break
                out.append(key)
                if not cols["flags"][slot]:
                    break
                key = int(cols["parent"][slot])
        return [k ^ mask for k in out[::-1]]

    def workers(self) -> list[Hashable]:
        """Workers that currently have an id."""
        with self._lock:
            return list(self._ids)

    def stats(self) -> IndexStats:
        """Size counters and memory of the index."""
        with self._lock:
            t = self._table
            return IndexStats(t.live, t.capacity, t.tombs, len(self._ids), self._evicted,
                              t.nbytes())

    def __len__(self) -> int:
        return self._table.live

    def __contains__(self, block_hash: object) -> bool:
        # Group 0's blocks; ask locations(h, group) for another group.
        if not isinstance(block_hash, (bytes, int)):
            return False
        key = as_key(block_hash)
        with self._lock:
            return bool(self._table.lookup(np.array([key], dtype=np.uint64))[0] >= 0)

    # ------------------------------------------------------------ internals (lock held)

    def _worker_id(self, worker: Hashable) -> int:
        wid = self._ids.get(worker)
        if wid is not None:
            return wid
        if self._free_ids:
            wid = self._free_ids.pop()
            self._owner[wid] = worker
        else:
            wid = len(self._owner)
            self._owner.append(worker)
        masks = self._table.columns["masks"]
        if wid >> 6 >= masks.shape[2]:
            wider = np.zeros((masks.shape[0], _NT, masks.shape[2] + 1), dtype=np.uint64)
            wider[:, :, :masks.shape[2]] = masks
            self._table.replace_column("masks", wider)
        self._ids[worker] = wid
        return wid

    def _touch(self, slots: np.ndarray) -> None:
        n = int(slots.shape[0])
        # Deeper blocks get older stamps, so LRU eviction trims chains from the tail.
        self._table.columns["used"][slots] = np.arange(self._clock + n, self._clock, -1,
                                                       dtype=np.uint64)
        self._clock += n

    def _delete_unheld(self, slots: np.ndarray) -> None:
        if slots.shape[0]:
            unheld = ~self._table.columns["masks"][slots].any(axis=(1, 2))
            self._table.delete(slots[unheld])

    def _clear_id(self, wid: int) -> None:
        masks = self._table.columns["masks"]
        bit = np.uint64(1 << (wid & 63))
        held = np.flatnonzero((masks[:, :, wid >> 6] & bit).any(axis=1))
        masks[held, :, wid >> 6] &= ~bit
        self._delete_unheld(held)
        self._block_ids.pop(wid, None)

    def _run(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Running AND of held bitmaps over the request's leading indexed blocks."""
        slots = self._table.lookup(keys, prefix=True)
        found = slots >= 0
        if not found.all():
            slots = slots[:int(np.argmin(found))]
        held = np.bitwise_or.reduce(self._table.columns["masks"][slots], axis=1)
        run = np.bitwise_and.accumulate(held, axis=0)
        alive = run.any(axis=1)
        if not alive.all():
            stop = int(np.argmin(alive))
            run, slots = run[:stop], slots[:stop]
        return run, slots

    def _maybe_evict(self) -> None:
        limit = self.config.max_entries
        table = self._table
        if limit is None or table.live <= limit:
            return
        excess = table.live - int(limit * self.config.evict_to)
        live = table.live_slots()
        used = table.columns["used"][live]
        victims = live if excess >= live.shape[0] else \
            live[np.argpartition(used, excess - 1)[:excess]]
        table.columns["masks"][victims] = 0
        if any(self._block_ids.values()):
            gone = set(table.keys[victims].tolist())
            for ids in self._block_ids.values():
                for tk in [tk for tk in ids if tk[1] in gone]:
                    del ids[tk]
        table.delete(victims)
        self._evicted += int(victims.shape[0])


__all__ = ["IndexConfig", "IndexStats", "PrefixIndex"]

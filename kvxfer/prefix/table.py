"""A vectorised open-addressing hash table of ``uint64`` keys, with per-slot columns.

Theory of operation
-------------------
Linear probing over a power-of-two array of slots; every operation takes a whole batch
of keys and advances all of them one probe step per numpy pass, so the Python
interpreter runs once per probe *step*, not once per key::

    slot:   0     1     2     3     4   ...  cap-1
    keys:  [k7 ][ -- ][k2 ][k9 ][ -- ]     [k4 ]     uint64
    state: [LIV][EMP][TMB][LIV][EMP]       [LIV]     uint8   EMPTY=0 LIVE=1 TOMB=2
    col A: [...][...][...][...][...]       [...]     any dtype/shape, owned by caller

home(k) = (k * 0x9E3779B97F4A7C15 mod 2**64) >> (64 - log2(cap)).

A deleted slot becomes a tombstone that keeps its key. Insert stops at the first slot
that is LIVE with the key (found), TOMB with the key (revived in place) or EMPTY
(claimed); lookup stops at the same three. Hence a key is never live beyond its own
tombstone. Concurrent claims of one EMPTY slot inside a batch are settled by writing
all claimants' keys and reading back which one stuck; losers probe on.

When live + tombstones would pass ``max_load`` the table is rebuilt: live keys are
re-inserted into a fresh array and every registered column is moved with them. The
caller's columns are therefore addressed by slot and must be re-read after any insert.
Not thread-safe: the owner (the prefix index) serialises access.
"""

from __future__ import annotations

import numpy as np

EMPTY, LIVE, TOMB = 0, 1, 2
_MULT = np.uint64(0x9E3779B97F4A7C15)


class SlotTable:
    """Batch insert / lookup / delete of ``uint64`` keys; slots index caller columns.

    Args:
        capacity: initial slot count (rounded up to a power of two, at least 16).
        max_load: rebuild when (live + tombstones) / capacity would pass this.
    """

    __slots__ = ("keys", "state", "columns", "live", "tombs", "max_load", "_shift", "_mask")

    def __init__(self, capacity: int = 1024, max_load: float = 0.7) -> None:
        if not 0.1 <= max_load <= 0.9:
            raise ValueError(f"max_load must be within [0.1, 0.9], got {max_load}")
        cap = 16
        while cap < capacity:
            cap *= 2
        self.max_load = max_load
        # Per-slot arrays the owner registered with add_column(); moved on rebuild.
        self.columns: dict[str, np.ndarray] = {}
        self._alloc(cap)
        # Counts of LIVE and TOMB slots, kept exact by insert/delete/rebuild.
        self.live = 0
        self.tombs = 0

    @property
    def capacity(self) -> int:
        """Number of slots."""
        return int(self.keys.shape[0])

    def _alloc(self, cap: int) -> None:
        self.keys = np.zeros(cap, dtype=np.uint64)
        self.state = np.zeros(cap, dtype=np.uint8)
        self._shift = np.uint64(64 - (cap.bit_length() - 1))
        self._mask = cap - 1

    def add_column(self, name: str, dtype: np.dtype | type, tail: tuple[int, ...] = ()) -> None:
        """Register a zero-filled per-slot column ``columns[name]`` of shape (cap, *tail)."""
        self.columns[name] = np.zeros((self.capacity, *tail), dtype=dtype)

    def replace_column(self, name: str, array: np.ndarray) -> None:
        """Swap a column for a reshaped one (same first dimension)."""
        if array.shape[0] != self.capacity:
            raise ValueError("a column must have one row per slot")
        self.columns[name] = array

    def _home(self, keys: np.ndarray) -> np.ndarray:
        return ((keys * _MULT) >> self._shift).astype(np.int64)

    def lookup(self, keys: np.ndarray, prefix: bool = False) -> np.ndarray:
        """Slots of ``keys`` (int64), -1 where a key is absent.

        Args:
            keys: uint64 keys.
            prefix: only the leading run of present keys matters: stop probing for
                keys after the first absent one (they come back as -1).
        """
        n = int(keys.shape[0])
        out = np.full(n, -1, dtype=np.int64)
        pos = self._home(keys)
        idx = np.arange(n)
        want = keys
        tkeys, state, mask = self.keys, self.state, self._mask
        first_absent = n
        while idx.size:
            st = state[pos]
            same = tkeys[pos] == want
            hit = same & (st == LIVE)
            out[idx[hit]] = pos[hit]
            going = ~(same | (st == EMPTY))
            if prefix:
                absent = ~(going | hit)
                if absent.any():
                    first_absent = min(first_absent, int(idx[absent].min()))
                    going &= idx < first_absent
            idx, pos, want = idx[going], (pos[going] + 1) & mask, want[going]
        out[first_absent:] = -1
        return out

    def insert(self, keys: np.ndarray) -> np.ndarray:
        """Slots of ``keys`` (int64), creating the absent ones; may rebuild first.

        Returns:
            One slot per key; equal keys get the same slot.
        """
        n = int(keys.shape[0])
        if self.live + self.tombs + n > self.max_load * self.capacity:
            self._rebuild(self.live + n)
        out = np.empty(n, dtype=np.int64)
        pos = self._home(keys)
        idx = np.arange(n)
        want = keys
        tkeys, state, mask = self.keys, self.state, self._mask
        born: list[np.ndarray] = []      # slots claimed from EMPTY
        revived: list[np.ndarray] = []   # slots turned from TOMB back to LIVE
        while idx.size:
            st = state[pos]
            same = tkeys[pos] == want
            found = same & (st == LIVE)
            revive = same & (st == TOMB)
            if revive.any():
                state[pos[revive]] = LIVE
                revived.append(pos[revive])
            claim = st == EMPTY
            if claim.any():
                cpos = pos[claim]
                tkeys[cpos] = want[claim]
                won = tkeys[cpos] == want[claim]
                claim[np.flatnonzero(claim)[~won]] = False
                state[pos[claim]] = LIVE
                born.append(pos[claim])
            done = found | revive | claim
            out[idx[done]] = pos[done]
            going = ~done
            # Losers of a claim stay on the same slot: it is now LIVE with another key.
            step = (st[going] != EMPTY).astype(np.int64)
            idx, pos, want = idx[going], (pos[going] + step) & mask, want[going]
        if born or revived:
            # Equal keys in one batch are born together, so a slot may repeat in `fresh`.
            fresh = np.concatenate(born + revived)
            for col in self.columns.values():
                col[fresh] = 0  # a revived or claimed slot starts blank
            self._recount(fresh, revived)
        return out

    def _recount(self, fresh: np.ndarray, revived: list[np.ndarray]) -> None:
        if fresh.shape[0] * 64 > self.capacity:  # big batch: one pass beats a sort
            self.live = int(np.count_nonzero(self.state == LIVE))
            self.tombs = int(np.count_nonzero(self.state == TOMB))
            return
        self.live += int(np.unique(fresh).shape[0])
        if revived:
            self.tombs -= int(np.unique(np.concatenate(revived)).shape[0])

    def delete(self, slots: np.ndarray) -> None:
        """Turn LIVE ``slots`` into tombstones (duplicates and non-live slots ignored)."""
        slots = np.unique(slots)
        slots = slots[self.state[slots] == LIVE]
        self.state[slots] = TOMB
        self.live -= int(slots.size)
        self.tombs += int(slots.size)

    def live_slots(self) -> np.ndarray:
        """Every LIVE slot, ascending."""
        return np.flatnonzero(self.state == LIVE)

    def _rebuild(self, need: int) -> None:
        cap = 16
        while cap * self.max_load * 0.75 < need:
            cap *= 2
        old_slots = self.live_slots()
        old_keys = self.keys[old_slots]
        old_cols = self.columns
        self._alloc(cap)
        self.live = self.tombs = 0
        self.columns = {}
        new_slots = self._place_distinct(old_keys)
        for name, col in old_cols.items():
            fresh = np.zeros((cap, *col.shape[1:]), dtype=col.dtype)
            _rows(fresh)[new_slots] = _rows(col)[old_slots]
            self.columns[name] = fresh

    def _place_distinct(self, keys: np.ndarray) -> np.ndarray:
        """Lay distinct keys into an empty table without probing.

        Sorted by home slot, key i goes to s_i = max(home_i, s_(i-1) + 1), a running
        maximum: s = cummax(home - i) + i. Every slot between a key's home and its
        slot is then taken, which is all linear probing asks. Keys pushed past the
        last slot are inserted normally (they wrap to the front).
        """
        n = int(keys.shape[0])
        home = self._home(keys)
        order = np.argsort(home, kind="stable")
        ramp = np.arange(n, dtype=np.int64)
        at = np.maximum.accumulate(home[order] - ramp) + ramp
        fits = at < self.capacity
        slots = np.empty(n, dtype=np.int64)
        placed, where = order[fits], at[fits]
        self.keys[where] = keys[placed]
        self.state[where] = LIVE
        self.live += int(where.shape[0])
        slots[placed] = where
        wrapped = order[~fits]
        if wrapped.shape[0]:
            slots[wrapped] = self.insert(keys[wrapped])
        return slots

    def compact(self) -> None:
        """Rebuild now, at the size the live keys need, dropping every tombstone."""
        self._rebuild(self.live)

    def nbytes(self) -> int:
        """Bytes held by the keys, the states and every column."""
        return int(self.keys.nbytes + self.state.nbytes
                   + sum(c.nbytes for c in self.columns.values()))


def _rows(array: np.ndarray) -> np.ndarray:
    """A 1-D view with one opaque item per row, so row gathers are single copies."""
    row = array.dtype.itemsize * (array.size // max(array.shape[0], 1))
    return np.ascontiguousarray(array).reshape(array.shape[0], -1).view(f"V{row}").reshape(-1)


__all__ = ["EMPTY", "LIVE", "SlotTable", "TOMB"]

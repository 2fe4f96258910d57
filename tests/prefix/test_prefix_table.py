"""The vectorised open-addressing table: collisions, duplicates, tombstones, rebuilds."""

from __future__ import annotations

import numpy as np

from kvxfer.prefix.table import LIVE, SlotTable


def u64(values) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


def test_insert_lookup_delete_against_a_dict_model():
    rng = np.random.default_rng(5)
    table = SlotTable(capacity=16)
    table.add_column("v", np.int64)
    model: dict[int, int] = {}
    # A small key space forces duplicates inside batches and heavy probing.
    for step in range(300):
        keys = u64(rng.integers(0, 400, rng.integers(1, 60)))
        if step % 3 == 2:
            slots = table.lookup(keys)
            table.delete(slots[slots >= 0])
            for k in keys.tolist():
                model.pop(k, None)
        else:
            slots = table.insert(keys)
            assert (table.state[slots] == LIVE).all()
            table.columns["v"][slots] = keys.astype(np.int64) * 3
            model.update({k: k * 3 for k in keys.tolist()})
        assert table.live == len(model)
    probe = u64(np.arange(400))
    slots = table.lookup(probe)
    for key, slot in zip(probe.tolist(), slots.tolist()):
        assert (slot >= 0) == (key in model)
        if slot >= 0:
            assert table.columns["v"][slot] == model[key]


def test_equal_keys_in_one_batch_share_a_slot_and_key_zero_works():
    table = SlotTable()
    slots = table.insert(u64([0, 7, 0, 7, 2**64 - 1]))
    assert slots[0] == slots[2] and slots[1] == slots[3]
    assert table.live == 3
    assert (table.lookup(u64([0, 7, 2**64 - 1, 3])) >= 0).tolist() == [True, True, True, False]


def test_colliding_keys_probe_past_each_other_and_tombstones():
    table = SlotTable(capacity=16)
    # Keys that share a home slot: find them by brute force.
    homes = table._home(u64(np.arange(1, 5000)))
    same = (np.flatnonzero(homes == homes[0]) + 1)[:5]
    keys = u64(same)
    slots = table.insert(keys)
    assert len(set(slots.tolist())) == 5
    table.delete(slots[1:2])  # a tombstone in the middle of the run
    assert table.lookup(keys).tolist()[2:] == slots.tolist()[2:]
    assert table.lookup(keys[1:2])[0] == -1
    revived = table.insert(keys[1:2])
    assert revived[0] == slots[1] and table.tombs == 0 and table.live == 5


def test_rebuild_moves_columns_and_compact_drops_tombstones():
    table = SlotTable(capacity=16, max_load=0.5)
    table.add_column("v", np.uint64, (2,))
    keys = u64(np.arange(1, 2001) * 7919)
    for chunk in np.array_split(keys, 20):
        slots = table.insert(chunk)
        table.columns["v"][slots, 0] = chunk
        table.columns["v"][slots, 1] = chunk + np.uint64(1)
    assert table.capacity >= 4000
    table.delete(table.lookup(keys[:1500]))
    assert table.tombs == 1500
    table.compact()
    assert table.tombs == 0 and table.live == 500 and table.capacity < 4000
    slots = table.lookup(keys[1500:])
    assert (slots >= 0).all()
    assert (table.columns["v"][slots, 0] == keys[1500:]).all()
    assert (table.columns["v"][slots, 1] == keys[1500:] + np.uint64(1)).all()


def test_revived_slot_starts_with_blank_columns():
    table = SlotTable()
    table.add_column("v", np.int64)
    slot = table.insert(u64([42]))
    table.columns["v"][slot] = 9
    table.delete(slot)
    again = table.insert(u64([42]))
    assert again[0] == slot[0] and table.columns["v"][again[0]] == 0


def test_sorted_placement_wraps_keys_pushed_past_the_last_slot():
    table = SlotTable(capacity=64)
    homes = table._home(u64(np.arange(1, 50_000)))
    keys = u64(np.flatnonzero(homes >= 60)[:20] + 1)  # 20 keys homed in the last 4 slots
    slots = table._place_distinct(keys)
    assert table.live == 20 and len(set(slots.tolist())) == 20
    assert (slots < 16).sum() == 16                    # 16 of them wrapped to the front
    assert table.lookup(keys).tolist() == slots.tolist()


def test_prefix_lookup_stops_at_the_first_absent_key():
    table = SlotTable()
    slots = table.insert(u64([1, 2, 4]))
    assert table.lookup(u64([1, 2, 3, 4]), prefix=True).tolist() == [*slots[:2], -1, -1]
    assert table.lookup(u64([1, 2, 3, 4])).tolist() == [*slots[:2], -1, slots[2]]

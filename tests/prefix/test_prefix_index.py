"""PrefixIndex: matches, tiers, removal, eviction, worker removal, threads, memory."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from kvxfer.prefix.hashing import BlockHasher
from kvxfer.prefix.index import IndexConfig, PrefixIndex
from kvxfer.prefix.keys import as_key
from kvxfer.prefix.locations import Location
from kvxfer.prefix.routing import route


def chain(n: int, salt: str = "", block_size: int = 4) -> list[bytes]:
    return BlockHasher(block_size).hash_blocks(range(n * block_size), cache_salt=salt or None)


def test_match_counts_leading_blocks_per_worker():
    idx = PrefixIndex()
    h = chain(10)
    idx.store("a", h[:6])
    idx.store("b", h[:2])
    idx.store("c", h[3:8], parent=h[2])  # holds a middle run only
    assert idx.match(h) == {"a": 6, "b": 2}
    assert idx.match(h[:1]) == {"a": 1, "b": 1}
    assert idx.match(chain(3, salt="other")) == {}
    assert idx.match([]) == {}


def test_digest_and_event_int_name_the_same_block():
    idx = PrefixIndex()
    h = BlockHasher(16, mode="vllm").hash_blocks(range(64))
    ints = [int.from_bytes(d[-8:], "big") for d in h]
    idx.store("w", ints)
    assert idx.match(h) == {"w": 4}
    assert h[2] in idx and ints[2] in idx
    idx.remove("w", h[2:])
    assert idx.match(ints) == {"w": 2}


def test_never_reports_a_location_after_removal_clear_or_worker_removal():
    idx = PrefixIndex()
    h = chain(6)
    for w in ("a", "b", "c"):
        idx.store(w, h, tier="gpu")
    idx.store("a", h, tier="cpu")
    idx.remove("a", h[3:])                   # every tier
    idx.remove("b", h[1:], tier="gpu")
    idx.clear("c")
    assert idx.match(h) == {"a": 3, "b": 1}
    assert all(loc.worker != "a" for loc in idx.locations(h[4]))
    assert {(loc.worker, loc.tier) for loc in idx.locations(h[0])} == \
        {("a", "gpu"), ("a", "cpu"), ("b", "gpu")}
    idx.remove("a", h[:2], tier="gpu")       # cpu copy stays
    assert idx.match_tiers(h, "a") == ["cpu", "cpu", "gpu"]
    idx.remove_worker("a")
    assert idx.match(h) == {"b": 1} and idx.locations(h[2]) == []
    assert "a" not in idx.workers()


def test_removing_every_worker_frees_every_entry():
    idx = PrefixIndex()
    rng = random.Random(3)
    for w in range(130):  # more than two 64-bit mask words
        idx.store(w, chain(rng.randint(1, 40), salt=str(w % 7)),
                  tier=rng.choice(["gpu", "cpu", "disk", "remote"]))
    assert len(idx) > 0 and idx.stats().workers == 130
    for w in range(130):
        idx.remove_worker(w)
    assert len(idx) == 0
    assert idx.stats().entries == 0 and idx.stats().workers == 0
    idx.compact()
    stats = idx.stats()
    assert stats.tombstones == 0 and stats.capacity == 16
    # Recycled worker ids start with no blocks.
    idx.store("new", chain(2))
    assert idx.match(chain(5, salt="3")) == {}


def test_lru_eviction_keeps_the_budget_and_drops_the_oldest_tails():
    idx = PrefixIndex(IndexConfig(max_entries=10, evict_to=1.0))
    old, new = chain(6, salt="old"), chain(6, salt="new")
    idx.store("w", old)
    idx.store("w", new)
    assert len(idx) == 10 and idx.stats().evicted == 2
    assert idx.match(old) == {"w": 4}        # the old chain lost its two deepest blocks
    assert idx.match(new) == {"w": 6}
    idx.match(old)                            # touch: the old chain is now the recent one
    idx.store("w", chain(3, salt="third"))
    assert idx.match(old) == {"w": 4} and idx.match(new) == {"w": 3}
    assert len(idx) == 10


def test_block_ids_parents_overlap_and_tiers():
    idx = PrefixIndex()
    h = chain(5)
    idx.store("a", h, block_ids=[10, 11, 12, 13, 14])
    idx.store("b", h[:3], tier="disk")
    idx.store("b", h[:1], tier="cpu")
    assert Location("a", "gpu", 12) in idx.locations(h[2])
    assert idx.chain(h[4]) == [int.from_bytes(d[-8:], "big") for d in h]
    ov = idx.overlap(h)
    assert ov["a"].blocks == 5 and ov["a"].by_tier["gpu"] == 5
    assert ov["b"].blocks == 3 and ov["b"].by_tier == {"gpu": 0, "cpu": 1, "disk": 2,
                                                       "remote": 0}
    idx.remove("a", h[2:3])
    assert idx.locations(h[2]) == [Location("b", "disk", None)]
    assert len(idx.chain(h[4])) == 5        # b still holds block 2
    idx.remove("b", h[2:3])
    assert idx.chain(h[4]) == [int.from_bytes(d[-8:], "big") for d in h[3:]]


def test_bad_arguments_raise_and_change_nothing():
    idx = PrefixIndex()
    with pytest.raises(ValueError):
        idx.store("w", chain(2), tier="tape")
    with pytest.raises(ValueError):
        idx.store("w", chain(2), block_ids=[1])
    with pytest.raises(TypeError):
        idx.store("w", [1.0, 2.0])
    assert len(idx) == 0


def test_random_operations_match_a_naive_model():
    rng = random.Random(11)
    idx = PrefixIndex(IndexConfig(initial_capacity=16))
    chains = [chain(rng.randint(1, 30), salt=str(i)) for i in range(20)]
    model: dict[tuple[str, bytes], set[str]] = {}  # (worker, block) -> tiers
    workers = [f"w{i}" for i in range(5)]
    for _ in range(400):
        op, w = rng.random(), rng.choice(workers)
        c = rng.choice(chains)
        lo = rng.randint(0, len(c) - 1)
        hi = rng.randint(lo + 1, len(c))
        if op < 0.5:
            tier = rng.choice(["gpu", "cpu"])
            idx.store(w, c[lo:hi], tier=tier, parent=c[lo - 1] if lo else None)
            for d in c[lo:hi]:
                model.setdefault((w, d), set()).add(tier)
        elif op < 0.8:
            tier = rng.choice([None, "gpu", "cpu"])
            idx.remove(w, c[lo:hi], tier=tier)
            for d in c[lo:hi]:
                tiers = model.get((w, d), set())
                tiers.difference_update({"gpu", "cpu"} if tier is None else {tier})
        elif op < 0.9:
            idx.clear(w)
            model = {k: v for k, v in model.items() if k[0] != w}
        else:
            idx.remove_worker(w)
            model = {k: v for k, v in model.items() if k[0] != w}
        q = rng.choice(chains)
        want = {}
        for wk in workers:
            n = 0
            while n < len(q) and model.get((wk, q[n])):
                n += 1
            if n:
                want[wk] = n
        assert idx.match(q) == want
    assert len(idx) == len({d for (w, d), t in model.items() if t})


def test_one_writer_per_worker_and_many_readers_in_threads():
    idx = PrefixIndex(IndexConfig(initial_capacity=16))
    chains = {w: chain(200, salt=str(w)) for w in range(4)}
    errors: list[BaseException] = []
    done = threading.Event()

    def writer(w: int) -> None:
        try:
            for i in range(0, 200, 5):
                idx.store(w, chains[w][i:i + 5], parent=chains[w][i - 1] if i else None)
                if i % 40 == 0:
                    idx.remove(w, chains[w][i:])  # drop the tail again, then rebuild it
                    idx.store(w, chains[w][i:i + 5], parent=chains[w][i - 1] if i else None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def reader() -> None:
        try:
            while not done.is_set():
                for w, c in chains.items():
                    got = idx.match(c).get(w, 0)
                    assert 0 <= got <= 200
                    assert set(idx.match(c)) <= {w}
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(w,)) for w in chains]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join(timeout=30)
    done.set()
    for t in readers:
        t.join(timeout=30)
    assert not errors
    assert all(not t.is_alive() for t in writers + readers)
    assert all(idx.match(c) == {w: 200} for w, c in chains.items())
    assert len(idx) == 800


def test_memory_per_block_is_bounded():
    idx = PrefixIndex()
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**63, 100_000, dtype=np.int64).astype(np.uint64)
    for w, part in enumerate(np.array_split(keys, 8)):
        idx.store(w, part)
    stats = idx.stats()
    assert stats.entries == len(np.unique(keys))
    assert stats.nbytes / stats.entries < 256


def test_kv_cache_groups_are_separate_locations():
    idx = PrefixIndex()
    digests = [bytes([i]) * 32 for i in range(1, 5)]
    idx.store("a", digests, block_ids=[10, 11, 12, 13])            # group 0
    idx.store("b", digests[:2], group=1, block_ids=[20, 21])        # same hashes, group 1
    idx.store("a", digests[:3], tier="cpu", group=2)
    assert idx.match(digests) == {"a": 4}
    assert idx.match(digests, group=1) == {"b": 2}
    assert idx.match(digests, group=2) == {"a": 3}
    assert idx.overlap(digests, group=2)["a"].by_tier["cpu"] == 3
    assert idx.locations(digests[0]) == [Location("a", "gpu", 10)]
    assert idx.locations(digests[0], group=1) == [Location("b", "gpu", 20)]
    assert idx.chain(digests[1], group=1) == [as_key(digests[0]), as_key(digests[1])]
    assert idx.match_tiers(digests, "a", group=2) == ["cpu"] * 3
    assert route(idx, digests, {"a": 0, "b": 0}, group=1).worker == "b"
    # Removing in one group leaves the others alone.
    idx.remove("b", digests[:1], group=1)
    assert idx.match(digests, group=1) == {} and idx.match(digests) == {"a": 4}
    idx.remove("a", digests, group=2)
    assert idx.match(digests, group=2) == {} and idx.match(digests) == {"a": 4}
    idx.clear("a")
    assert idx.match(digests) == {} and idx.match(digests[1:], group=1) == {"b": 1}
    assert len(idx) == 1
    with pytest.raises(ValueError, match="KV-cache group"):
        idx.match(digests, group=-1)
    with pytest.raises(ValueError, match="KV-cache group"):
        idx.store("a", digests, group="full")

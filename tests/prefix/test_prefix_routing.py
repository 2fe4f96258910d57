"""KV-aware routing: cached prefix (per-tier credit) against load."""

from __future__ import annotations

import pytest

from kvxfer.prefix.hashing import BlockHasher
from kvxfer.prefix.index import PrefixIndex
from kvxfer.prefix.routing import RoutingConfig, route


@pytest.fixture
def request_hashes() -> list[bytes]:
    return BlockHasher(4).hash_blocks(range(40))  # 10 blocks


def test_prefers_the_longest_cached_prefix_at_equal_load(request_hashes):
    idx = PrefixIndex()
    idx.store("a", request_hashes[:3])
    idx.store("b", request_hashes[:8])
    d = route(idx, request_hashes, {"a": 0, "b": 0, "c": 0})
    assert d.worker == "b" and d.cost == 2.0 and d.prefill_blocks == 2.0
    assert d.costs == {"a": 7.0, "b": 2.0, "c": 10.0}
    assert d.overlap.blocks == 8


def test_load_outweighs_a_short_prefix(request_hashes):
    idx = PrefixIndex()
    idx.store("a", request_hashes[:3])
    d = route(idx, request_hashes, {"a": 5.0, "b": 1.0})
    assert d.worker == "b"  # 10 - 3 + 5 = 12 > 10 + 1
    d = route(idx, request_hashes, {"a": 5.0, "b": 1.0}, RoutingConfig(load_weight=0.1))
    assert d.worker == "a"


def test_tier_credit_weighs_where_the_blocks_are(request_hashes):
    idx = PrefixIndex()
    idx.store("gpu-4", request_hashes[:4], tier="gpu")
    idx.store("disk-6", request_hashes[:6], tier="disk")
    d = route(idx, request_hashes, {"gpu-4": 0, "disk-6": 0})
    assert d.worker == "gpu-4"  # 4 * 1.0 saved beats 6 * 0.5
    assert d.costs["disk-6"] == pytest.approx(7.0)
    cfg = RoutingConfig(tier_credit={"gpu": 1.0, "disk": 0.9})
    assert route(idx, request_hashes, {"gpu-4": 0, "disk-6": 0}, cfg).worker == "disk-6"


def test_ties_go_to_lower_load_then_order_and_bad_input_raises(request_hashes):
    idx = PrefixIndex()
    assert route(idx, request_hashes, {"x": 0, "y": 0}).worker == "x"
    with pytest.raises(ValueError):
        route(idx, request_hashes, {})
    with pytest.raises(ValueError):
        route(idx, request_hashes, {"x": 0}, RoutingConfig(tier_credit={"tape": 1.0}))

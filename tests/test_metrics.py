"""kvxfer.metrics: known transfers, then one real HTTP scrape of the endpoint."""

from __future__ import annotations

import re
import urllib.request

import pytest
import torch

import kvxfer
import kvxfer.metrics
from kvxfer.prefix import PrefixIndex

prometheus_client = pytest.importorskip("prometheus_client")


def _cache(seed: int) -> kvxfer.KVLayout:
    gen = torch.Generator().manual_seed(seed)
    return kvxfer.KVLayout.vllm([torch.randn(2, 16, 4, 2, 8, generator=gen) for _ in range(3)])


def _scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {m.group(1): float(m.group(2)) for m in
            (re.match(r"^(\S+) (\S+)$", line) for line in text.splitlines()
             if not line.startswith("#")) if m}


def test_scraped_counts_match_the_transfers_made():
    registry = prometheus_client.CollectorRegistry()
    with kvxfer.metrics.serve(0, "127.0.0.1", registry=registry) as endpoint, \
            kvxfer.Agent("a", metrics=registry) as a, kvxfer.Agent("b") as b:
        a.register_kv_cache(_cache(1))
        b.register_kv_cache(_cache(2))
        peer = a.add_peer(b.metadata())
        block = 2 * 4 * 2 * 8 * 4  # K and V of one block of one layer, float32
        a.read(peer, [1, 2, 3], [4, 5, 6]).wait(10)
        a.read(peer, [7], [7], layers=[0]).wait(10)
        a.write(peer, [0, 1], [9, 10]).wait(10)
        with pytest.raises(kvxfer.TransferFailed):
            a.read(peer, [99], [0]).wait(10)  # b has 16 blocks: b refuses it
        index = PrefixIndex(metrics=registry)
        index.store("w", [b"\x01" * 16, b"\x02" * 16])
        index.match([b"\x01" * 16, b"\x02" * 16, b"\x03" * 16, b"\x04" * 16])  # 2 of 4 held
        route = kvxfer.prefix.route(index, [b"\x09" * 16], {"w": 0.0})  # 0 of 1 held
        assert route.worker == "w"
        got = _scrape(endpoint.url)
    lab = '{backend="tcp",op="%s"}'
    assert got["kvxfer_kv_transfer_bytes_total" + lab % "read"] == (3 * 3 + 1) * block
    assert got["kvxfer_kv_transfer_bytes_total" + lab % "write"] == 2 * 3 * block
    assert got["kvxfer_kv_transfer_wire_bytes_total" + lab % "write"] == 2 * 3 * block
    assert got["kvxfer_kv_transfer_latency_seconds_count" + lab % "read"] == 2
    assert got["kvxfer_kv_transfer_latency_seconds_count" + lab % "write"] == 1
    assert got['kvxfer_kv_transfer_latency_seconds_bucket{backend="tcp",le="0.01",op="read"}'] \
        <= 2
    assert got['kvxfer_kv_transfer_failures_total{backend="tcp",cause="remote",op="read"}'] == 1
    assert got["kvxfer_kv_transfers_inflight" + lab % "read"] == 0
    assert got["kvxfer_prefix_lookups_total"] == 2
    assert got["kvxfer_prefix_requested_blocks_total"] == 5
    assert got["kvxfer_prefix_hit_blocks_total"] == 2
    assert got["kvxfer_kv_cache_hit_ratio"] == pytest.approx(2 / 5)
    # no per-request or per-peer label: every transfer series is labelled backend, op (cause)
    names = {k.split("{")[0] for k in got if k.startswith("kvxfer_kv_transfer")}
    for key in got:
        if key.split("{")[0] in names and "{" in key:
            labels = set(re.findall(r'(\w+)="', key))
            assert labels <= {"backend", "op", "cause", "le"}, key


def test_inflight_gauge_counts_a_transfer_until_it_ends():
    registry = prometheus_client.CollectorRegistry()
    gauge = 'kvxfer_kv_transfers_inflight'
    with kvxfer.Agent("a", metrics=registry) as a, kvxfer.Agent("b") as b:
        a.register_kv_cache(_cache(1))
        b.register_kv_cache(_cache(2))
        peer = a.add_peer(b.metadata())
        slow = a.write(peer, [0], [0], event=_NotYet())  # held back by its source event
        assert registry.get_sample_value(gauge, {"backend": "tcp", "op": "write"}) == 1
        slow.cancel()
        assert registry.get_sample_value(gauge, {"backend": "tcp", "op": "write"}) == 0
        assert registry.get_sample_value("kvxfer_kv_transfer_failures_total",
                                         {"backend": "tcp", "op": "write",
                                          "cause": "cancelled"}) == 1


class _NotYet:
    def query(self) -> bool:
        return False


def test_one_registry_serves_every_agent_of_a_process():
    registry = prometheus_client.CollectorRegistry()
    assert kvxfer.metrics.metrics_for(registry) is kvxfer.metrics.metrics_for(registry)
    assert kvxfer.metrics.metrics_for(None) is None and kvxfer.metrics.metrics_for(False) is None
    with kvxfer.Agent("x", metrics=registry), kvxfer.Agent("y", metrics=registry):
        pass  # a second agent on the same registry does not re-register the collectors

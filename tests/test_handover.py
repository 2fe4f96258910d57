"""Handover (the vLLM connector's block-lifetime protocol) between two real agents."""

from __future__ import annotations

import time

import pytest
import torch

import kvxfer
from kvxfer.integrations.handover import Handover


def cache(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 16, 4, 2, 8, generator=g) for _ in range(2)]


@pytest.fixture
def pair():
    p_kv, d_kv = cache(1), cache(2)
    p_agent, d_agent = kvxfer.Agent("prefill"), kvxfer.Agent("decode")
    p_agent.register_kv_cache(kvxfer.KVLayout.vllm(p_kv))
    d_agent.register_kv_cache(kvxfer.KVLayout.vllm(d_kv))
    p, d = Handover(p_agent, lease_s=1.0), Handover(d_agent, lease_s=1.0, ack_timeout_s=2.0)
    yield p, d, p_kv, d_kv
    for h in (p, d):
        h.close()
        h.agent.close()


def results(d: Handover, timeout: float = 5.0):
    limit = time.monotonic() + timeout
    done: set[str] = set()
    failed: dict[str, str] = {}
    while not (done or failed) and time.monotonic() < limit:
        a, b = d.take_results()
        done |= a
        failed.update(b)
        time.sleep(0.01)
    return done, failed


def released(p: Handover, timeout: float = 5.0) -> set[str]:
    limit = time.monotonic() + timeout
    out: set[str] = set()
    while not out and time.monotonic() < limit:
        out = p.take_released()
        time.sleep(0.01)
    return out


def test_pull_lands_bytes_and_releases_prefill(pair):
    p, d, p_kv, d_kv = pair
    p.hold("r1")
    d.pull("d1", p.agent.metadata(), "r1", [3, 4], [10, 11])
    assert results(d) == ({"d1"}, {})
    assert all(torch.equal(d_kv[i][:, [10, 11]], p_kv[i][:, [3, 4]]) for i in range(2))
    assert released(p) == {"r1"}
    assert p.held == 0
    stats = d.take_stats()
    assert stats.transfers == 1 and stats.bytes == 2 * d.agent.layout.bytes_per_block


def test_lease_expiry_releases_and_fences_a_late_read(pair):
    p, d, _, d_kv = pair
    p.hold("r1")
    assert released(p, timeout=3.0) == {"r1"}  # lease of 1 s, nobody read
    assert p.take_stats().released == {"lease expired": 1}
    before = [t.clone() for t in d_kv]
    d.pull("d1", p.agent.metadata(), "r1", [3], [10])
    done, failed = results(d)
    assert not done and "fenced" in failed["d1"] and "lease expired" in failed["d1"]
    assert d.take_stats().failures == {"fenced": 1}
    # the bytes did land (read before the answer), and are reported as a load error
    assert not torch.equal(d_kv[0][:, 10], before[0][:, 10])


def test_decode_abort_frees_prefill_blocks_at_once(pair):
    p, d, _, _ = pair
    p.hold("r1")
    d.abort_remote(p.agent.metadata(), "r1")
    assert released(p, timeout=0.8) == {"r1"}  # well before the 1 s lease
    assert p.take_stats().released == {"abort": 1}


def test_done_before_the_lease_arrives_is_acked_and_released_on_hold(pair):
    p, d, _, _ = pair
    d.pull("d1", p.agent.metadata(), "r1", [3], [10])
    assert results(d) == ({"d1"}, {})
    assert p.take_released() == set()
    p.hold("r1")
    assert p.take_released() == {"r1"}


def test_unreachable_prefill_fails_the_pull_with_its_cause(pair):
    p, d, _, _ = pair
    meta = p.agent.metadata()
    p.close()
    p.agent.close()
    d.pull("d1", meta, "r1", [3], [10])
    done, failed = results(d, timeout=15)
    assert not done and "d1" in failed and "PeerUnreachable" in failed["d1"]


def test_scramble_rotates_the_landed_blocks(pair):
    p, d, p_kv, d_kv = pair
    p.hold("r1")
    d.pull("d1", p.agent.metadata(), "r1", [3, 4], [10, 11], scramble=True)
    assert results(d) == ({"d1"}, {})
    assert torch.equal(d_kv[0][:, 10], p_kv[0][:, 4])
    assert torch.equal(d_kv[0][:, 11], p_kv[0][:, 3])


def test_heartbeats_renew_the_lease(pair):
    p, d, _, _ = pair
    p.hold("r1")
    meta = p.agent.metadata()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2.0:  # twice the 1 s lease, renewed every 0.3 s
        d.heartbeat(meta, ["r1"])
        time.sleep(0.3)
        assert p.take_released() == set()
    assert released(p, timeout=3.0) == {"r1"}  # heartbeats stopped: the lease ends

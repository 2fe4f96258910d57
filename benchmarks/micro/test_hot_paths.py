"""Microbenchmarks of kvxfer's hot functions (pytest-benchmark); not part of `make test`.

    make bench-micro           # run, compare with the saved baseline, fail on a 25% slowdown
    make bench-micro-baseline  # save this machine's figures as the baseline

The codec (lz4 + byte shuffle in DESIGN.md) is not written yet, so it has no benchmark.
"""

from __future__ import annotations

import pytest
import torch

import kvxfer
from kvxfer.packing import pack, unpack
from kvxfer.plan import merge_runs, plan_chunks
from kvxfer.prefix import BlockHasher, PrefixIndex
from kvxfer.protocol.connection import Connection
from kvxfer.protocol.frames import ReadRequest, Write

pytest.importorskip("pytest_benchmark")

RUNS = tuple((i * 3, 2) for i in range(64))  # 64 runs of 2 blocks: a fragmented table


def test_protocol_encode_write(benchmark):
    conn = Connection(expect_hello=False)
    payload = bytearray(1 << 20)
    frame = Write(7, 0, tuple(range(32)), RUNS, len(payload))
    benchmark(conn.send, frame, [payload])


def test_protocol_decode_read_requests(benchmark):
    raw = b"".join(Connection(expect_hello=False).encode(ReadRequest(i, 0, tuple(range(32)), RUNS))
                   for i in range(100))

    def decode() -> int:
        conn = Connection(expect_hello=False)
        conn.receive_data(raw)
        n = 0
        while isinstance(conn.next_event(), ReadRequest):
            n += 1
        return n

    assert benchmark(decode) == 100


def test_plan_chunks_of_a_random_block_table(benchmark):
    gen = torch.Generator().manual_seed(0)
    local = torch.randperm(8192, generator=gen)[:1024].tolist()
    remote = torch.randperm(8192, generator=gen)[:1024].tolist()

    def plan() -> int:
        return len(plan_chunks(merge_runs(local, remote), list(range(32)), 64 << 10, 4 << 20))

    assert benchmark(plan) > 1


@pytest.fixture(scope="module")
def layout() -> kvxfer.KVLayout:
    return kvxfer.KVLayout.vllm([torch.zeros(2, 256, 16, 8, 128, dtype=torch.bfloat16)
                                 for _ in range(4)])


def test_packing_reference_pack(benchmark, layout):
    blocks = list(range(0, 256, 4))
    out = benchmark(pack, layout, blocks)
    assert out.numel() > 0


def test_packing_reference_unpack(benchmark, layout):
    blocks = list(range(1, 256, 4))
    chunk = pack(layout, blocks)
    benchmark(unpack, layout, blocks, None, chunk)


@pytest.fixture(scope="module")
def hashed() -> list[list[bytes]]:
    hasher = BlockHasher(block_size=16)
    system = list(range(1024))
    return [hasher.hash_blocks(system + [5000 + r] * 512) for r in range(64)]


def test_index_ingest(benchmark, hashed):
    def ingest() -> int:
        index = PrefixIndex()
        for w, blocks in enumerate(hashed):
            index.store(f"w{w % 8}", blocks)
        return len(index)

    assert benchmark(ingest) > 64


def test_index_match(benchmark, hashed):
    index = PrefixIndex()
    for w, blocks in enumerate(hashed):
        index.store(f"w{w % 8}", blocks)
    assert benchmark(index.match, hashed[3])


def test_block_hashing(benchmark):
    hasher = BlockHasher(block_size=16)
    tokens = list(range(4096))
    assert len(benchmark(hasher.hash_blocks, tokens)) == 256


@pytest.mark.parametrize("metrics", ["off", "on"])
def test_small_read_with_metrics(benchmark, metrics):
    """Metrics off costs one `is None` test per transfer; on, a gauge, a histogram and
    two counters: compare the two medians."""
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry() if metrics == "on" else None

    def cache() -> kvxfer.KVLayout:
        return kvxfer.KVLayout.vllm([torch.zeros(2, 8, 4, 2, 16) for _ in range(2)])

    with kvxfer.Agent("a", metrics=registry) as a, kvxfer.Agent("b") as b:
        a.register_kv_cache(cache())
        b.register_kv_cache(cache())
        peer = a.add_peer(b.metadata())
        benchmark(lambda: a.read(peer, [1], [2]).wait(10))

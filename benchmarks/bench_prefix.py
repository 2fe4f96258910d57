"""Prefix-index benchmark: match latency, ZMQ ingest rate, memory, against a naive dict.

Run:  python benchmarks/bench_prefix.py [--repeats 5] [--queries 2000]

Every figure is a median over --repeats runs (p99 too: the median of each pass's p99).

Workload: 1,048,576 distinct blocks in 512 chains of 2048 blocks, chain i on worker
i % 64, and every worker also holding the first 256 blocks of 4 other chains (shared
system prompts). A query is a 2048-block request: an indexed chain cut at a random
point and continued with unseen blocks. Ingest replays the same chains as vLLM
BlockStored events (64 blocks x 16 tokens each, 16 events per batch) from a separate
publisher process over a real ZMQ PUB socket into a KVEventSubscriber. The naive
baseline is a dict {key: {worker: tier}} walked block by block, in the same run.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import statistics
import sys
import time

import numpy as np

CHAINS, CHAIN_LEN, WORKERS, SHARED, SHARED_LEN = 512, 2048, 64, 4, 256
EVENT_BLOCKS, EVENTS_PER_BATCH, BLOCK_SIZE = 64, 16, 16


def make_chains(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 2**63, CHAIN_LEN, dtype=np.int64).astype(np.uint64) * np.uint64(2)
            + np.uint64(i & 1) for i in range(CHAINS)]


def placements(chains: list[np.ndarray]) -> list[tuple[int, np.ndarray]]:
    rng = np.random.default_rng(1)
    out = [(i % WORKERS, c) for i, c in enumerate(chains)]
    for w in range(WORKERS):
        for j in rng.choice(CHAINS, SHARED, replace=False):
            out.append((w, chains[int(j)][:SHARED_LEN]))
    return out


def queries(chains: list[np.ndarray], n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    out = []
    for _ in range(n):
        q = chains[int(rng.integers(CHAINS))].copy()
        cut = int(rng.integers(0, CHAIN_LEN + 1))
        q[cut:] = rng.integers(1, 2**63, CHAIN_LEN - cut, dtype=np.int64).astype(np.uint64)
        out.append(q)
    return out


# ------------------------------------------------------------ naive baseline


def naive_store(d: dict, worker: int, keys: list[int]) -> None:
    for k in keys:
        holders = d.get(k)
        if holders is None:
            d[k] = {worker: "gpu"}
        else:
            holders[worker] = "gpu"


def naive_match(d: dict, keys: list[int]) -> dict[int, int]:
    counts: dict[int, int] = {}
    alive: set | None = None
    for i, k in enumerate(keys):
        holders = d.get(k)
        if not holders:
            break
        now = set(holders) if alive is None else alive & holders.keys()
        if not now:
            break
        alive = now
        for w in alive:
            counts[w] = i + 1
    return counts


def naive_nbytes(d: dict) -> int:
    total = sys.getsizeof(d)
    for k, v in d.items():
        total += sys.getsizeof(k) + sys.getsizeof(v)
    return total


# ------------------------------------------------------------ ingest over ZMQ


def encode_payloads(chains: list[np.ndarray], as_bytes: bool) -> tuple[list[bytes], int]:
    from kvxfer.prefix.event_wire import BlockStored, encode_batch
    tokens = list(range(EVENT_BLOCKS * BLOCK_SIZE))
    events, payloads, blocks = [], [], 0
    for i, chain in enumerate(chains):
        for at in range(0, CHAIN_LEN, EVENT_BLOCKS):
            part = chain[at:at + EVENT_BLOCKS]
            hashes = [int(k).to_bytes(8, "big") * 4 for k in part.tolist()] if as_bytes \
                else part.tolist()
            parent = None if at == 0 else int(chain[at - 1])
            events.append(BlockStored(hashes, parent, tokens, BLOCK_SIZE, medium="GPU"))
            blocks += len(hashes)
            if len(events) == EVENTS_PER_BATCH:
                payloads.append(encode_batch(events, float(i)))
                events = []
    if events:
        payloads.append(encode_batch(events, 0.0))
    return payloads, blocks


def feeder(endpoint_q: mp.Queue, go: mp.Event, start: mp.Event, as_bytes: bool) -> None:
    """Publisher process: bind, sync with the subscriber, then send every batch."""
    import zmq
    from kvxfer.prefix.event_wire import encode_batch
    payloads, _ = encode_payloads(make_chains(), as_bytes)
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind("tcp://127.0.0.1:*")
    endpoint_q.put(pub.getsockopt(zmq.LAST_ENDPOINT).decode())
    seq, empty = 0, encode_batch([], 0.0)
    while not go.is_set():  # slow joiner: empty batches until the subscriber has one
        pub.send_multipart([b"", seq.to_bytes(8, "big"), empty])
        seq += 1
        go.wait(0.01)
    endpoint_q.put(seq)
    start.wait(60)  # the clock starts before the first data batch leaves
    for payload in payloads:
        pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])
        seq += 1
    endpoint_q.put(seq - 1)
    pub.close(linger=60_000)


def ingest_once(as_bytes: bool, presized: bool) -> tuple[float, int, int]:
    from kvxfer.prefix.index import IndexConfig, PrefixIndex
    from kvxfer.prefix.subscriber import KVEventSubscriber, SubscriberConfig
    ctx = mp.get_context("spawn")
    q, go, begin = ctx.Queue(), ctx.Event(), ctx.Event()
    proc = ctx.Process(target=feeder, args=(q, go, begin, as_bytes))
    proc.start()
    # Presized: capacity for the whole workload up front, as a deployment sized by its
    # max_entries budget would be; otherwise the table grows (and rebuilds) from 1024.
    index = PrefixIndex(IndexConfig(initial_capacity=1 << 21 if presized else 1024))
    sub = KVEventSubscriber(index, "engine", q.get(timeout=120),
                            config=SubscriberConfig(poll_ms=5, rcvhwm=0)).start()
    try:
        deadline = time.monotonic() + 30
        while sub.stats().batches == 0:
            if time.monotonic() > deadline:
                raise RuntimeError("subscriber never connected")
            time.sleep(0.005)
        go.set()
        first = q.get(timeout=60)
        sub.wait_applied(first - 1, 30)
        base = sub.stats().blocks_stored
        t0 = time.perf_counter()
        begin.set()
        last = q.get(timeout=300)
        if not sub.wait_applied(last, 300):
            raise RuntimeError("ingest did not finish")
        elapsed = time.perf_counter() - t0
        stats = sub.stats()
        if stats.gaps or stats.malformed:
            raise RuntimeError(f"lost batches during ingest: {stats}")
        return elapsed, stats.blocks_stored - base, len(index)
    finally:
        sub.close()
        proc.join(timeout=60)


# ------------------------------------------------------------ main


def latency(fn, inputs: list, repeats: int) -> str:
    """Wall-clock p50 / p99 in microseconds, then the same in thread CPU time.

    Each percentile is a median over ``repeats`` passes. CPU time excludes the time
    the thread sat preempted, which on a shared 2-core VM is most of a bad p99.
    """
    wall: list[list[float]] = [[], []]
    cpu: list[list[float]] = [[], []]
    for _ in range(repeats):
        lat, busy = [], []
        for q in inputs:
            c0, t0 = time.thread_time(), time.perf_counter()
            fn(q)
            lat.append(time.perf_counter() - t0)
            busy.append(time.thread_time() - c0)
        for out, values in ((wall, lat), (cpu, busy)):
            out[0].append(np.percentile(values, 50))
            out[1].append(np.percentile(values, 99))
    w50, w99, c50, c99 = (statistics.median(v) * 1e6 for v in (*wall, *cpu))
    return f"{w50:.0f} / {w99:.0f} (cpu {c50:.0f} / {c99:.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--queries", type=int, default=2000)
    args = parser.parse_args()

    from kvxfer.prefix.index import PrefixIndex
    chains = make_chains()
    placed = placements(chains)
    rows: list[tuple[str, str, str]] = []

    build, index = [], None
    for _ in range(args.repeats):
        index = PrefixIndex()
        t0 = time.perf_counter()
        for worker, keys in placed:
            index.store(worker, keys)
        build.append(time.perf_counter() - t0)
    assert index is not None
    stats = index.stats()
    naive: dict = {}
    t0 = time.perf_counter()
    for worker, keys in placed:
        naive_store(naive, worker, keys.tolist())
    naive_build = time.perf_counter() - t0
    locations = sum(len(k) for _, k in placed)
    rows.append(("indexed blocks / locations", f"{stats.entries:,} / {locations:,}",
                 f"{len(naive):,}"))
    rows.append(("bulk store, blocks/s (median)", f"{locations / statistics.median(build):,.0f}",
                 f"{locations / naive_build:,.0f}"))
    rows.append(("bytes per indexed block", f"{stats.nbytes / stats.entries:.0f}",
                 f"{naive_nbytes(naive) / len(naive):.0f}"))

    qs = queries(chains, args.queries)
    for label, form in (("uint64 array", lambda q: q),
                        ("32-byte digests", lambda q: [int(k).to_bytes(8, "big") * 4
                                                       for k in q.tolist()])):
        inputs = [form(q) for q in qs]
        for q in inputs[:20]:
            index.match(q)
        rows.append((f"match 2048 blocks ({label}) p50 / p99 us",
                     latency(index.match, inputs, args.repeats), ""))
    lists = [q.tolist() for q in qs]
    for ql, qa in zip(lists[:50], qs):
        assert naive_match(naive, ql) == index.match(qa), "naive and index disagree"
    rows.append(("naive dict match 2048 blocks p50 / p99 us", "",
                 latency(functools.partial(naive_match, naive), lists, args.repeats)))
    del naive, index

    for as_bytes, presized in ((False, True), (True, True), (False, False), (True, False)):
        rates = []
        for _ in range(args.repeats):
            elapsed, blocks, entries = ingest_once(as_bytes, presized)
            assert entries == CHAINS * CHAIN_LEN, entries
            rates.append(blocks / elapsed)
        kind = ("32-byte digests" if as_bytes else "int hashes") + \
            (", presized" if presized else ", growing")
        rows.append((f"ZMQ ingest, {kind}, blocks/s (median of {args.repeats})",
                     f"{statistics.median(rates):,.0f}",
                     f"min {min(rates):,.0f} max {max(rates):,.0f}"))

    width = max(len(r[0]) for r in rows)
    print(f"{'metric':<{width}}  {'kvxfer PrefixIndex':>30}  {'naive dict / notes':>30}")
    for name, ours, theirs in rows:
        print(f"{name:<{width}}  {ours:>30}  {theirs:>30}")


if __name__ == "__main__":
    main()

"""Heterogeneous tensor parallelism: a TP=2 rank reads its half of the KV from a TP=1 peer,
against the same read from a TP=2 peer, alternated in one run, per backend and layout.

A server process holds the KV of a ``--tokens`` prompt of ``--model`` (Llama-3.1-8B by
default: 32 layers, 8 KV heads of 128, bf16, 16-token blocks) twice: as a TP=1 worker
(every head) and as rank 0 of TP=2 (heads 0-3), one agent each per backend. The client
is rank 0 of TP=2. Each repeat reads the whole prompt from the TP=2 peer (same shard:
whole blocks move) and then from the TP=1 peer (half of each of its blocks: the serving
side packs heads 0-3; NIXL posts per-head-range descriptors, or, when those pieces are
small (NHD), reads the whole blocks and picks heads 0-3 while unpacking), for every
backend in turn. Both reads move the same bytes, the half the TP=2 rank owns; GB/s is that over
the median time, and the ratio is heterogeneous / homogeneous. Every read is checked
byte for byte (sampled regions) against the TP=1 reference's heads 0-3.

    python benchmarks/bench_tp.py [--backend tcp ucx nixl nccl] [--layout NHD HND]
                                  [--tokens 4096] [--repeats 7] [--model llama-3.1-8b]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
sys.path.insert(0, HERE)
import kvxfer  # noqa: E402
from bench_transfer import _cpu_model, alternate, spawn_server  # noqa: E402
from kv_models import ModelGeometry, model_geometry  # noqa: E402


def reference(geo: ModelGeometry, blocks: int, order: str, seed: int) -> list[torch.Tensor]:
    """Per layer, the unsharded KV (every head) in ``order``, filled by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    shape = (2, blocks, geo.block_size, geo.kv_heads, geo.head_dim) if order == "NHD" else \
        (2, blocks, geo.kv_heads, geo.block_size, geo.head_dim)
    size = torch.empty(0, dtype=geo.dtype).element_size()
    numel = 1
    for s in shape:
        numel *= s
    return [torch.randint(0, 256, (numel * size,), dtype=torch.uint8, generator=gen)
            .view(geo.dtype).view(shape) for _ in range(geo.layers)]


def shard(full: list[torch.Tensor], geo: ModelGeometry, order: str, rank: int,
          tp_size: int) -> kvxfer.KVLayout:
    """Rank ``rank`` of ``tp_size``'s layout: its heads of ``full`` (copied unless all)."""
    per = geo.kv_heads // tp_size
    axis = 3 if order == "NHD" else 2
    tensors = [t.narrow(axis, rank * per, per).contiguous() for t in full]
    return kvxfer.KVLayout.vllm(tensors, kv_layout=order, tp_rank=rank, tp_size=tp_size,
                                total_kv_heads=geo.kv_heads)


def server(args: argparse.Namespace, q, stop) -> None:
    geo = model_geometry(args.model)
    full = reference(geo, args.blocks, args.order, seed=1)
    layouts = {"tp1": shard(full, geo, args.order, 0, 1), "tp2": shard(full, geo, args.order, 0, 2)}
    agents = {}
    try:
        for name in args.backend:
            for tp, layout in layouts.items():
                agent = kvxfer.Agent(f"bench-{tp}-{name}", backend=name)
                agent.register_kv_cache(layout)
                agents[(name, tp)] = agent
        q.put({key: agent.metadata() for key, agent in agents.items()})
        stop.wait()
    finally:
        for agent in agents.values():
            agent.close()


def timed_read(agent: kvxfer.Agent, peer: kvxfer.Peer, local: kvxfer.KVLayout,
               expected: kvxfer.KVLayout, blocks: int) -> Callable[[], float]:
    ids = list(range(blocks))

    def run() -> float:
        for r in local.regions[::16]:  # a stale block must not pass the check
            r.view.zero_()
        t0 = time.perf_counter()
        agent.read(peer, ids, ids).wait(300)
        t = time.perf_counter() - t0
        for mine, want in zip(local.regions[::8], expected.regions[::8]):
            assert torch.equal(mine.view.view(torch.uint8), want.view.view(torch.uint8)), \
                "kvxfer read corrupted KV"
        return t
    return run


def run_layout(args: argparse.Namespace, geo: ModelGeometry) -> list[tuple]:
    proc, stop, meta = spawn_server(server, args)
    rows = []
    try:
        full = reference(geo, args.blocks, args.order, seed=1)
        expected = shard(full, geo, args.order, 0, 2)
        del full
        local = shard(reference(geo, args.blocks, args.order, seed=2), geo, args.order, 0, 2)
        agents, runs = [], {}
        for name in args.backend:
            agent = kvxfer.Agent(f"bench-client-{name}", backend=name)
            agent.register_kv_cache(local)
            agents.append(agent)
            homo, hetero = agent.add_peer(meta[(name, "tp2")]), agent.add_peer(meta[(name, "tp1")])
            assert not homo.heads.sliced and hetero.heads.remote == (0, 4)
            runs[(name, "homo")] = timed_read(agent, homo, local, expected, args.blocks)
            runs[(name, "hetero")] = timed_read(agent, hetero, local, expected, args.blocks)
        med = alternate(args.repeats, runs)
        nbytes = local.bytes_per_block * args.blocks
        for name in args.backend:
            homo, hetero = nbytes / med[(name, "homo")] / 1e9, nbytes / med[(name, "hetero")] / 1e9
            rows.append((args.order, name, nbytes, homo, hetero, hetero / homo))
        for agent in agents:
            agent.close()
    finally:
        stop.set()
        proc.join(30)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", nargs="+", default=["tcp", "ucx", "nixl", "nccl"])
    ap.add_argument("--layout", nargs="+", choices=["NHD", "HND"], default=["NHD", "HND"])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    geo = model_geometry(args.model)
    if geo.mla_latent_dim or geo.kv_heads % 2:
        raise SystemExit(f"{args.model} has no KV heads to split over TP=2")
    args.blocks = -(-args.tokens // geo.block_size)
    load = os.getloadavg()
    rows = []
    for order in args.layout:
        args.order = order
        rows += run_layout(args, geo)
    print(f"\nTP=2 rank reads {args.tokens} tokens of {args.model} from a TP=2 peer (homo) "
          f"and a TP=1 peer (hetero), {args.repeats} repeats alternated (+2 warm-ups), medians")
    print(f"{platform.node()}: {os.cpu_count()} cores, {_cpu_model()}, torch {torch.__version__},"
          f" load {load[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'layout':6} {'backend':7} {'MiB':>6} {'homo GB/s':>10} {'hetero GB/s':>12} "
          f"{'hetero/homo':>12}")
    for order, name, nbytes, homo, hetero, ratio in rows:
        print(f"{order:6} {name:7} {nbytes / 2**20:6.0f} {homo:10.2f} {hetero:12.2f} "
              f"{ratio:11.2f}x")
    print("median of", statistics.median(r[5] for r in rows), "over every row")


if __name__ == "__main__":
    main()

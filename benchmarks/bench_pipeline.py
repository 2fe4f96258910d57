"""Pipeline benchmarks, two processes: layer-wise push against a bulk write, and a demand
read's latency while a prefetch streams from the same peer.

A server process registers a KV cache shaped like a real model (Llama-3.1-8B by default:
32 layers, 8 KV heads x 128 bf16, 16-token blocks, 64 KiB per block and layer) with one
agent per backend asked for. The client holds the same geometry.

Layer-wise (``exposed``): a prefill of ``--prefill-tokens`` over all layers, each layer
"computed" by real float32 matmuls on one thread, sized so one layer's compute takes as
long as one layer's transfer (measured first, in the same run). ``bulk`` computes every
layer, then writes them all; ``stream`` calls ``layer_ready(i)`` after layer i. Reported:
the transfer time left exposed after the last layer was computed (median), against one
layer's transfer time. Target: stream <= one layer's transfer; bulk pays all of them.

Head-of-line (``hol``): the latency of a ``--demand-tokens`` read on an idle link, and
while a ``--prefetch-tokens`` read streams from the same peer, once as
``priority="prefetch"`` and once (the control: no priorities) as demand. Target:
<= 1.5x idle with priorities.

    python benchmarks/bench_pipeline.py [--backend tcp ucx nixl] [--repeats 7]
                                        [--only exposed hol]
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import kvxfer  # noqa: E402
from bench_transfer import spawn_server  # noqa: E402
from kv_models import make_kv_cache, model_geometry  # noqa: E402


def server(args: argparse.Namespace, q, stop) -> None:
    layout = make_kv_cache(model_geometry(args.model), args.blocks, seed=1)
    agents = [kvxfer.Agent(f"pipe-server-{name}", backend=name) for name in args.backend]
    try:
        for agent in agents:
            agent.register_kv_cache(layout)
        q.put(([agent.metadata() for agent in agents], 0))
        stop.wait()
    finally:
        for agent in agents:
            agent.close()


class Compute:
    """One layer's worth of real work: ``reps`` float32 matmuls of n x n (one thread,
    GIL released, so the backend's threads run beside it)."""

    def __init__(self, seconds: float) -> None:
        self.a = torch.randn(256, 256)
        self.b = torch.randn(256, 256)
        self.reps = 20
        for _ in range(3):  # warm, then scale reps by what a call really takes
            took = min(_timed(self) for _ in range(3))
            self.reps = max(1, round(self.reps * seconds / took))

    def __call__(self) -> None:
        for _ in range(self.reps):
            torch.mm(self.a, self.b)


def exposed(agent: kvxfer.Agent, peer: kvxfer.Peer, blocks: list[int], layers: int,
            compute: Compute, mode: str) -> tuple[float, float]:
    """(seconds exposed after the last layer was computed, seconds in all)."""
    t0 = time.perf_counter()
    if mode == "bulk":
        for _ in range(layers):
            compute()
        last = time.perf_counter()
        agent.write(peer, blocks, blocks).wait(120)
    else:
        s = agent.write_stream(peer, blocks, blocks, request=b"prefill-%d" % time.monotonic_ns())
        for layer in range(layers):
            compute()
            s.layer_ready(layer)
        last = time.perf_counter()
        s.finish()
        s.handle.wait(120)
    end = time.perf_counter()
    return end - last, end - t0


def median_of(repeats: int, fn: Callable[[], float]) -> float:
    return statistics.median(fn() for _ in range(repeats))


def run_exposed(args: argparse.Namespace, agent: kvxfer.Agent, peer: kvxfer.Peer,
                layout: kvxfer.KVLayout) -> list[str]:
    blocks = list(range(args.prefill_tokens // layout.descriptor.block_size))
    layers = layout.num_layers

    def one_layer() -> float:
        t0 = time.perf_counter()
        agent.write(peer, blocks, blocks, layers=[layers // 2]).wait(60)
        return time.perf_counter() - t0

    median_of(3, one_layer)  # warm
    t_layer = median_of(args.repeats * 2, one_layer)
    compute = Compute(t_layer)
    t_compute = median_of(3, lambda: _timed(lambda: [compute() for _ in range(layers)]))
    got: dict[str, list[tuple[float, float]]] = {"bulk": [], "stream": []}
    for rep in range(args.repeats + 1):
        for mode in got:
            r = exposed(agent, peer, blocks, layers, compute, mode)
            if rep:
                got[mode].append(r)
    rows = [f"| {args.model} | {agent.backend_name} | {len(blocks) * 16} tokens | "
            f"{t_layer * 1e3:.2f} ms | {t_compute * 1e3:.1f} ms |"]
    for mode, results in got.items():
        exp = statistics.median(e for e, _ in results)
        total = statistics.median(t for _, t in results)
        rows.append(f"|  | {mode} | exposed {exp * 1e3:.2f} ms = {exp / t_layer:.2f} layers | "
                    f"total {total * 1e3:.1f} ms | |")
    return rows


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_hol(args: argparse.Namespace, agent: kvxfer.Agent, peer: kvxfer.Peer,
            layout: kvxfer.KVLayout) -> list[str]:
    bs = layout.descriptor.block_size
    demand = list(range(args.demand_tokens // bs))
    start = len(demand)
    prefetch = list(range(start, start + args.prefetch_tokens // bs))

    def idle() -> float:
        return _timed(lambda: agent.read(peer, demand, demand).wait(60))

    def loaded(priority: str) -> Callable[[], float]:
        def run() -> float:
            pre = agent.read(peer, prefetch, prefetch, priority=priority)
            while pre._chunks_left > len(pre.chunks) - 2 and not pre.done():
                time.sleep(0.0005)  # streaming: its first chunks have landed
            t = _timed(lambda: agent.read(peer, demand, demand).wait(60))
            left = pre._chunks_left
            pre.wait(120)
            if left == 0:
                print(f"  note: the prefetch had finished before the demand read ({priority})")
            return t
        return run

    runs = {"idle": idle, "prefetch": loaded("prefetch"), "no priority": loaded("demand")}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for rep in range(args.repeats + 1):
        for key, fn in runs.items():
            t = fn()
            if rep:
                times[key].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return [f"| {agent.backend_name} | {args.demand_tokens} tokens | "
            f"{med['idle'] * 1e3:.2f} ms | {med['prefetch'] * 1e3:.2f} ms "
            f"({med['prefetch'] / med['idle']:.2f}x) | {med['no priority'] * 1e3:.2f} ms "
            f"({med['no priority'] / med['idle']:.2f}x) |"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", nargs="+", default=["tcp"])
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--prefill-tokens", type=int, default=1024)
    p.add_argument("--demand-tokens", type=int, default=128)
    p.add_argument("--prefetch-tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--only", nargs="+", default=["exposed", "hol"])
    args = p.parse_args()
    geo = model_geometry(args.model)
    args.blocks = (max(args.prefill_tokens, args.demand_tokens + args.prefetch_tokens)
                   // geo.block_size) + 1
    torch.set_num_threads(1)
    proc, stop, (metas, _) = spawn_server(server, args)
    layout = make_kv_cache(geo, args.blocks, seed=2)
    print(f"machine: {platform.node()} {os.cpu_count()} cores, torch {torch.__version__}")
    exp_rows, hol_rows = [], []
    try:
        for name, meta in zip(args.backend, metas):
            with kvxfer.Agent(f"pipe-client-{name}", backend=name) as agent:
                agent.register_kv_cache(layout)
                peer = agent.add_peer(meta)
                if "exposed" in args.only:
                    exp_rows += run_exposed(args, agent, peer, layout)
                if "hol" in args.only:
                    hol_rows += run_hol(args, agent, peer, layout)
    finally:
        stop.set()
        proc.join(30)
    if exp_rows:
        print("\nLayer-wise push: transfer time exposed after the last layer's compute")
        print("| model | backend / mode | prefill | one layer's transfer | compute, all layers |")
        print("|---|---|---|---|---|")
        print("\n".join(exp_rows))
    if hol_rows:
        print(f"\nHead-of-line: {args.demand_tokens}-token demand read, idle and while a "
              f"{args.prefetch_tokens}-token read streams from the same peer (medians)")
        print("| backend | demand | idle | beside a prefetch | beside a demand read "
              "(no priorities) |")
        print("|---|---|---|---|---|")
        print("\n".join(hol_rows))


if __name__ == "__main__":
    main()

"""Two processes on one GPU: kvxfer reads VRAM to VRAM vs. a device-to-device copy.

A server process holds a KV cache on the GPU (Llama-3.1-8B geometry by default) with
one agent per backend (ucx: packed chunks over cuda_ipc / cuda_copy; nixl: one-sided
VRAM descriptors over its UCX plugin). The client process, on the same GPU, reads
random blocks with each backend in turn, checks them byte for byte, and times a
device-to-device copy of the same number of bytes in its own memory as the ceiling.
Without a CUDA device it says so and exits 0 (nothing to measure).

    python benchmarks/gpu_transfer.py [--backend ucx nixl] [--tokens 4096 128] [--repeats 15]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import kvxfer  # noqa: E402
from bench_transfer import measure, spawn_server  # noqa: E402
from kv_models import make_kv_cache, model_geometry  # noqa: E402


def server(args: argparse.Namespace, q: "mp.Queue", stop: "mp.Event") -> None:
    layout = make_kv_cache(model_geometry(args.model), args.blocks, seed=1, device="cuda")
    agents = [kvxfer.Agent(f"gpu-server-{name}", backend=name) for name in args.backend]
    try:
        for agent in agents:
            agent.register_kv_cache(layout)
        q.put([agent.metadata() for agent in agents])
        stop.wait()
    finally:
        for agent in agents:
            agent.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", nargs="+", default=["ucx", "nixl"])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 128])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("SKIPPED: no CUDA device here; this benchmark needs one GPU (two processes "
              "share it).")
        return
    geo = model_geometry(args.model)
    args.blocks = max(args.tokens) // geo.block_size
    proc, stop, metas = spawn_server(server, args)
    local = make_kv_cache(geo, args.blocks, seed=2, device="cuda")
    expected = make_kv_cache(geo, args.blocks, seed=1, device="cuda")
    agents = [kvxfer.Agent(f"gpu-client-{name}", backend=name) for name in args.backend]
    rows = []
    try:
        peers = []
        for agent, meta in zip(agents, metas):
            agent.register_kv_cache(local)
            peers.append(agent.add_peer(meta))
        gen = torch.Generator().manual_seed(3)
        for tokens in args.tokens:
            nblocks = tokens // geo.block_size
            nbytes = nblocks * local.bytes_per_block
            src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
            kv, cp = measure(args, agents, peers, local, expected, nblocks, gen,
                             lambda: (dst.copy_(src), torch.cuda.synchronize()))
            rows += [(name, tokens, nbytes, kv[name], cp) for name in args.backend]
    finally:
        for agent in agents:
            agent.close()
        stop.set()
        proc.join(30)
    print(f"\nkvxfer VRAM->VRAM read between two processes on {torch.cuda.get_device_name()}, "
          f"model={args.model}, random block ids, {args.repeats} repeats, medians")
    print(f"{'backend':>8} {'tokens':>7} {'bytes':>11} {'kvxfer ms':>10} {'GB/s':>7} "
          f"{'d2d copy ms':>12} {'copy GB/s':>10} {'of copy':>8}")
    for name, tokens, nbytes, kv, cp in rows:
        print(f"{name:>8} {tokens:>7} {nbytes:>11} {kv * 1e3:>10.2f} {nbytes / kv / 1e9:>7.1f} "
              f"{cp * 1e3:>12.3f} {nbytes / cp / 1e9:>10.1f} {cp / kv:>8.1%}")


if __name__ == "__main__":
    main()

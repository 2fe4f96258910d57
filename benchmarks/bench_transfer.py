"""Two-process KV read benchmark: kvxfer Agent.read vs. a raw socket stream, alternated.

A server process registers a KV cache shaped like a real model (../shared/kv_shapes.json
geometry; Llama-3.1-8B by default) with one agent per backend asked for, and also serves
a raw TCP stream: on an 8-byte length request it sends that many bytes from one
preallocated buffer. The client process reads the same number of bytes every way, in
turn within each repeat (each backend, then the raw socket), and reports medians and
each backend's ratio to the same raw baseline. Every kvxfer read is checked byte for
byte against the server's deterministic data.

    python benchmarks/bench_transfer.py [--backend tcp ucx nixl] [--tokens 4096 128]
                                        [--repeats 15]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import socket
import statistics
import struct
import sys
import threading
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import kvxfer  # noqa: E402
from kv_models import make_kv_cache, model_geometry  # noqa: E402


def _tune(sock: socket.socket) -> None:
    """The raw baseline gets the same socket options as kvxfer's TCP backend."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)


def _raw_server(lsock: socket.socket, buf: memoryview) -> None:
    conn, _ = lsock.accept()
    _tune(conn)
    with conn:
        while True:
            head = conn.recv(8, socket.MSG_WAITALL)
            if len(head) < 8:
                return
            (n,) = struct.unpack("!Q", head)
            conn.sendall(buf[:n])


def server(args: argparse.Namespace, q: "mp.Queue", stop: "mp.Event") -> None:
    torch.manual_seed(0)
    geo = model_geometry(args.model)
    layout = make_kv_cache(geo, args.blocks, seed=1)
    lsock = socket.create_server(("127.0.0.1", 0))
    raw = bytearray(layout.bytes_per_block * args.blocks)
    threading.Thread(target=_raw_server, args=(lsock, memoryview(raw)), daemon=True).start()
    agents = [kvxfer.Agent(f"bench-server-{name}", backend=name, staged=args.staged)
              for name in args.backend]
    try:
        for agent in agents:
            agent.register_kv_cache(layout)
        q.put(([agent.metadata() for agent in agents], lsock.getsockname()[1]))
        stop.wait()
    finally:
        for agent in agents:
            agent.close()


def spawn_server(target: Callable, args: argparse.Namespace) -> tuple:
    """Start ``target(args, queue, stop)`` in a spawned process.

    Returns:
        (process, stop event, the first thing it put on the queue).
    """
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=target, args=(args, q, stop), daemon=True)
    proc.start()
    return proc, stop, q.get(timeout=300)


def raw_read(sock: socket.socket, dest: memoryview, n: int) -> None:
    sock.sendall(struct.pack("!Q", n))
    got = 0
    while got < n:
        k = sock.recv_into(dest[got:n])
        if k == 0:
            raise ConnectionError("raw server closed")
        got += k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", nargs="+", default=["tcp"],
                    help="one or more backends, measured in turn in one run")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 128])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--chunk-mib", type=float, default=None,
                    help="kvxfer chunk size (default: the Agent's)")
    ap.add_argument("--order", choices=["random", "contiguous"], default="random",
                    help="block ids: a random permutation (scattered) or one run")
    ap.add_argument("--staged", action="store_true",
                    help="two-sided backends pack chunks into staging buffers (the CUDA path)")
    args = ap.parse_args()
    geo = model_geometry(args.model)
    args.blocks = max(args.tokens) // geo.block_size
    proc, stop, (meta, raw_port) = spawn_server(server, args)
    local = make_kv_cache(geo, args.blocks, seed=2)
    expected = make_kv_cache(geo, args.blocks, seed=1)  # what the server holds
    rows: dict[str, list] = {name: [] for name in args.backend}
    options = {} if args.chunk_mib is None else {"chunk_bytes": int(args.chunk_mib * (1 << 20))}
    options["staged"] = args.staged
    agents = [kvxfer.Agent(f"bench-client-{name}", backend=name, **options)
              for name in args.backend]
    try:
        peers = []
        for agent, server_meta in zip(agents, meta):
            agent.register_kv_cache(local)
            peers.append(agent.add_peer(server_meta))
        raw = socket.create_connection(("127.0.0.1", raw_port))
        _tune(raw)
        sink = memoryview(bytearray(local.bytes_per_block * args.blocks))
        gen = torch.Generator().manual_seed(3)
        for tokens in args.tokens:
            nblocks = tokens // geo.block_size
            nbytes = nblocks * local.bytes_per_block
            kv, rw = measure(args, agents, peers, local, expected, nblocks, gen,
                             lambda: raw_read(raw, sink, nbytes))
            for name in args.backend:
                rows[name].append((tokens, nbytes, kv[name], rw))
        raw.close()
    finally:
        for agent in agents:
            agent.close()
    stop.set()
    proc.join(10)
    for name in args.backend:
        report(args, name, rows[name])


def measure(args: argparse.Namespace, agents: list, peers: list, local: kvxfer.KVLayout,
            expected: kvxfer.KVLayout, nblocks: int, gen: torch.Generator,
            baseline: Callable[[], object]) -> tuple[dict[str, float], float]:
    """Median seconds of each backend's read of ``nblocks`` blocks, and of ``baseline``.

    Each repeat reads with every backend in turn (checking the bytes), then runs the
    baseline once; two warm-up repeats are not counted.
    """
    t_kv: dict[str, list[float]] = {name: [] for name in args.backend}
    t_base = []
    for rep in range(args.repeats + 2):
        for name, agent, peer in zip(args.backend, agents, peers):
            if getattr(args, "order", "random") == "random":
                remote = torch.randperm(args.blocks, generator=gen)[:nblocks].tolist()
                dest = torch.randperm(args.blocks, generator=gen)[:nblocks].tolist()
            else:
                remote = dest = list(range(nblocks))
            t0 = time.perf_counter()
            agent.read(peer, remote, dest).wait(120)
            t1 = time.perf_counter()
            check(local, expected, remote, dest)
            if rep >= 2:
                t_kv[name].append(t1 - t0)
        t1 = time.perf_counter()
        baseline()
        if rep >= 2:
            t_base.append(time.perf_counter() - t1)
    return ({name: statistics.median(t) for name, t in t_kv.items()},
            statistics.median(t_base))


def check(local: kvxfer.KVLayout, expected: kvxfer.KVLayout, remote: list[int],
          dest: list[int]) -> None:
    """Sampled regions of the read blocks must equal the server's bytes."""
    for r in expected.regions[:: max(1, len(expected.regions) // 8)]:
        mine = local.region(r.layer, r.part).view
        assert torch.equal(mine[dest].view(torch.uint8), r.view[remote].view(torch.uint8)), \
            "kvxfer read corrupted KV"


def report(args: argparse.Namespace, backend: str, rows: list) -> None:
    print(f"\nkvxfer read vs raw socket, backend={backend}, model={args.model}, "
          f"block ids {args.order}, chunk {args.chunk_mib or 'default'} MiB, {args.repeats} "
          "repeats alternated, medians")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, Python "
          f"{platform.python_version()}, torch {torch.__version__}")
    print(f"{'tokens':>7} {'bytes':>11} {'kvxfer ms':>10} {'kvxfer GB/s':>12} {'raw ms':>8} "
          f"{'raw GB/s':>9} {'ratio':>6}")
    for tokens, nbytes, kv, rw in rows:
        print(f"{tokens:>7} {nbytes:>11} {kv * 1e3:>10.2f} {nbytes / kv / 1e9:>12.2f} "
              f"{rw * 1e3:>8.2f} {nbytes / rw / 1e9:>9.2f} {rw / kv:>6.2f}")


if __name__ == "__main__":
    main()

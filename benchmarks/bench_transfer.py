"""Two-process KV read benchmark: kvxfer Agent.read vs. a raw socket and iperf3, alternated.

A server process registers a KV cache shaped like a real model (../shared/kv_shapes.json
geometry; Llama-3.1-8B by default) with one agent per backend asked for, and also serves
a raw TCP stream: on an 8-byte length request it sends that many bytes from one
preallocated buffer. The client process reads the same number of bytes every way, in
turn within each repeat (each backend, then the raw socket, then one iperf3 run), and
reports medians and each backend's ratio to both baselines. Every kvxfer read is checked
byte for byte against the server's deterministic data.

iperf3 is the C reference for one TCP stream over loopback: a server on a free port of
127.0.0.1 for the whole run, and per repeat ``iperf3 -c 127.0.0.1 -p PORT -n BYTES -R -J``
(one stream; -R: the server sends, as in a kvxfer read), timed by iperf3's receiver
(``end.sum_received.bits_per_second``). Without the iperf3 binary that column is skipped
with a message; install it with ``apt-get update && apt-get install -y iperf3``.

``--scattered`` is SGLang's page size 1: 1-token blocks (4 KiB per K or V block per
layer for Llama-3.1-8B), 256 MiB read with random block ids on both sides and with one
contiguous run, alternated in one run, and the ratio scattered / contiguous.

    python benchmarks/bench_transfer.py [--backend tcp ucx nixl] [--tokens 4096 128]
                                        [--repeats 15] [--order random contiguous]
                                        [--page-size 1] [--scattered] [--no-iperf3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import kvxfer  # noqa: E402
from kv_models import ModelGeometry, make_kv_cache, model_geometry  # noqa: E402

IPERF3_INSTALL = "apt-get update && apt-get install -y iperf3"
SCATTERED_BYTES = 256 << 20


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


def geometry(args: argparse.Namespace) -> ModelGeometry:
    """The model's geometry, with ``--page-size`` tokens per block if given."""
    geo = model_geometry(args.model)
    page = getattr(args, "page_size", None)
    return geo if page is None else dataclasses.replace(geo, block_size=page)


def server(args: argparse.Namespace, q: "mp.Queue", stop: "mp.Event") -> None:
    torch.manual_seed(0)
    layout = make_kv_cache(geometry(args), args.blocks, seed=1)
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


class Iperf3:
    """One loopback iperf3 server for the run; ``read(n)`` is one single-stream client
    run in which the server sends ``n`` bytes (-R), timed by iperf3's receiver."""

    def __init__(self, exe: str) -> None:
        self.exe = exe
        with socket.socket() as probe:  # a free port on loopback (released for iperf3)
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.proc = subprocess.Popen([exe, "-s", "-B", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.version = subprocess.run([exe, "--version"], capture_output=True,
                                      text=True).stdout.split("\n")[0].strip()

    def command(self, n: int | str) -> list[str]:
        return [self.exe, "-c", "127.0.0.1", "-p", str(self.port), "-n", str(n), "-R", "-J"]

    def read(self, n: int) -> float:
        """Seconds for ``n`` bytes at iperf3's receiver rate (retries while the server
        is starting up or still closing the previous test)."""
        for attempt in range(50):
            out = subprocess.run(self.command(n), capture_output=True, text=True, timeout=120)
            try:
                result = json.loads(out.stdout)
            except json.JSONDecodeError:
                result = {"error": out.stderr.strip() or "no JSON output"}
            if "error" not in result:
                bps = result["end"]["sum_received"]["bits_per_second"]
                return n * 8 / bps
            if self.proc.poll() is not None:
                break
            time.sleep(0.05 * (attempt + 1))
        raise RuntimeError(f"iperf3 failed: {result['error']}")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def alternate(repeats: int, runs: dict[str, Callable[[], float]],
              warmups: int = 2) -> dict[str, float]:
    """Median seconds of each run; every repeat calls each once, in the dict's order.

    Each callable returns the seconds it measured. ``warmups`` repeats are not counted.
    """
    times: dict[str, list[float]] = {key: [] for key in runs}
    for rep in range(repeats + warmups):
        for key, run in runs.items():
            t = run()
            if rep >= warmups:
                times[key].append(t)
    return {key: statistics.median(t) for key, t in times.items()}


def kv_read(agent: kvxfer.Agent, peer: object, local: kvxfer.KVLayout,
            expected: kvxfer.KVLayout, blocks: int, nblocks: int, order: str,
            gen: torch.Generator) -> Callable[[], float]:
    """One timed read of ``nblocks`` blocks (random ids on both sides, or one run),
    checked against the server's bytes after the clock stops."""
    def run() -> float:
        if order == "random":
            remote = torch.randperm(blocks, generator=gen)[:nblocks].tolist()
            dest = torch.randperm(blocks, generator=gen)[:nblocks].tolist()
        else:
            remote = dest = list(range(nblocks))
        t0 = time.perf_counter()
        agent.read(peer, remote, dest).wait(120)
        t = time.perf_counter() - t0
        check(local, expected, remote, dest)
        return t
    return run


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return run


def measure(args: argparse.Namespace, agents: list, peers: list, local: kvxfer.KVLayout,
            expected: kvxfer.KVLayout, nblocks: int, gen: torch.Generator,
            baseline: Callable[[], object]) -> tuple[dict[str, float], float]:
    """Median seconds of each backend's read of ``nblocks`` blocks, and of ``baseline``.

    Each repeat reads with every backend in turn (checking the bytes), then runs the
    baseline once; two warm-up repeats are not counted.
    """
    order = getattr(args, "order", "random")
    order = order[0] if isinstance(order, list) else order
    runs = {name: kv_read(agent, peer, local, expected, args.blocks, nblocks, order, gen)
            for name, agent, peer in zip(args.backend, agents, peers)}
    runs[" baseline"] = timed(baseline)
    med = alternate(args.repeats, runs)
    base = med.pop(" baseline")
    return med, base


def check(local: kvxfer.KVLayout, expected: kvxfer.KVLayout, remote: list[int],
          dest: list[int]) -> None:
    """Sampled regions of the read blocks must equal the server's bytes."""
    for r in expected.regions[:: max(1, len(expected.regions) // 8)]:
        mine = local.region(r.layer, r.part).view
        assert torch.equal(mine[dest].view(torch.uint8), r.view[remote].view(torch.uint8)), \
            "kvxfer read corrupted KV"


def find_iperf3(args: argparse.Namespace) -> Optional[Iperf3]:
    if args.no_iperf3:
        return None
    exe = shutil.which("iperf3")
    if exe is None:
        print(f"iperf3 not found: its column is skipped. Install it with `{IPERF3_INSTALL}` "
              "(Debian/Ubuntu), or run with --no-iperf3 to silence this.")
        return None
    return Iperf3(exe)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", nargs="+", default=["tcp"],
                    help="one or more backends, measured in turn in one run")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--tokens", type=int, nargs="+", default=None,
                    help="tokens per read (default 4096 128; --scattered: 256 MiB worth)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--chunk-mib", type=float, default=None,
                    help="kvxfer chunk size (default: the Agent's)")
    ap.add_argument("--order", choices=["random", "contiguous"], nargs="+", default=None,
                    help="block ids: a random permutation (scattered) or one run; several "
                         "are alternated in one run (default random)")
    ap.add_argument("--page-size", type=int, default=None,
                    help="tokens per block (default: the model's, 16)")
    ap.add_argument("--scattered", action="store_true",
                    help="SGLang page size 1: 256 MiB of 1-token blocks, random ids vs one "
                         "contiguous run, alternated (= --page-size 1 --order random "
                         "contiguous --tokens <256 MiB>)")
    ap.add_argument("--staged", action="store_true",
                    help="two-sided backends pack chunks into staging buffers (the CUDA path)")
    ap.add_argument("--no-iperf3", action="store_true", help="leave the iperf3 column out")
    args = ap.parse_args()
    if args.scattered:
        args.page_size = 1 if args.page_size is None else args.page_size
        args.order = args.order or ["random", "contiguous"]
    args.order = args.order or ["random"]
    geo = geometry(args)
    if args.tokens is None:
        args.tokens = ([SCATTERED_BYTES // geo.bytes_per_token] if args.scattered
                       else [4096, 128])
    args.blocks = max(args.tokens) // geo.block_size
    load_before = os.getloadavg()
    iperf = find_iperf3(args)
    proc, stop, (meta, raw_port) = spawn_server(server, args)
    local = make_kv_cache(geo, args.blocks, seed=2)
    expected = make_kv_cache(geo, args.blocks, seed=1)  # what the server holds
    rows = []
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
            runs = {(name, order): kv_read(agent, peer, local, expected, args.blocks,
                                           nblocks, order, gen)
                    for order in args.order
                    for name, agent, peer in zip(args.backend, agents, peers)}
            runs["raw"] = timed(lambda: raw_read(raw, sink, nbytes))
            if iperf is not None:
                runs["iperf3"] = lambda: iperf.read(nbytes)  # type: ignore[misc]
            med = alternate(args.repeats, runs)
            rows.append((tokens, nbytes, med))
        raw.close()
    finally:
        for agent in agents:
            agent.close()
        if iperf is not None:
            iperf.close()
    stop.set()
    proc.join(10)
    report(args, geo, local, iperf, rows, load_before)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def report(args: argparse.Namespace, geo: ModelGeometry, layout: kvxfer.KVLayout,
           iperf: Optional[Iperf3], rows: list, load_before: tuple) -> None:
    d = layout.descriptor
    print(f"\nkvxfer read vs raw socket and iperf3, backends={' '.join(args.backend)}, "
          f"model={args.model}, chunk {args.chunk_mib or 'default'} MiB, {args.repeats} "
          "repeats alternated (+2 warm-ups), medians")
    print(f"layout: {d.num_layers} layers x K,V, block_size {d.block_size} token(s), "
          f"{d.block_bytes} B per block per (layer, part), {d.num_blocks} blocks registered "
          "each side")
    print(f"machine: {_cpu_model()}, {os.cpu_count()} cpus, Python "
          f"{platform.python_version()}, torch {torch.__version__}; load average "
          f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    if iperf is not None:
        print(f"iperf3: {iperf.version}; per repeat: {' '.join(iperf.command('BYTES'))} "
              "(receiver bits_per_second)")
    else:
        print(f"iperf3: not measured (install: {IPERF3_INSTALL})")
    print("x raw / x iperf3 = baseline time / kvxfer time (above 1: kvxfer is faster)")
    head = (f"{'backend':>7} {'ids':>10} {'tokens':>6} {'bytes':>10} {'kv ms':>8} "
            f"{'kv GB/s':>7} {'raw ms':>8} {'raw GB/s':>8}")
    if iperf is not None:
        head += f" {'iperf ms':>8} {'ip GB/s':>7}"
    head += f" {'x raw':>6}" + (f" {'x iperf3':>8}" if iperf is not None else "")
    print(head)
    for tokens, nbytes, med in rows:
        rw, ip = med["raw"], med.get("iperf3")
        for name in args.backend:
            for order in args.order:
                kv = med[(name, order)]
                line = (f"{name:>7} {order:>10} {tokens:>6} {nbytes:>10} {kv * 1e3:>8.2f} "
                        f"{nbytes / kv / 1e9:>7.2f} {rw * 1e3:>8.2f} {nbytes / rw / 1e9:>8.2f}")
                if ip is not None:
                    line += f" {ip * 1e3:>8.2f} {nbytes / ip / 1e9:>7.2f}"
                line += f" {rw / kv:>6.2f}" + (f" {ip / kv:>8.2f}" if ip is not None else "")
                print(line)
    if "random" in args.order and "contiguous" in args.order:
        for tokens, nbytes, med in rows:
            for name in args.backend:
                ratio = med[(name, "contiguous")] / med[(name, "random")]
                print(f"{name} {tokens} tokens: scattered / contiguous throughput = {ratio:.2f}")


if __name__ == "__main__":
    main()

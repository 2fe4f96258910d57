"""What idle and slow connections cost an agent, and what a real peer sees meanwhile.

    python benchmarks/bench_idle_connections.py [--connections 10000] [--backend tcp]

A serving agent (its own process, with a secret) is flooded with N connections that
never finish their handshake: two thirds connect and say nothing, one third send half a
header and stall. Printed: the server's threads and RSS before, at the peak and after,
and the latency of a legitimate peer's connect + one-block read with no flood and
during it (median of the rounds). The baseline is the same read without the flood, in
the same run.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                "integration"))
from kvpeer import PeerProcess, Spec, local_agent  # noqa: E402

from kvxfer.metadata import decode_metadata  # noqa: E402

SPEC = Spec("nhd", "bfloat16")
SECRET = "bench-idle-connections-secret-0123"


def status(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0]) // 1024


def legit_read(backend: str, meta: bytes, i: int) -> float:
    agent, _ = local_agent(SPEC, 2, f"legit-{i}", backend=backend, secret=SECRET)
    with agent:
        t = time.perf_counter()
        agent.read(agent.add_peer(meta), [2], [3]).wait(10)
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=10_000)
    ap.add_argument("--backend", default="tcp")
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.connections + 1024), hard))
    peer = PeerProcess([SPEC], backend=args.backend, secret=SECRET)
    try:
        meta = peer.meta[SPEC.key]
        host, port = decode_metadata(meta).address.rsplit(":", 1)
        quiet = [legit_read(args.backend, meta, i) for i in range(args.rounds)]
        before = status(peer.proc.pid)
        peak = before
        flood: list[socket.socket] = []
        loud: list[float] = []
        every = max(1, args.connections // args.rounds)
        t0 = time.perf_counter()
        for i in range(args.connections):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((host, int(port)))
            if i % 3 == 0:
                try:
                    s.send(b"KVXF\x04")
                except OSError:
                    pass
            flood.append(s)
            if i % every == every - 1:
                now = status(peer.proc.pid)
                peak = (max(peak[0], now[0]), max(peak[1], now[1]))
                loud.append(legit_read(args.backend, meta, 100 + i))
        opened = time.perf_counter() - t0
        during = status(peer.proc.pid)
        peak = (max(peak[0], during[0]), max(peak[1], during[1]))
        for s in flood:
            s.close()
        time.sleep(1)
        after = status(peer.proc.pid)
    finally:
        peer.stop()
    print(f"{args.connections} idle/slow connections to a {args.backend} agent, opened "
          f"in {opened:.1f} s")
    print(f"| | threads | RSS MiB |\n|---|---|---|\n| before | {before[0]} | {before[1]} |\n"
          f"| peak during | {peak[0]} | {peak[1]} |\n| after | {after[0]} | {after[1]} |")
    q, lo = statistics.median(quiet) * 1e3, statistics.median(loud) * 1e3
    print(f"\nlegitimate connect + 1-block read, median ms: no flood {q:.2f}, during the "
          f"flood {lo:.2f} ({lo / q:.2f}x); worst during {max(loud) * 1e3:.1f}")


if __name__ == "__main__":
    main()

"""What an idle connection costs, TCP against UCX, in one run (issue 18).

All agents live in this process, so every figure is the whole cost of both ends:

- idle: ``--agents`` agents in a ring, each connected to the next (so each has a client
  connection and serves one), nothing moving; process CPU time (getrusage, all threads)
  and context switches over ``--idle`` seconds, and how much slower a pure-Python loop
  runs meanwhile than with no agent at all;
- after idle: one pair; sleep 100 ms, time a one-block read; median over ``--reads``;
- first read: a fresh pair per try; the first read after add_peer against the median of
  the reads after it;
- restarts: a long-lived agent re-adds a peer that is closed and recreated under the
  same name ``--restarts`` times, reading one block each time; fds, threads and RSS of
  the process after a warm-up and at the end.

    python benchmarks/bench_ucx_idle.py [--backend tcp ucx] [--agents 5] [--idle 5]
                                        [--reads 40] [--restarts 50]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import statistics
import threading
import time

import torch

import kvxfer


def cache(fill: float = 1.0) -> kvxfer.KVLayout:
    """2 layers x 16 blocks of 4 tokens, 2 heads, head_dim 64, fp16 (1 KiB blocks)."""
    return kvxfer.KVLayout.vllm([torch.full((2, 16, 4, 2, 64), fill, dtype=torch.float16)
                                 for _ in range(2)])


def agent(name: str, backend: str) -> kvxfer.Agent:
    a = kvxfer.Agent(name, backend=backend)
    a.register_kv_cache(cache())
    return a


def usage() -> tuple[float, int]:
    """(CPU seconds, context switches) of this process so far, every thread counted."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_nvcsw + r.ru_nivcsw


def python_work() -> float:
    """Seconds a fixed pure-Python loop takes (the engine's scheduler, say)."""
    t = time.perf_counter()
    total = 0
    for i in range(2_000_000):
        total += i & 7
    return time.perf_counter() - t


def idle(backend: str, n: int, seconds: float) -> dict[str, float]:
    base = min(python_work() for _ in range(5))
    agents = [agent(f"idle-{backend}-{i}", backend) for i in range(n)]
    try:
        for i, a in enumerate(agents):  # a ring: every agent a client and a server
            peer = a.add_peer(agents[(i + 1) % n].metadata())
            a.read(peer, [0], [1]).wait(10)
        time.sleep(0.5)  # let connection set-up settle
        cpu0, cs0 = usage()
        t0 = time.monotonic()
        time.sleep(seconds)
        wall = time.monotonic() - t0
        cpu1, cs1 = usage()
        busy = min(python_work() for _ in range(5))
    finally:
        for a in agents:
            a.close()
    return {"cpu%": 100 * (cpu1 - cpu0) / wall, "csw/s": (cs1 - cs0) / wall,
            "py slower %": 100 * (busy / base - 1)}


def pair(backend: str, tag: str) -> tuple[kvxfer.Agent, kvxfer.Agent]:
    return agent(f"src-{backend}-{tag}", backend), agent(f"dst-{backend}-{tag}", backend)


def timed_read(dst: kvxfer.Agent, peer: object) -> float:
    t = time.perf_counter()
    dst.read(peer, [3], [5]).wait(10)
    return time.perf_counter() - t


def after_idle(backend: str, reads: int) -> float:
    src, dst = pair(backend, "idle")
    with src, dst:
        peer = dst.add_peer(src.metadata())
        timed_read(dst, peer)
        times = []
        for _ in range(reads):
            time.sleep(0.1)
            times.append(timed_read(dst, peer))
    return statistics.median(times) * 1e3


def first_read(backend: str, tries: int) -> tuple[float, float, float]:
    """(median add_peer ms, median first read ms, median later read ms)."""
    adds, firsts, laters = [], [], []
    for i in range(tries):
        src, dst = pair(backend, f"first{i}")
        with src, dst:
            t = time.perf_counter()
            peer = dst.add_peer(src.metadata())
            adds.append(time.perf_counter() - t)
            firsts.append(timed_read(dst, peer))
            laters += [timed_read(dst, peer) for _ in range(10)]
    return tuple(statistics.median(x) * 1e3 for x in (adds, firsts, laters))  # type: ignore


def resources() -> tuple[int, int, float]:
    gc.collect()
    fds = len(os.listdir("/proc/self/fd"))
    threads = len(os.listdir("/proc/self/task"))
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return fds, threads, rss


def restarts(backend: str, n: int, warmup: int = 5) -> tuple[tuple, tuple]:
    keeper = agent(f"keeper-{backend}", backend)
    before: tuple = ()
    with keeper:
        for i in range(warmup + n):
            if i == warmup:
                time.sleep(0.2)
                before = resources()
            with agent(f"restarting-{backend}", backend) as peer_agent:
                peer = keeper.add_peer(peer_agent.metadata())
                keeper.read(peer, [2], [4]).wait(10)
        time.sleep(0.5)  # the last peer's connection is noticed and closed
        after = resources()
    return before, after


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", nargs="+", default=["tcp", "ucx"])
    ap.add_argument("--agents", type=int, default=5)
    ap.add_argument("--idle", type=float, default=5.0)
    ap.add_argument("--reads", type=int, default=40)
    ap.add_argument("--first", type=int, default=7)
    ap.add_argument("--restarts", type=int, default=50)
    args = ap.parse_args()
    print(f"{platform.node()} {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"torch {torch.__version__}, load {os.getloadavg()[0]:.2f}")
    rows = {}
    for backend in args.backend:
        row = idle(backend, args.agents, args.idle)
        row["after-idle ms"] = after_idle(backend, args.reads)
        add, first, later = first_read(backend, args.first)
        row.update({"add_peer ms": add, "first read ms": first, "later read ms": later})
        rows[backend] = row
        if args.restarts:
            before, after = restarts(backend, args.restarts)
            rows[backend]["restart deltas"] = (f"fds {after[0] - before[0]:+d}, threads "
                                               f"{after[1] - before[1]:+d}, RSS "
                                               f"{after[2] - before[2]:+.1f} MiB")
            rows[backend]["restart before"] = (f"fds {before[0]}, threads {before[1]}, "
                                               f"RSS {before[2]:.1f} MiB")
    keys = [k for k in next(iter(rows.values())) if not k.startswith("restart")]
    print(f"\n{args.agents} idle agents for {args.idle:g} s; after-idle: median of "
          f"{args.reads}; first read: {args.first} fresh pairs; {args.restarts} restarts")
    print(f"{'':16}" + "".join(f"{b:>12}" for b in rows))
    for k in keys:
        print(f"{k:16}" + "".join(f"{rows[b][k]:12.2f}" for b in rows))
    if "tcp" in rows:
        for b in rows:
            if b != "tcp":
                print(f"{'after-idle ' + b + '/tcp':16}"
                      f"{rows[b]['after-idle ms'] / rows['tcp']['after-idle ms']:12.2f}")
    if args.restarts:
        for b in rows:
            print(f"restarts {b}: at start {rows[b]['restart before']}; "
                  f"after {args.restarts}: {rows[b]['restart deltas']}")
    print(f"threads alive at exit: {threading.active_count()}")


if __name__ == "__main__":
    main()

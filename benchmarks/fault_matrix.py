"""The fault matrix, repeated: each case of tests/integration/faults.py N times per backend.

    sudo python benchmarks/fault_matrix.py --repeat 100 [--backend tcp nccl] [--case ...]

Makes two network namespaces (kvfa*, kvfb*: a veth pair shaped by tbf), runs one driver
per backend in namespace B (it starts its peers in A and B) and prints a table, case x
backend: runs, hangs (a wait past the transfer's deadline + slack), corruptions (a
completed transfer with wrong bytes), stray writes (a byte outside the named blocks, or
one that landed after the transfer failed), healthy-peer failures, unexpected outcomes
(a case that must fail completed, or the other way round; a driver error), how the
transfers ended (completed/failed) and the longest wait. Needs root and iproute2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))
import faults  # noqa: E402
import netns  # noqa: E402


def usable_backends(names: list[str]) -> list[str]:
    from kvxfer.backends import get_backend
    from kvxfer.errors import BackendUnavailable

    out = []
    for name in names:
        try:
            get_backend(name)
            out.append(name)
        except BackendUnavailable as exc:
            print(f"# {name} skipped: {exc}")
    return out


def drive(link: netns.Link, backend: str, names: list[str], repeat: int) -> list[dict]:
    """One driver for ``backend``: its runs as they come (a crash keeps those so far)."""
    cmd = faults.driver_command(link, backend, names, repeat)
    runs: list[dict] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            runs += faults.parse_runs(line)
            if len(runs) % 50 == 0:
                print(f"# {backend}: {len(runs)} runs", file=sys.stderr, flush=True)
    if len(runs) < repeat * len(names):
        print(f"# {backend}: the driver ended after {len(runs)} of {repeat * len(names)} "
              f"runs (exit {proc.returncode})", file=sys.stderr)
    return runs


def table(rows: dict[tuple[str, str], list[dict]]) -> str:
    head = ("| case | backend | runs | hangs | corruptions | stray writes | healthy failures "
            "| unexpected | completed/failed | max wait s |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for (case, backend), runs in rows.items():
        c = faults.BY_NAME[case]
        unexpected = sum(1 for r in runs if r["error"] or (c.expect != "either"
                                                           and r["result"] != c.expect))
        done = sum(r["result"] == "completed" for r in runs)
        lines.append(
            f"| {case} | {backend} | {len(runs)} | {sum(r['hang'] for r in runs)} "
            f"| {sum(r['corrupt'] for r in runs)} | {sum(r['stray'] for r in runs)} "
            f"| {sum(not r['healthy'] for r in runs)} | {unexpected} "
            f"| {done}/{len(runs) - done} | {max(r['waited_s'] for r in runs):.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--backend", nargs="+", default=["tcp", "ucx", "nixl", "nccl"])
    ap.add_argument("--case", nargs="+", default=[c.name for c in faults.CASES])
    ap.add_argument("--raw", help="also write every run as a JSON line to this file")
    args = ap.parse_args()
    if (why := netns.usable()) is not None:
        sys.exit(why)
    t0 = time.monotonic()
    rows: dict[tuple[str, str], list[dict]] = defaultdict(list)
    with netns.two_namespaces("kvf", "10.214.8", faults.RATE) as link:
        for backend in usable_backends(args.backend):
            names = [n for n in args.case if faults.BY_NAME[n].skip_reason(backend) is None]
            for r in drive(link, backend, names, args.repeat):
                rows[r["case"], backend].append(r)
                if args.raw:
                    with open(args.raw, "a") as f:
                        f.write(json.dumps(r) + "\n")
    print(table(dict(sorted(rows.items(), key=lambda kv: (
        [c.name for c in faults.CASES].index(kv[0][0]), kv[0][1])))))
    errors = {r["error"] for runs in rows.values() for r in runs if r["error"]}
    for e in sorted(errors):
        print(f"# driver error: {e}")
    print(f"# {args.repeat} repeats, {time.monotonic() - t0:.0f} s; deadline "
          f"{faults.DEADLINE} s + slack {faults.SLACK} s; link {faults.RATE} tbf each way")


if __name__ == "__main__":
    main()

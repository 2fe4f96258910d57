"""Two network namespaces joined by a veth pair shaped with tc (tbf), for tests and
benchmarks that need a real link between two processes (root only)."""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from typing import Iterator


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=10)


@contextmanager
def veth_link(a: str, b: str, va: str, vb: str, rate: str = "200mbit",
              burst: str = "256kb", subnet: str = "10.213.7") -> Iterator[dict[str, str]]:
    """Namespaces ``a`` and ``b``, veth ``va`` (``subnet``.1) <-> ``vb`` (``subnet``.2),
    each direction shaped to ``rate``; removed on exit, whatever happened."""
    try:
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        sh("ip", "link", "add", va, "type", "veth", "peer", "name", vb)
        sh("ip", "link", "set", va, "netns", a)
        sh("ip", "link", "set", vb, "netns", b)
        for ns, dev, ip in ((a, va, f"{subnet}.1/24"), (b, vb, f"{subnet}.2/24")):
            sh("ip", "-n", ns, "addr", "add", ip, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
               "rate", rate, "burst", burst, "latency", "50ms")
        yield {"a": a, "b": b, "va": va, "vb": vb, "addr_a": f"{subnet}.1",
               "addr_b": f"{subnet}.2"}
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)

"""`kvxfer bench serve` in one network namespace, `kvxfer bench run` in another.

Needs root and iproute2 (as on CI); skipped otherwise. Uses test_two_nodes' link: a
veth pair rate-limited to 200 Mbit/s between two namespaces of this test's own.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvpeer import BACKENDS
from test_two_nodes import _netns_usable, link  # noqa: F401 - link is a fixture

pytestmark = pytest.mark.skipif(_netns_usable() is not None, reason=str(_netns_usable()))

TINY = ["--layers", "2", "--kv-heads", "2", "--head-dim", "16", "--block-size", "16",
        "--dtype", "float16"]


def _usable() -> list[str]:
    from kvxfer.backends import get_backend
    from kvxfer.errors import BackendUnavailable

    names = []
    for name in BACKENDS:
        try:
            get_backend(name)
            names.append(name)
        except BackendUnavailable:
            pass
    return names


def _cli(ns: str, *args: str) -> list[str]:
    # UCX restricted to TCP, as in test_two_nodes: shared memory would bypass the veth.
    return ["ip", "netns", "exec", ns, "env", "UCX_TLS=tcp", sys.executable, "-m",
            "kvxfer.cli", "bench", *args]


@pytest.mark.slow
def test_bench_between_two_nodes_over_every_backend(link):  # noqa: F811
    backends = _usable()
    server = subprocess.Popen(_cli(link["a"], "serve", "--listen", f"{link['addr_a']}:0",
                                   "--once"), stdout=subprocess.PIPE, text=True)
    try:
        while (line := server.stdout.readline()) and not line.startswith("listening "):
            pass  # NIXL's log lines
        assert line.startswith("listening "), "bench server did not start"
        address = line.split()[1]
        out = subprocess.run(_cli(link["b"], "run", "--connect", address, "--backend",
                                  *backends, *TINY, "--blocks", "1,16", "--iters", "4",
                                  "--warmup", "1", "--json", "-"),
                             capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stderr[-3000:]
        report = json.loads(out.stdout[out.stdout.index("{"):])  # after NIXL's log lines
        server.wait(30)
    finally:
        server.kill()
    assert server.returncode == 0
    got = [(r["backend"], r["blocks"]) for r in report["rows"]]
    assert got == [(b, n) for b in backends for n in (1, 16)]
    assert all(r["checked"] and r["requests"] == 4 for r in report["rows"])
    # the transport report names what carried the bytes between the namespaces
    transport = {r["backend"]: r["transport"] for r in report["rows"]}
    assert transport["tcp"].startswith("TCP 10.213.7.2:") and "-> 10.213.7.1:" in transport["tcp"]
    if "ucx" in transport:  # UCX_TLS=tcp: every data lane is TCP, and the report says so
        assert "UCX lanes: tcp/" in transport["ucx"] and "TCP, no RDMA" in transport["ucx"]
    if "nccl" in transport:
        assert transport["nccl"].startswith("Gloo over TCP 10.213.7.2:")
    for r in report["rows"]:  # the figures are benchmarks' business; print, not assert
        print(f"{r['backend']} {r['bytes_per_request']} B: {r['gbps']:.4f} GB/s, "
              f"raw {r['raw_gbps']:.4f}, p99 {r['p99_ms']:.1f} ms, {r['transport']}")

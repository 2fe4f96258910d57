"""One node of the two-namespace test: `serve` a KV cache, or `fetch` from one.

    serve SPEC_KEY ADDRESS BACKEND       prints the agent's metadata (hex) on one line,
                                         serves until stdin closes, then prints its
                                         notifications
    cancel SPEC_KEY METADATA_HEX BACKEND cancels a read and a write mid-frame, then moves
                                         small transfers on the same connection; "OK"
    fetch SPEC_KEY METADATA_HEX BACKEND  reads blocks, checks every byte, writes some back
                                         with a notify, prints "OK <MB/s>"; with
                                         --stall-ok it expects the transfer to fail
                                         within its deadline instead
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

import kvxfer  # noqa: E402
from kvpeer import Spec, block_bytes, build_layout  # noqa: E402


def spec_of(key: str) -> Spec:
    ctor, dtype, blocks, layers = key.split("-")
    return Spec(ctor, dtype, int(blocks), int(layers))


def serve(key: str, address: str, backend: str) -> None:
    with kvxfer.Agent("node-a", backend=backend, listen=address) as agent:
        agent.register_kv_cache(build_layout(spec_of(key), 1))
        print(agent.metadata().hex(), flush=True)
        sys.stdin.read()
        print(repr(agent.notifications()), flush=True)


def fetch(key: str, meta_hex: str, backend: str, expect_failure: bool) -> None:
    spec = spec_of(key)
    layout = build_layout(spec, 2)
    gen = torch.Generator().manual_seed(11)
    n = spec.num_blocks
    remote = torch.randperm(n, generator=gen)[: n // 2].tolist()
    local = torch.randperm(n, generator=gen)[: n // 2].tolist()
    with kvxfer.Agent("node-b", backend=backend, listen="0.0.0.0:0",
                      transfer_timeout=5.0) as agent:
        agent.register_kv_cache(layout)
        peer = agent.add_peer(bytes.fromhex(meta_hex))
        t0 = time.perf_counter()
        h = agent.read(peer, remote, local)
        if expect_failure:
            print("STARTED", flush=True)
            try:
                h.wait()
                print("COMPLETED before the link went down")
            except kvxfer.TransferFailed as exc:
                print(f"FAILED after {time.perf_counter() - t0:.1f}s: {type(exc).__name__}")
            return
        h.wait()
        elapsed = time.perf_counter() - t0
        assert block_bytes(layout, local) == block_bytes(build_layout(spec, 1), remote)
        agent.write(peer, local[:4], remote[:4], notify=b"from node-b").wait()
        print(f"OK {h.nbytes / elapsed / 1e6:.1f}", flush=True)


def cancel_mid_frame(key: str, meta_hex: str, backend: str) -> None:
    """A read and a write of one 8 MiB chunk each (a third of a second and more on the
    link) are cancelled while their frames are on the wire; small transfers on the same
    connection must then go through, byte-exact, and the connection must stay up."""
    spec = spec_of(key)
    layout = build_layout(spec, 2)
    n = spec.num_blocks
    with kvxfer.Agent("node-b", backend=backend, listen="0.0.0.0:0", transfer_timeout=30.0,
                      chunk_bytes=8 << 20, max_inflight=2) as agent:
        agent.register_kv_cache(layout)
        peer = agent.add_peer(bytes.fromhex(meta_hex))
        agent.read(peer, [0], [0]).wait()  # connected and warm
        t0 = time.perf_counter()
        big = agent.read(peer, list(range(0, n, 2)), list(range(n // 2)))
        time.sleep(0.2)
        assert big.cancel(), "the read finished before it was cancelled: make it larger"
        agent.read(peer, [5, 6], [n - 2, n - 1]).wait()
        assert block_bytes(layout, [n - 2, n - 1]) == \
            block_bytes(build_layout(spec, 1), [5, 6])
        big = agent.write(peer, list(range(n // 2)), list(range(1, n, 2)), notify=b"cancelled")
        time.sleep(0.2)
        assert big.cancel(), "the write finished before it was cancelled: make it larger"
        agent.write(peer, [3], [0], notify=b"after cancel").wait()
        assert peer.alive
        print(f"OK {time.perf_counter() - t0:.1f}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3], sys.argv[4])
    elif sys.argv[1] == "cancel":
        cancel_mid_frame(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        fetch(sys.argv[2], sys.argv[3], sys.argv[4], "--stall-ok" in sys.argv)

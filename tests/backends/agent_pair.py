"""Two agents of one backend in one fresh interpreter move two blocks; prints the outcome.

    python tests/backends/agent_pair.py BACKEND

For tests that need a clean process (their own environment or import path). Prints
``moved True`` when blocks 1 and 5 of the source landed in blocks 2 and 3 of the
destination and no other block changed, and for nixl which module NIXL's API came from.
"""

from __future__ import annotations

import sys

import torch

import kvxfer


def cache(fill: float) -> kvxfer.KVLayout:
    return kvxfer.KVLayout.vllm([torch.full((2, 8, 4, 2, 16), fill, dtype=torch.float16)
                                 for _ in range(2)])


def main(backend: str) -> None:
    src, dst = cache(7.0), cache(0.0)
    with kvxfer.Agent("src", backend=backend) as a, kvxfer.Agent("dst", backend=backend) as b:
        a.register_kv_cache(src)
        b.register_kv_cache(dst)
        b.read(b.add_peer(a.metadata()), [1, 5], [2, 3]).wait(20)
    moved = all(r.view[[2, 3]].eq(7).all().item() and r.view[[0, 1, 4]].eq(0).all().item()
                for r in dst.regions)
    print("moved", moved)
    if backend == "nixl":
        from kvxfer.backends import nixl
        print("api", nixl._nixl.__name__)


if __name__ == "__main__":
    main(sys.argv[1])

"""An engine that publishes KV events (kvxfer's vLLM-format publisher) and announces
its event endpoints through etcd, for the two-router discovery test.

    python engine_proc.py NAME ETCD_URL SEED

Registers ``{"events": ..., "replay": ...}`` under NAME in the ``/kvxfer-events/``
namespace, prints ``READY``; on stdin ``publish N`` publishes N random batches of its
blocks (stores and removals on gpu / cpu) and prints ``DONE``, ``truth`` prints the
blocks it holds as JSON ``[[hash, medium], ...]``.
"""

from __future__ import annotations

import json
import random
import sys

from kvxfer.discovery import Etcd
from kvxfer.prefix import BlockHasher, BlockRemoved, BlockStored, KVEventPublisher

NAMESPACE = "/kvxfer-events/"


def main() -> None:
    name, url, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = random.Random(seed)
    hasher = BlockHasher(16, mode="vllm")
    pub = KVEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*")
    discovery = Etcd(url, namespace=NAMESPACE, ttl=5)
    discovery.register(name, json.dumps({"events": pub.endpoint,
                                         "replay": pub.replay_endpoint}).encode())
    held: set[tuple[int, str]] = set()
    chains: list[tuple[list[int], str]] = []
    print("READY", flush=True)
    for line in sys.stdin:
        op, *args = line.split()
        if op == "publish":
            for _ in range(int(args[0])):
                if rng.random() < 0.75 or not chains:
                    # Shared system prompts: both engines hold some of the same prefixes.
                    tokens = [rng.randrange(3)] * 16 + [rng.randrange(50_000)
                                                        for _ in range(16 * rng.randint(0, 6))]
                    hashes = [int.from_bytes(h[-8:], "big") for h in hasher.hash_blocks(tokens)]
                    medium = rng.choice(["GPU", "CPU"])
                    held.update((h, medium) for h in hashes)
                    chains.append((hashes, medium))
                    pub.publish([BlockStored(hashes, None, tokens, 16, medium=medium)])
                else:
                    hashes, medium = chains[rng.randrange(len(chains))]
                    gone = hashes[rng.randrange(len(hashes)):]
                    held.difference_update((h, medium) for h in gone)
                    pub.publish([BlockRemoved(gone, medium)])
            pub.flush(30)
            print("DONE", flush=True)
        elif op == "truth":
            print(json.dumps(sorted(held)), flush=True)
    pub.close()
    discovery.close()


if __name__ == "__main__":
    main()

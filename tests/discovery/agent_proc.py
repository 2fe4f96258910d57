"""An agent in a process of its own, found through etcd (for the discovery tests).

    python agent_proc.py NAME ETCD_URL TTL SEED

Registers a host KV cache filled from SEED (see tests/integration/kvpeer.py), publishes
itself in etcd, prints ``READY <incarnation>``, then serves peers until stdin closes or
it is killed.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                "integration"))

import kvxfer  # noqa: E402
from kvpeer import Spec, build_layout  # noqa: E402
from kvxfer.discovery import Etcd  # noqa: E402

SPEC = Spec("nhd", "float32", num_blocks=64)


def main() -> None:
    name, url, ttl, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    discovery = Etcd(url, ttl=ttl)
    agent = kvxfer.Agent(name, discovery=discovery)
    agent.register_kv_cache(build_layout(SPEC, seed))
    print("READY", agent.incarnation, flush=True)
    sys.stdin.read()
    agent.close()
    discovery.close()


if __name__ == "__main__":
    main()

"""On one host the UCX backend moves frames and payloads through shared memory.

UCX leaves its shared-memory transports out of endpoints that ask for error handling
unless MM_ERROR_HANDLING is set; without them two processes on one host fall back to
TCP loopback (a third of the speed, benchmarks/RESULTS.md). UCX_PROTO_INFO makes UCX
print the transport of every protocol it picks, which this test reads.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("ucxx", reason="ucxx not installed (extra 'ucx')")

AGENT_PAIR = [sys.executable, os.path.join(os.path.dirname(__file__), "agent_pair.py")]


def test_stream_lanes_between_two_agents_on_one_host_use_shared_memory():
    env = {k: v for k, v in os.environ.items() if not k.startswith("UCX_")}
    env["UCX_PROTO_INFO"] = "y"
    out = subprocess.run([*AGENT_PAIR, "ucx"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "moved True" in text
    # A config header names the context and operation; the lines after it name the
    # transport per message size. Frames go by stream, payloads as tagged messages.
    transports: dict[tuple[str, str], set[str]] = {}
    key = None
    for line in text.splitlines():
        if "cfg#" in line:  # a table per (context, config, operation)
            m = re.search(r"(ucp_context_\d+) \S+ cfg#\d+ \| (stream|tagged) message by "
                          r"ucp_\w+\* from", line)
            key = (m.group(1), m.group(2)) if m else None
        elif key and (m := re.search(r"\| (\w+)/(\w+) \|\s*$", line)):
            transports.setdefault(key, set()).add(m.group(1))
    contexts = {context for context, _ in transports}
    assert len(contexts) == 2, text[-3000:]  # both agents' contexts sent
    for context in contexts:
        for kind in ("stream", "tagged"):
            seen = transports.get((context, kind), set())
            assert seen & {"sysv", "posix"}, f"{context} sends {kind} messages over {seen}"

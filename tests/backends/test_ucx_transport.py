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
import time
from typing import Callable

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


def test_a_payload_shorter_than_its_frame_ends_the_connection_and_lands_nowhere():
    """UCX completes a tagged receive into a larger buffer without error; the backend
    must see the short payload and refuse it, or stale staging bytes would be
    unpacked into the KV cache. A raw ucxx client plays the rogue peer."""
    import ucxx._lib.libucxx as ucx
    from ucxx._lib.arr import Array

    from kvxfer.agent import decode_metadata
    from kvxfer.backends.base import parse_host_port
    from kvxfer.protocol import Connection, Hello, Write
    from kvxfer.protocol.frames import HEADER

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "integration"))
    from kvpeer import Spec, local_agent, snapshot

    spec = Spec("nhd", "bfloat16")
    server, layout = local_agent(spec, name="victim", backend="ucx")
    context = ucx.UCXContext(config_dict={"TLS": "^cuda", "MM_ERROR_HANDLING": "y"},
                             feature_flags=(ucx.Feature.TAG, ucx.Feature.STREAM,
                                            ucx.Feature.WAKEUP))
    worker = ucx.UCXWorker(context)
    worker.start_progress_thread(polling_mode=False, epoll_timeout=10)
    keep: list = []

    def run(request: object) -> None:
        deadline = time.monotonic() + 10
        while not request.completed and time.monotonic() < deadline:
            time.sleep(0.001)
        assert request.completed
        request.check_error()

    def post(op: str, buf: object, *tag: object) -> object:
        keep.append(arr := Array(memoryview(buf).cast("B")))
        return getattr(ep, op)(arr, *tag)

    try:
        with server:
            before = snapshot(layout)
            host, port = parse_host_port(decode_metadata(server.metadata()).address)
            ep = worker.create_endpoint_from_hostname(host, port, True)
            run(post("stream_send", (7).to_bytes(4, "big")))  # our payload-tag key
            key = bytearray(4)
            run(post("stream_recv", key))
            enc, dec = Connection(expect_hello=False), Connection()
            run(post("stream_send", enc.encode(Hello("rogue", layout.descriptor.to_bytes()))))
            head = bytearray(20)
            run(post("stream_recv", head))
            dec.receive_data(head)
            body = bytearray(HEADER.unpack(head)[4])  # the body's length
            run(post("stream_recv", body))
            dec.receive_data(body)
            assert isinstance(dec.next_event(), Hello)
            n = layout.block_bytes * 2  # block 3 of layer 0, K and V
            frame = enc.send(Write(1, 0, (0,), ((3, 1),), n, True, b"never"), [bytes(n)])[0]
            run(post("stream_send", frame))
            tag = ucx.UCXXTag((int.from_bytes(key, "big") << 32) | 0)
            run(post("tag_send", b"\x55" * (n // 2), tag))  # half of what was announced
            deadline = time.monotonic() + 10
            while ep.alive and time.monotonic() < deadline:
                time.sleep(0.01)
            assert snapshot(layout) == before  # no stale staging bytes unpacked
            assert not ep.alive, "the victim kept a connection that lied about a payload"
            assert server.notifications() == []
    finally:
        worker.stop_progress_thread()


ENV_CHECK = """
import json, os, sys
before = dict(os.environ)
import kvxfer.backends.ucx as ucx
after = dict(os.environ)
print(json.dumps({"changed": sorted(k for k in set(before) | set(after)
                                    if before.get(k) != after.get(k)),
                  "options": ucx.ucx_options(True)}))
"""


@pytest.mark.parametrize("preset", [{}, {"UCX_RNDV_THRESH": "1234"}])
def test_importing_the_backend_leaves_the_environment_alone_but_keeps_ucxx_tuning(preset):
    """ucxx tunes UCX through os.environ on import; other UCX users (NIXL) would read
    that too. A fresh interpreter's environment is the same after the import, and
    ucxx's tuning goes to our own contexts only, unless the environment says otherwise."""
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith("UCX_")} | preset
    out = subprocess.run([sys.executable, "-c", ENV_CHECK], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["changed"] == []
    if preset:
        assert "RNDV_THRESH" not in result["options"]  # the environment wins
    else:
        assert result["options"]["RNDV_THRESH"] == "8192"  # ucxx's tuning, ours alone


def _resources() -> tuple[int, int, float, int]:
    """(open fds, OS threads, RSS in MiB, live ucxx exceptions) of this process, freed
    heap handed back first."""
    import ctypes
    import gc

    gc.collect()
    errors = sum(issubclass(type(o), BaseException) and type(o).__module__.startswith("ucxx")
                 for o in gc.get_objects())
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc keeps freed heap
    if trim is not None:
        trim(0)
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task")), rss, errors


def test_agents_that_close_leave_no_ucx_worker_behind():
    """Every reader thread waits for a header with a stream receive, which UCX cannot
    cancel; ucxx's endpoint kept that request after closing, and through it the whole
    worker (11 fds and 4 MiB per agent), and the request's future its exception.
    Pairs of agents that each do one read and close leave this process as they found
    it, also while every debug record is kept (as pytest, MemoryHandler or an engine's
    error report keep them): a record that held an exception kept the worker through
    its traceback, 13 fds a pair (kvxfer.logs)."""
    import logging
    import torch

    import kvxfer
    from kvxfer.backends.ucx_requests import _canceling_size

    assert _canceling_size() is not None  # the remedy is there (see its docstring)

    def cache(fill: float) -> kvxfer.KVLayout:
        return kvxfer.KVLayout.vllm([torch.full((2, 8, 4, 2, 16), fill, dtype=torch.float16)
                                     for _ in range(2)])

    def pair(i: int) -> None:
        src, dst = cache(7.0), cache(0.0)
        with kvxfer.Agent(f"src{i}", backend="ucx") as a, \
                kvxfer.Agent(f"dst{i}", backend="ucx") as b:
            a.register_kv_cache(src)
            b.register_kv_cache(dst)
            b.read(b.add_peer(a.metadata()), [1], [2]).wait(20)
        assert all(r.view[2].eq(7).all().item() for r in dst.regions)

    kept: list[logging.LogRecord] = []
    keeper = logging.Handler()
    keeper.emit = kept.append  # type: ignore[method-assign]
    ours = logging.getLogger("kvxfer")
    level = ours.level
    ours.addHandler(keeper)
    ours.setLevel(logging.DEBUG)
    try:
        _pairs_leave_nothing(pair)
    finally:
        ours.removeHandler(keeper)
        ours.setLevel(level)
    assert kept, "no record was kept: the test no longer covers records holding objects"


def _pairs_leave_nothing(pair: Callable[[int], None]) -> None:
    for i in range(5):  # warm-up: imports, UCX's and torch's one-off allocations
        pair(i)
    fds, threads, rss, errors = _resources()
    for i in range(5, 35):
        pair(i)
    # Closing finishes asynchronously (UCX's own threads); on a loaded machine the last
    # few pairs may still be going: give them a few seconds, a leak stays.
    deadline = time.monotonic() + 5
    while True:
        fds_after, threads_after, rss_after, errors_after = _resources()
        if fds_after - fds <= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert fds_after - fds <= 3, f"{fds_after - fds} fds more after 30 pairs"
    assert threads_after - threads <= 2, f"{threads_after - threads} threads more"
    assert rss_after - rss < 16, f"RSS grew {rss_after - rss:.1f} MiB over 30 pairs"
    assert errors_after - errors <= 1, "the failed requests' exceptions stay alive"

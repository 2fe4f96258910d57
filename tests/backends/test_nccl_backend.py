"""nccl-only checks: payloads really travel on the process groups, a group that cannot
form fails add_peer and costs nothing else, close frees the groups, the same-GPU refusal
and the CUDA path (skipped without GPUs). The conformance suite covers the rest.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
from kvpeer import PeerProcess, Spec, block_bytes, local_agent  # noqa: E402

import kvxfer  # noqa: E402
from kvxfer.metadata import METADATA_MAGIC  # noqa: E402

SPEC = Spec("nhd", "bfloat16", num_blocks=64)


@pytest.fixture(scope="module")
def peer() -> PeerProcess:
    p = PeerProcess([SPEC], backend="nccl")
    yield p
    p.stop()


def _with_backend_metadata(meta: bytes, **changes: object) -> bytes:
    body = json.loads(meta[len(METADATA_MAGIC):])
    inner = json.loads(base64.b64decode(body["backend_metadata"]))
    inner.update(changes)
    body["backend_metadata"] = base64.b64encode(json.dumps(inner).encode()).decode()
    return METADATA_MAGIC + json.dumps(body).encode()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_payloads_travel_on_the_process_groups_not_the_socket(peer):
    agent, layout = local_agent(SPEC, backend="nccl", chunk_bytes=8 << 10, max_inflight=3)
    with agent:
        p = agent.add_peer(peer.meta[SPEC.key])
        plane = p._conn.channel.plane
        assert plane is not None and not plane.nccl  # host memory: Gloo
        h = agent.read(p, list(range(40)), list(range(40)))
        h.wait(20)
        assert block_bytes(layout, list(range(40))) == \
            peer.call("blocks", SPEC.key, list(range(40)))
        # one warm-up byte each way at add_peer, then one payload per chunk
        assert plane._received == 1 + len(h.chunks) and len(h.chunks) > 3
        w = agent.write(p, [1, 2, 3], [50, 51, 52])
        w.wait(20)
        assert plane._sent == 1 + len(w.chunks)
        assert peer.call("blocks", SPEC.key, [50, 51, 52]) == block_bytes(layout, [1, 2, 3])


def test_a_group_that_cannot_form_fails_add_peer_and_loses_nothing(peer):
    """The peer's store port points nowhere: add_peer fails within the connect timeout
    with PeerUnreachable, and the agent then reaches the real peer as usual."""
    agent, layout = local_agent(SPEC, backend="nccl", connect_timeout=1.0)
    with agent:
        dead = socket_port_nobody_listens_on()
        t0 = time.monotonic()
        with pytest.raises(kvxfer.PeerUnreachable, match="process groups"):
            agent.add_peer(_with_backend_metadata(peer.meta[SPEC.key], store_port=dead))
        assert time.monotonic() - t0 < 5
        assert agent.peers == {}
        p = agent.add_peer(peer.meta[SPEC.key])
        agent.read(p, [7, 8], [7, 8]).wait(10)
        assert block_bytes(layout, [7, 8]) == peer.call("blocks", SPEC.key, [7, 8])


def socket_port_nobody_listens_on() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on return: connections are refused


def test_malformed_or_mismatched_backend_metadata_is_refused(peer):
    agent, _ = local_agent(SPEC, backend="nccl")
    with agent:
        meta = peer.meta[SPEC.key]
        with pytest.raises(kvxfer.PeerUnreachable, match="malformed nccl metadata"):
            agent.add_peer(_with_backend_metadata(meta, store_port="x"))
        with pytest.raises(kvxfer.PeerUnreachable, match="both in host memory"):
            agent.add_peer(_with_backend_metadata(meta, plane="nccl"))
        assert agent.peers == {}


def test_close_destroys_the_process_groups(peer):
    # warm: the Gloo device of this address and torch's first-use state are not leaks
    with local_agent(SPEC, backend="nccl")[0] as agent:
        agent.add_peer(peer.meta[SPEC.key])
    before = _fds()
    for _ in range(3):
        agent, _ = local_agent(SPEC, backend="nccl")
        p = agent.add_peer(peer.meta[SPEC.key])
        agent.read(p, [1], [1]).wait(10)
        channel = p._conn.channel
        agent.close()
        assert channel.plane is None
    time.sleep(0.2)
    assert _fds() <= before + 1, f"{_fds() - before} fds left by 3 closed agents"


def test_kvxfer_info_shows_the_data_plane():
    out = subprocess.run([sys.executable, "-m", "kvxfer.cli", "info"], capture_output=True,
                         text=True, timeout=60)
    line = next(x for x in out.stdout.splitlines() if x.startswith("nccl "))
    assert line.split()[1] == "yes"
    if torch.cuda.is_available():
        assert "NCCL" in line
    else:
        assert "host memory via Gloo" in line


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (ProcessGroupNCCL path)")


@needs_cuda
def test_a_peer_on_the_same_gpu_is_refused_naming_ucx_and_nixl():
    def cuda_layout(fill: float) -> kvxfer.KVLayout:
        return kvxfer.KVLayout.vllm([torch.full((2, 8, 4, 2, 16), fill, dtype=torch.float16,
                                                device="cuda:0") for _ in range(2)])

    with kvxfer.Agent("a", backend="nccl") as a, kvxfer.Agent("b", backend="nccl") as b:
        a.register_kv_cache(cuda_layout(1.0))
        b.register_kv_cache(cuda_layout(0.0))
        with pytest.raises(kvxfer.PeerUnreachable) as info:
            b.add_peer(a.metadata())
        assert "'ucx'" in str(info.value) and "'nixl'" in str(info.value)


def _cuda_layout(device: str, seed: int) -> kvxfer.KVLayout:
    gen = torch.Generator().manual_seed(seed)
    return kvxfer.KVLayout.vllm([torch.randint(0, 256, (2, 64, 4, 2, 16), dtype=torch.uint8,
                                               generator=gen).to(device) for _ in range(3)])


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="needs two CUDA devices (NCCL refuses two ranks on one GPU)")
def test_cuda_blocks_move_between_two_gpus_byte_exact():
    src, dst = _cuda_layout("cuda:0", 1), _cuda_layout("cuda:1", 2)
    with kvxfer.Agent("g0", backend="nccl") as a, kvxfer.Agent("g1", backend="nccl") as b:
        a.register_kv_cache(src)
        b.register_kv_cache(dst)
        p = b.add_peer(a.metadata())
        assert p._conn.channel.plane.nccl
        b.read(p, [3, 9, 10], [0, 1, 2]).wait(20)
        b.write(p, [5], [60]).wait(20)
    for r0, r1 in zip(src.regions, dst.regions):
        assert torch.equal(r1.view[[0, 1, 2]].cpu(), r0.view[[3, 9, 10]].cpu())
        assert torch.equal(r0.view[60].cpu(), r1.view[5].cpu())

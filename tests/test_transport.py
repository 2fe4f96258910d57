"""The transport report: what add_peer says carries a peer's bytes, per backend."""

from __future__ import annotations

import logging
import pytest
import torch

import kvxfer
from kvxfer.backends import get_backend


def _cache() -> kvxfer.KVLayout:
    return kvxfer.KVLayout.vllm([torch.zeros(2, 8, 4, 2, 16) for _ in range(2)])


def _usable(name: str) -> str:
    try:
        get_backend(name)
    except kvxfer.BackendUnavailable as exc:
        pytest.skip(str(exc))
    return name


@pytest.mark.parametrize("backend,expect,on_tcp", [
    ("tcp", "TCP 127.0.0.1:", False),
    ("ucx", "UCX lanes: ", None),       # lanes depend on the host: sysv/cma/tcp or rc
    ("nccl", "Gloo over TCP 127.0.0.1:", True),  # host memory always goes over Gloo
])
def test_add_peer_names_the_transport_and_warns_once_on_tcp(backend, expect, on_tcp, caplog):
    _usable(backend)
    caplog.set_level(logging.INFO, logger="kvxfer.transport")
    with kvxfer.Agent("a", backend=backend) as a, kvxfer.Agent("b", backend=backend) as b, \
            kvxfer.Agent("c", backend=backend) as c:
        for agent in (a, b, c):
            agent.register_kv_cache(_cache())
        first, second = b.add_peer(a.metadata()), b.add_peer(c.metadata())
        b.read(first, [1], [2]).wait(20)  # the connection it names carries bytes
    assert first.transport.startswith(expect), first.transport
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(f"-> peer 'a' over {backend}: {first.transport}" in m for m in infos), infos
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    if on_tcp is None:  # ucx: the warning follows what the lanes say
        on_tcp = first.transport.endswith("TCP, no RDMA")
    assert len(warnings) == (1 if on_tcp else 0), [w.getMessage() for w in warnings]
    assert second.transport


def test_ucx_lanes_are_read_from_the_endpoint():
    _usable("ucx")
    with kvxfer.Agent("a", backend="ucx") as a, kvxfer.Agent("b", backend="ucx") as b:
        a.register_kv_cache(_cache())
        b.register_kv_cache(_cache())
        peer = b.add_peer(a.metadata())
        from kvxfer.transport import ucx_lanes
        lanes = ucx_lanes(peer._conn.channel.ep.handle)
    assert lanes and all("/" in tl for tl, _ in lanes), lanes  # transport/device each
    for tl, _ in lanes:
        assert tl in peer.transport


def test_info_says_what_each_backend_would_use_here(capsys):
    from kvxfer.cli import main

    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    tcp = next(line for line in lines if line.startswith("tcp "))
    assert tcp.endswith("transport here: TCP")
    nccl = next(line for line in lines if line.startswith("nccl "))
    assert "Gloo over TCP" in nccl

"""Backend registry, lazy imports, and Agent misuse that needs no peer process."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import kvxfer
from kvxfer.agent import decode_metadata
from kvxfer.backends import get_backend, registered_backends


def test_importing_kvxfer_imports_no_optional_library():
    code = ("import sys, kvxfer, kvxfer.prefix, kvxfer.packing; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('ucxx', 'nixl', 'nixl_cu12', 'cupy', 'zmq', 'lz4', 'msgspec')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_registry_lists_tcp_and_refuses_unknown_names():
    assert "tcp" in registered_backends()
    assert get_backend("tcp").name == "tcp"
    with pytest.raises(kvxfer.BackendUnavailable, match="no such backend"):
        kvxfer.Agent("a", backend="carrier-pigeon")


def make_agent(name="a", **kw) -> kvxfer.Agent:
    agent = kvxfer.Agent(name, **kw)
    agent.register_kv_cache(kvxfer.KVLayout.vllm([torch.zeros(2, 4, 16, 2, 8)]))
    return agent


def test_agent_misuse_is_refused_clearly():
    with make_agent() as a, make_agent("b") as b:
        with pytest.raises(kvxfer.KvxferError, match="already"):
            a.register_kv_cache(kvxfer.KVLayout.vllm([torch.zeros(2, 4, 16, 2, 8)]))
        with pytest.raises(TypeError):
            b.register_kv_cache("not a layout")
        with pytest.raises(ValueError, match="itself"):
            a.add_peer(a.metadata())
        with pytest.raises(kvxfer.RemoteProtocolError):
            a.add_peer(b"garbage")
        with pytest.raises(kvxfer.RemoteProtocolError):
            a.add_peer(b"KVXM1{\"name\": 1}")
        old = b.metadata().replace(b"KVXM4", b"KVXM3", 1)  # no codecs on its wire
        with pytest.raises(kvxfer.RemoteProtocolError, match="version 3, .*version 4"):
            a.add_peer(old)
        peer = a.add_peer(b.metadata())
        assert a.add_peer(b.metadata()) is peer  # one connection per peer
        with pytest.raises(ValueError, match="not a peer"):
            b.read(peer, [0], [0])
        with pytest.raises(ValueError, match="local block more than once"):
            a.read(peer, [1, 2], [3, 3])
        with pytest.raises(ValueError, match="remote block more than once"):
            a.write(peer, [1, 2], [0, 0])
        a.write(peer, [1, 1], [2, 3]).wait(5)  # one source block to two places is fine
        with pytest.raises(ValueError, match="exceeds 65536"):
            a.write(peer, [0], [0], notify=b"x" * (65 << 10))
    with pytest.raises(kvxfer.AgentClosed):
        a.metadata()
    with pytest.raises(ValueError, match="at least one notify"):
        kvxfer.Agent("tiny", max_unread_notify_bytes=1000)


def test_unreachable_peer_and_bad_listen_address():
    with make_agent("b") as b:
        meta = b.metadata()
    with make_agent() as a:
        with pytest.raises(kvxfer.PeerUnreachable):
            a.add_peer(meta)  # b is closed: nothing listens there
    with pytest.raises(ValueError):
        kvxfer.Agent("a", listen="no-port")
    with pytest.raises(kvxfer.PeerUnreachable):
        kvxfer.Agent("a", listen="203.0.113.1:0")  # not an address of this machine


def test_metadata_round_trip():
    with make_agent("prefill-3") as a:
        info = decode_metadata(a.metadata())
        assert info.name == "prefill-3" and info.backend == "tcp"
        assert info.descriptor == a.layout.descriptor


def test_cuda_ordering_arguments_are_checked():
    with kvxfer.Agent("a") as a, kvxfer.Agent("b") as b:
        for agent in (a, b):
            agent.register_kv_cache(kvxfer.KVLayout.vllm([torch.zeros(2, 4, 16, 2, 8)]))
        peer = a.add_peer(b.metadata())
        with pytest.raises(TypeError, match="query"):
            a.write(peer, [0], [1], event=object())
        with pytest.raises(ValueError, match="host memory"):
            a.read(peer, [0], [1], stream=object())

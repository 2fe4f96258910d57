"""Agent metadata: format 2 carries an incarnation id; other formats are refused clearly."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "integration"))

import kvxfer  # noqa: E402
from kvpeer import Spec, build_layout  # noqa: E402
from kvxfer.errors import RemoteProtocolError  # noqa: E402
from kvxfer.metadata import (METADATA_FORMAT, METADATA_MAGIC, decode_metadata,  # noqa: E402
                             metadata_incarnation)

SPEC = Spec("nhd", "float32", num_blocks=8)


@pytest.fixture
def agents():
    made = []

    def make(name: str) -> kvxfer.Agent:
        agent = kvxfer.Agent(name)
        agent.register_kv_cache(build_layout(SPEC, 1))
        made.append(agent)
        return agent
    yield make
    for agent in made:
        agent.close()


def test_every_start_has_its_own_incarnation(agents):
    a, again = agents("a"), agents("a")                 # the same name, started twice
    ma, mb = a.metadata(), again.metadata()
    assert METADATA_FORMAT == 2 and ma.startswith(METADATA_MAGIC)
    assert metadata_incarnation(ma) == a.incarnation != again.incarnation
    assert decode_metadata(ma).name == decode_metadata(mb).name == "a"
    b = agents("b")
    peer = b.add_peer(ma)
    assert peer.incarnation == a.incarnation
    replaced = b.add_peer(mb)                          # a restart: replaces the old Peer
    assert replaced is not peer and replaced.incarnation == again.incarnation


def test_other_formats_and_versions_are_refused_clearly(agents):
    meta = agents("a").metadata()
    body = json.loads(meta[len(METADATA_MAGIC):])
    old = METADATA_MAGIC.split(b".")[0] + json.dumps(
        {k: v for k, v in body.items() if k != "incarnation"}).encode()   # format 1
    with pytest.raises(RemoteProtocolError, match="format 1.*reads format 2"):
        decode_metadata(old)
    with pytest.raises(RemoteProtocolError, match="protocol version 1"):
        decode_metadata(b"KVXM1.2{}")
    body.pop("incarnation")
    with pytest.raises(RemoteProtocolError, match="no incarnation"):
        metadata_incarnation(METADATA_MAGIC + json.dumps(body).encode())
    with pytest.raises(RemoteProtocolError, match="bad magic"):
        decode_metadata(b"hello")


def test_add_peer_by_name_needs_discovery(agents):
    with pytest.raises(ValueError, match="discovery"):
        agents("a").add_peer("b")

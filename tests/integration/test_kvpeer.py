"""The peer-process helper itself: what the stalled-peer tests rely on."""

from __future__ import annotations

import pytest

import kvxfer
from kvpeer import Spec, block_bytes, local_agent


def test_a_paused_peer_has_stopped_every_thread_and_answers_nothing(peer_process):
    """``kill(SIGSTOP)`` returns before the peer stops (its serving thread may answer
    for a while after); ``pause`` returns only once every thread has stopped."""
    spec = Spec("nhd", "bfloat16")
    p = peer_process([spec])
    agent, layout = local_agent(spec)
    with agent:
        peer = agent.add_peer(p.meta[spec.key])
        before = block_bytes(layout, [1])
        for block in range(20):
            with p.paused():
                states = p.thread_states()
                assert len(states) > 1 and all(s in "tTXZ" for s in states), states
                h = agent.read(peer, [block], [1])
                with pytest.raises(kvxfer.TransferTimeout):
                    h.wait(timeout=0.05)  # a one-block read: answered in a millisecond
                assert block_bytes(layout, [1]) == before
            h.wait(10)  # resumed: it answers
            assert block_bytes(layout, [1]) == p.call("blocks", spec.key, [block])
            before = block_bytes(layout, [1])

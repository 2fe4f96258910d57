"""Staging buffers within the backend's budget (transfer_buffer_bytes)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kvxfer.backends.staging import Staging, StagingBudget


class HostMemory:
    """What Staging asks of a RegisteredMemory: a host buffer."""

    def staging_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)


def test_a_buffer_is_reused_and_grows_to_the_largest_chunk():
    budget = StagingBudget()
    s = Staging(HostMemory(), budget=budget)
    with s.use(100) as (t1, v1):
        assert len(v1) == 100
    with s.use(60) as (t2, v2):
        assert t2 is t1 and len(v2) == 60
    with s.use(200):
        pass
    assert budget.held == 200
    s.release()
    assert budget.held == 0


def test_idle_buffers_of_other_roles_make_room():
    budget = StagingBudget(limit=300)
    a, b = Staging(HostMemory(), budget=budget), Staging(HostMemory(), budget=budget)
    with a.use(200):
        pass
    with b.use(200):  # a's idle 200 are freed for it
        assert a.tensor is None and budget.held == 200
    assert budget.peak <= 300


def test_a_send_waits_for_room_and_a_receive_never_does():
    budget = StagingBudget(limit=300)
    a, b, c = (Staging(HostMemory(), budget=budget) for _ in range(3))
    order = []
    with a.use(200):
        sent = threading.Event()

        def send():
            with b.use(200):
                order.append("send")
            sent.set()

        t = threading.Thread(target=send)
        t.start()
        time.sleep(0.2)
        assert not sent.is_set() and budget.waits == 1  # waiting: a holds 200 of 300
        with c.use(200, wait=False):  # a receive goes at once, past the limit
            order.append("receive")
            assert budget.held == 400
        order.append("a done")
    t.join(5)
    assert order == ["receive", "a done", "send"] and budget.held <= 300


def test_one_chunk_above_the_limit_still_goes():
    budget = StagingBudget(limit=100)
    s = Staging(HostMemory(), budget=budget)
    with s.use(150) as (_, view):
        assert len(view) == 150


def test_a_release_while_in_use_frees_the_buffer_once_done():
    budget = StagingBudget()
    s = Staging(HostMemory(), budget=budget)
    with s.use(64):
        s.release()
        assert budget.held == 64
    assert budget.held == 0 and s.tensor is None


def test_a_limit_below_one_byte_is_refused():
    with pytest.raises(ValueError, match="transfer_buffer_bytes"):
        StagingBudget(limit=0)

"""Fixtures that run peer agents in real, separate processes."""

from __future__ import annotations

import os
import sys
from typing import Any, Iterator

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvpeer import PeerProcess, Spec  # noqa: E402


@pytest.fixture
def peer_process() -> Iterator[Any]:
    """Factory: peer_process(specs, **agent_options) -> PeerProcess, stopped after the test."""
    started: list[PeerProcess] = []

    def start(specs: list[Spec], seed: int = 1, **options: Any) -> PeerProcess:
        p = PeerProcess(specs, seed, **options)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()

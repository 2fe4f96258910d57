"""Fixtures of the backend conformance suite: one backend per parameter, real peer processes.

Every test here runs once per backend in BACKENDS; a backend whose library is missing
is skipped with the reason (and the pip extra that installs it).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterator

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
from kvpeer import BACKENDS, PeerProcess, Spec, usable_backend  # noqa: E402


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """A backend name; skipped when its library cannot be imported here."""
    return usable_backend(request.param)


@pytest.fixture
def peer_process(backend: str) -> Iterator[Any]:
    """Factory: peer_process(specs, seed=1, prefix="peer", **agent_options) on ``backend``."""
    started: list[PeerProcess] = []

    def start(specs: list[Spec], seed: int = 1, prefix: str = "peer",
              **options: Any) -> PeerProcess:
        p = PeerProcess(specs, seed, prefix, backend=backend, **options)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()

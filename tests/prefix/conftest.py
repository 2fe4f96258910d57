"""Shared helpers for the prefix-index tests."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest


def _wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


@pytest.fixture
def wait_until() -> Callable[..., bool]:
    """Poll a predicate until it holds or a timeout (seconds) passes."""
    return _wait_until

"""The fault matrix (faults.py) between two network namespaces: each case once per backend.

Needs root and iproute2 (as on CI); skipped otherwise. One driver process per backend
runs every case that applies to it (in namespace B, against peers in A) and reports
one JSON line per case; each case is then its own test here. The same cases, repeated,
are benchmarks/fault_matrix.py.
"""

from __future__ import annotations

import subprocess
from typing import Any, Callable, Iterator

import pytest

import faults
import netns
from kvpeer import BACKENDS, usable_backend

pytestmark = pytest.mark.skipif(netns.usable() is not None, reason=str(netns.usable()))


@pytest.fixture(scope="module")
def link() -> Iterator[netns.Link]:
    with netns.two_namespaces("kvf", "10.214.7", faults.RATE) as made:
        yield made


@pytest.fixture(scope="module")
def matrix(link: netns.Link) -> Callable[[str], tuple[dict[str, Any], str]]:
    """backend -> ({case: run}, the driver's stderr tail); a backend's driver runs once,
    when its first case is asked for."""
    done: dict[str, tuple[dict[str, Any], str]] = {}

    def runs(backend: str) -> tuple[dict[str, Any], str]:
        if backend not in done:
            names = [c.name for c in faults.CASES if c.skip_reason(backend) is None]
            out = subprocess.run(faults.driver_command(link, backend, names, 1),
                                 capture_output=True, text=True, timeout=300)
            done[backend] = ({r["case"]: r for r in faults.parse_runs(out.stdout)},
                             out.stderr[-3000:])
        return done[backend]

    return runs


@pytest.mark.timeout(360)  # the first case of a backend waits for its whole driver
@pytest.mark.parametrize("case", faults.CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fault_case(matrix, backend: str, case: faults.Case) -> None:
    usable_backend(backend)
    reason = case.skip_reason(backend)
    if reason:
        pytest.skip(reason)
    runs, stderr = matrix(backend)
    assert case.name in runs, f"the driver gave no result for {case.name}:\n{stderr}"
    run = runs[case.name]
    wrong = faults.verdict(case, run)
    assert not wrong, f"{case.name} over {backend}: {wrong}\n{run}"

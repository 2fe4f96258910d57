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


# NIXL 1.5's UCX plugin over TCP: a process serving a transfer whose initiator was
# killed mid-way can abort inside UCX (no error callback reaches us). Upstream, not ours.
UCX_ABORT = "Fatal: unexpected error: Endpoint timeout"


@pytest.fixture(scope="module")
def matrix(link: netns.Link) -> Callable[[str], tuple[dict[str, Any], dict[str, str]]]:
    """backend -> ({case: run}, {case: stderr tail of a driver that died in it}); a
    backend's cases run when its first one is asked for. A driver that dies is
    charged with the case it was in, and a new driver runs the cases after it."""
    done: dict[str, tuple[dict[str, Any], dict[str, str]]] = {}

    def runs(backend: str) -> tuple[dict[str, Any], dict[str, str]]:
        if backend not in done:
            left = [c.name for c in faults.CASES if c.skip_reason(backend) is None]
            got: dict[str, Any] = {}
            died: dict[str, str] = {}
            while left:
                out = subprocess.run(faults.driver_command(link, backend, left, 1),
                                     capture_output=True, text=True, timeout=300)
                got.update({r["case"]: r for r in faults.parse_runs(out.stdout)})
                left = [n for n in left if n not in got]
                if left:  # the driver ended before these: the first one killed it
                    died[left.pop(0)] = f"exit {out.returncode}\n{out.stderr[-3000:]}"
            done[backend] = (got, died)
        return done[backend]

    return runs


@pytest.mark.timeout(600)  # the first case of a backend waits for its whole driver
@pytest.mark.parametrize("case", faults.CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fault_case(matrix, backend: str, case: faults.Case) -> None:
    usable_backend(backend)
    reason = case.skip_reason(backend)
    if reason:
        pytest.skip(reason)
    runs, died = matrix(backend)
    if case.name in died and backend == "nixl" and UCX_ABORT in died[case.name]:
        pytest.xfail(f"{case.name}: the driver aborted inside NIXL's UCX plugin "
                     f"({UCX_ABORT!r}), an upstream crash; the cases after it ran anew")
    assert case.name in runs, f"the driver gave no result for {case.name}:\n{died.get(case.name)}"
    run = runs[case.name]
    wrong = faults.verdict(case, run)
    assert not wrong, f"{case.name} over {backend}: {wrong}\n{run}"

"""The examples run as an engine author would run them (small sizes) and check their bytes."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("script,args", [
    ("transfer_two_process.py", ["--model", "llama-3.1-8b", "--tokens", "256"]),
    ("transfer_two_process.py", ["--model", "deepseek-v3", "--tokens", "300"]),
    ("layerwise_push.py", ["--model", "qwen2.5-7b", "--tokens", "256", "--layer-ms", "1"]),
])
def test_example_runs_and_checks_every_byte(script, args):
    out = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "every byte checked: OK" in out.stdout


def test_disaggregated_serving_demo_matches_a_single_process_run():
    """`make run`'s job: three processes, KV pushed layer by layer, prefixes reused."""
    out = subprocess.run([sys.executable, str(EXAMPLES / "disagg_serving.py"), "--requests", "3",
                          "--new-tokens", "4"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "every generated token matches a single-process run: OK" in out.stdout
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("req-")]
    assert len(rows) == 3
    # the later requests share the first one's system prompt: prefill skipped those blocks
    assert int(rows[0][4]) == 0 and all(int(r[4]) >= 4 for r in rows[1:]), out.stdout

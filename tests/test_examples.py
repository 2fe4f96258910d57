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

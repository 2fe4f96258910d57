"""The README's usage example runs as written."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def run_first_example(heading: str) -> list[str]:
    """Run the first python block under ``heading``; returns its output lines."""
    text = README.read_text()
    code = re.search(r"```python\n(.*?)```", text[text.index(heading):], re.S).group(1)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_usage_example_runs():
    assert any("req-1 kv ready" in line for line in run_first_example("## Usage\n"))


def test_prefix_index_example_prints_what_its_comments_say():
    assert run_first_example("## Prefix-cache index") == [
        "[('worker-a', 40), ('worker-b', 60)]", "worker-b 14.0"]


def test_layer_wise_example_runs():
    assert run_first_example("## Layer-wise push, prefetch and load") == [
        "[('prefill-0', b'req-42 prefilled')]", "0"]


def test_tensor_parallel_example_gives_each_rank_its_heads():
    assert run_first_example("## Different tensor-parallel sizes") == [
        "0 range(0, 4)", "1 range(4, 8)"]


def test_trust_example_refuses_a_stranger():
    assert run_first_example("## Trust: a shared secret") == ["True", "refused: True"]

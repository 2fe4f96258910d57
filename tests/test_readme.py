"""The README's usage example runs as written."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_usage_example_runs():
    text = README.read_text()
    code = re.search(r"## Usage\n\n```python\n(.*?)```", text, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "req-1 kv ready" in out.stdout


def test_prefix_index_example_prints_what_its_comments_say():
    text = README.read_text()
    section = text[text.index("## Prefix-cache index"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[('worker-a', 40), ('worker-b', 60)]", "worker-b 14.0"]


def test_layer_wise_example_runs():
    text = README.read_text()
    section = text[text.index("## Layer-wise push, prefetch and load"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[('prefill-0', b'req-42 prefilled')]", "0"]


def test_tensor_parallel_example_gives_each_rank_its_heads():
    text = README.read_text()
    section = text[text.index("## Different tensor-parallel sizes"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["0 range(0, 4)", "1 range(4, 8)"]

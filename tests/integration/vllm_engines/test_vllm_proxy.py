"""Two vLLM API servers with KvxferConnector behind the proxy (examples/vllm_disagg.sh):
the answer through prefill + decode equals the decode server's own, and the prefill
server's log shows the blocks handed back after decode read them."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

if importlib.util.find_spec("vllm") is None:  # make test: nothing here imports vLLM
    pytest.skip("vLLM is not installed; `make test-vllm` runs these", allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engines import ROOT  # noqa: E402


@pytest.mark.timeout(1500)
def test_example_script_serves_the_same_tokens_through_the_proxy(tmp_path):
    env = dict(os.environ, PY=sys.executable, LOGS=str(tmp_path))
    out = subprocess.run(["bash", os.path.join(ROOT, "examples", "vllm_disagg.sh")], env=env, capture_output=True, text=True,
                         timeout=1450)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "same tokens; the KV went over kvxfer" in out.stdout

"""API drift: the connector against the base-class contract of vllm==0.33.0 (the newest
release; installed with --no-deps --target by ``make test-vllm``, it cannot run an
engine on CPU, but its connector API imports)."""

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

CHECK = r"""
import inspect, vllm
assert vllm.__version__.startswith("0.33"), vllm.__version__
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1 as Base
from kvxfer.integrations.vllm import KvxferConnector as C
assert inspect.getfile(Base).startswith(TARGET), inspect.getfile(Base)
assert not C.__abstractmethods__, C.__abstractmethods__
for name, fn in vars(C).items():
    if name.startswith("_") or not callable(getattr(fn, "__func__", fn)):
        continue
    assert hasattr(Base, name), f"{name} is no hook of vLLM 0.33's connector base"
    mine = list(inspect.signature(getattr(C, name)).parameters)
    theirs = list(inspect.signature(getattr(Base, name)).parameters)
    n = len([p for p in theirs if p not in ("kwargs",)])
    assert mine[:n] == theirs[:n], (name, mine, theirs)
print("OK", vllm.__version__)
"""


@pytest.mark.timeout(900)
def test_connector_matches_vllm_033_base_contract():
    target = os.environ.get("KVXFER_VLLM_033")
    if not target:
        pytest.skip("KVXFER_VLLM_033 not set (make test-vllm installs vllm==0.33.0 there)")
    target = os.path.abspath(target)  # the check runs from / so that a stray vllm/ is not it
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([target, ROOT]))
    out = subprocess.run([sys.executable, "-c", f"TARGET={target!r}\n" + CHECK], env=env,
                         capture_output=True, text=True, timeout=600, cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK 0.33" in out.stdout

"""layout_from_vllm on the shapes vLLM's attention backends register (no vLLM needed)."""

from __future__ import annotations

import pytest
import torch

import kvxfer
from kvxfer.integrations.vllm_layout import layout_from_vllm


def test_cpu_layout_one_region_per_layer_moves_whole_blocks():
    src = {f"l{i}": torch.randn(8, 2, 32, 64) for i in range(3)}  # [blocks, heads, bs, 2*hd]
    dst = {f"l{i}": torch.zeros(8, 2, 32, 64) for i in range(3)}
    layout = layout_from_vllm(src)
    d = layout.descriptor
    assert (d.block_order, d.parts, d.block_size, d.num_kv_heads, d.head_dim) == \
        ("vllm-cpu", ("KV",), 32, 2, 32)
    assert layout.block_bytes == 2 * 32 * 64 * 4
    with kvxfer.Agent("a") as a, kvxfer.Agent("b") as b:
        a.register_kv_cache(layout)
        b.register_kv_cache(layout_from_vllm(dst))
        b.read(b.add_peer(a.metadata()), [1, 5], [2, 3]).wait(10)
    for k in src:
        assert torch.equal(dst[k][[2, 3]], src[k][[1, 5]])


def test_cuda_shapes_nhd_hnd_and_flashinfer():
    nhd = [torch.zeros(2, 8, 16, 4, 32) for _ in range(2)]
    assert layout_from_vllm(dict(enumerate(nhd))).descriptor.block_order == "NHD"
    hnd = [torch.zeros(2, 8, 4, 16, 32).permute(0, 1, 3, 2, 4) for _ in range(2)]
    d = layout_from_vllm(dict(enumerate(hnd))).descriptor
    assert (d.block_order, d.block_size, d.num_kv_heads) == ("HND", 16, 4)
    fi = [torch.zeros(8, 2, 16, 4, 32) for _ in range(2)]
    assert layout_from_vllm(dict(enumerate(fi))).num_blocks == 8


def test_unknown_shapes_are_refused_with_the_field():
    with pytest.raises(kvxfer.LayoutMismatch) as e:
        layout_from_vllm({"x": torch.zeros(8, 2)})
    assert e.value.field == "shape"
    with pytest.raises(kvxfer.LayoutMismatch):
        layout_from_vllm({})


def test_importing_kvxfer_and_the_engine_free_parts_never_imports_vllm():
    import subprocess
    import sys
    code = ("import sys, kvxfer, kvxfer.integrations.handover, "
            "kvxfer.integrations.vllm_layout; assert 'vllm' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

"""KVLayout: every constructor, every dtype, and clear errors for what cannot work."""

from __future__ import annotations

import pytest
import torch

from kvxfer import KVLayout, LayoutDescriptor, LayoutMismatch
from kvxfer.errors import BlockOutOfRange

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.uint8]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", ["NHD", "HND"])
def test_vllm_regions_address_each_block(dtype, order):
    shape = (2, 10, 16, 4, 8) if order == "NHD" else (2, 10, 4, 16, 8)
    tensors = [torch.zeros(shape, dtype=dtype) for _ in range(3)]
    layout = KVLayout.vllm(tensors, kv_layout=order)
    d = layout.descriptor
    size = tensors[0].element_size()
    assert (d.block_order, d.num_layers, d.block_size, d.num_kv_heads, d.head_dim,
            d.num_blocks) == (order, 3, 16, 4, 8, 10)
    assert d.block_bytes == 16 * 4 * 8 * size and d.parts == ("K", "V")
    for region in layout.regions:
        t = tensors[region.layer][0 if region.part == "K" else 1]
        assert region.base == t.data_ptr() and region.block_stride == d.block_bytes
        assert region.view.data_ptr() + 7 * region.block_stride == t[7].data_ptr()


def test_flashinfer_order_has_a_stride_of_two_blocks():
    tensors = [torch.zeros(10, 2, 16, 4, 8, dtype=torch.float16) for _ in range(2)]
    layout = KVLayout.vllm(tensors, kv_dim=1)
    v = layout.region(1, "V")
    assert v.block_stride == 2 * v.block_bytes
    assert v.base == tensors[1][0, 1].data_ptr()


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_kv_is_token_major_like_nhd(dtype):
    ks = [torch.zeros(64, 4, 8, dtype=dtype) for _ in range(2)]
    vs = [torch.zeros(64, 4, 8, dtype=dtype) for _ in range(2)]
    layout = KVLayout.split_kv(ks, vs, block_size=16)
    assert layout.num_blocks == 4 and layout.descriptor.block_order == "NHD"
    assert layout.region(1, "V").base == vs[1].data_ptr()
    nhd = KVLayout.vllm([torch.zeros(2, 4, 16, 4, 8, dtype=dtype)] * 2)
    nhd.descriptor.check_compatible(layout.descriptor)  # SGLang and vLLM NHD interoperate


@pytest.mark.parametrize("dtype", DTYPES)
def test_mla_has_one_latent_part(dtype):
    layout = KVLayout.mla([torch.zeros(6, 64, 576, dtype=dtype) for _ in range(4)])
    assert layout.parts == ("L",) and len(layout.regions) == 4
    assert layout.descriptor.head_dim == 576 and layout.descriptor.block_size == 64


@pytest.mark.parametrize("make,field", [
    (lambda: KVLayout.vllm([]), "num_layers"),
    (lambda: KVLayout.vllm([torch.zeros(3, 4, 16, 2, 8)]), "shape"),
    (lambda: KVLayout.vllm([torch.zeros(2, 4, 16, 2)]), "shape"),
    (lambda: KVLayout.vllm([torch.zeros(2, 4, 16, 2, 8)], kv_layout="XYZ"), "kv_layout"),
    (lambda: KVLayout.vllm([torch.zeros(2, 4, 16, 2, 8), torch.zeros(2, 4, 16, 2, 8,
                                                                     dtype=torch.half)]), "dtype"),
    (lambda: KVLayout.vllm([torch.zeros(2, 4, 16, 2, 8), torch.zeros(2, 5, 16, 2, 8)]), "shape"),
    (lambda: KVLayout.vllm([torch.zeros(2, 4, 16, 2, 8), torch.zeros(2, 4, 16, 2, 8,
                                                                     device="meta")]), "device"),
    (lambda: KVLayout.vllm([torch.zeros(2, 4, 8, 2, 16).transpose(2, 4)]), "stride"),
    (lambda: KVLayout.vllm([[1, 2]]), "type"),
    (lambda: KVLayout.split_kv([torch.zeros(64, 4, 8)], [], 16), "num_layers"),
    (lambda: KVLayout.split_kv([torch.zeros(60, 4, 8)], [torch.zeros(60, 4, 8)], 16),
     "block_size"),
    (lambda: KVLayout.split_kv([torch.zeros(64, 4, 8)], [torch.zeros(64, 4, 8)], 0),
     "block_size"),
    (lambda: KVLayout.mla([torch.zeros(0, 64, 576)]), "shape"),
])
def test_malformed_tensors_name_the_problem(make, field):
    with pytest.raises(LayoutMismatch) as info:
        make()
    assert info.value.field == field


def test_views_share_memory_with_the_engine():
    t = torch.zeros(2, 4, 16, 2, 8)
    layout = KVLayout.vllm([t])
    layout.region(0, "V").view[3].fill_(7)
    assert t[1, 3].eq(7).all() and t[0].eq(0).all()


def test_descriptor_round_trip_and_mismatch_fields():
    a = KVLayout.vllm([torch.zeros(2, 4, 16, 2, 8)]).descriptor
    assert LayoutDescriptor.from_bytes(a.to_bytes()) == a
    other = KVLayout.vllm([torch.zeros(2, 9, 16, 2, 8)]).descriptor
    a.check_compatible(other)  # block counts may differ
    for tensor, field in [(torch.zeros(2, 4, 16, 4, 8), "total_kv_heads"),
                          (torch.zeros(2, 4, 8, 2, 8), "block_size"),
                          (torch.zeros(2, 4, 16, 2, 16), "head_dim")]:
        with pytest.raises(LayoutMismatch) as info:
            a.check_compatible(KVLayout.vllm([tensor]).descriptor)
        assert info.value.field == field
    for raw in (b"not json", b"[]", b'{"block_order": "NHD"}',
                a.to_bytes().replace(b'"num_blocks":4', b'"num_blocks":-4')):
        with pytest.raises(LayoutMismatch):
            LayoutDescriptor.from_bytes(raw)


def test_block_and_layer_checks():
    layout = KVLayout.vllm([torch.zeros(2, 4, 16, 2, 8)] * 3)
    layout.check_blocks([0, 3])
    with pytest.raises(BlockOutOfRange):
        layout.check_blocks([4])
    assert layout.normalize_layers(None) == (0, 1, 2)
    assert layout.normalize_layers([2, 0, 2]) == (0, 2)
    with pytest.raises(BlockOutOfRange):
        layout.normalize_layers([3])

"""A KVLayout from the tensors vLLM hands a connector's ``register_kv_caches``.

Engine-free (vLLM is not imported), so it is tested on its own. vLLM's attention
backends keep a layer's paged KV in one of these shapes::

    CPU (CPU_ATTN)         [num_blocks, kv_heads, block_size, 2 * head_size]
                           K and V side by side in the last dim: a block is one
                           contiguous run, so a layer is one region, part "KV"
    FlashAttention & co.   [2, num_blocks, block_size, kv_heads, head_size]  (NHD), or
                           the same shape over HND memory (strides permuted)
    FlashInfer             [num_blocks, 2, block_size, kv_heads, head_size]  (idem)

Both sides of a transfer run the same backend, so they build equal descriptors.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..errors import LayoutMismatch
from ..layout import KVLayout, Region

CPU_ORDER = "vllm-cpu"  # descriptor block_order of the CPU layout
CPU_PARTS = ("KV",)


def layout_from_vllm(kv_caches: Mapping[str, torch.Tensor]) -> KVLayout:
    """Build the KVLayout of vLLM's per-layer KV tensors (in the engine's layer order).

    Raises:
        LayoutMismatch: a shape or memory order this module does not know.
    """
    tensors = list(kv_caches.values())
    if not tensors:
        raise LayoutMismatch("vLLM registered no KV cache tensors", field="num_layers")
    t = tensors[0]
    if t.dim() == 4:
        return _cpu_layout(tensors)
    if t.dim() == 5:
        kv_dim = 0 if t.shape[0] == 2 else 1
        try:
            return KVLayout.vllm(tensors, kv_layout="NHD", kv_dim=kv_dim)
        except LayoutMismatch as exc:
            if exc.field != "stride":
                raise
        # HND memory behind an NHD-shaped view: look at it in memory order.
        perm = (0, 1, 3, 2, 4)
        return KVLayout.vllm([x.permute(*perm) for x in tensors], kv_layout="HND",
                             kv_dim=kv_dim)
    raise LayoutMismatch(f"unknown vLLM KV cache shape {tuple(t.shape)}", field="shape")


def _cpu_layout(tensors: list[torch.Tensor]) -> KVLayout:
    first = tensors[0]
    num_blocks, heads, block_size, two_head = first.shape
    if two_head % 2:
        raise LayoutMismatch(f"CPU KV last dim {two_head} is not 2 * head_size", field="shape")
    regions = []
    for layer, t in enumerate(tensors):
        if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise LayoutMismatch(f"layer {layer}: KV tensor {tuple(t.shape)} {t.dtype} "
                                 f"differs from layer 0's", field="shape")
        if not t[0].is_contiguous():
            raise LayoutMismatch(f"layer {layer}: a CPU KV block is not contiguous "
                                 f"(strides {t.stride()})", field="stride")
        elem = t.element_size()
        block_bytes = heads * block_size * two_head * elem
        stride = t.stride(0) * elem
        if num_blocks > 1 and stride < block_bytes:
            raise LayoutMismatch(f"layer {layer}: KV blocks overlap", field="stride")
        regions.append(Region(layer=layer, part="KV", view=t, block_stride=stride,
                              block_bytes=block_bytes, num_blocks=num_blocks))
    return KVLayout(regions, block_order=CPU_ORDER, parts=CPU_PARTS, block_size=block_size,
                    num_kv_heads=heads, head_dim=two_head // 2)

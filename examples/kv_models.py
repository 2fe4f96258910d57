"""KV-cache geometry of public models and a helper that allocates such a cache.

Figures are from the models' published configs (the same as ../shared/kv_shapes.json):
bytes per token = 2 (K, V) x layers x kv_heads x head_dim x dtype bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kvxfer


@dataclass(frozen=True)
class ModelGeometry:
    name: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16
    block_size: int = 16
    mla_latent_dim: int = 0  # > 0: MLA, one latent per token per layer

    @property
    def bytes_per_token(self) -> int:
        size = torch.empty(0, dtype=self.dtype).element_size()
        if self.mla_latent_dim:
            return self.layers * self.mla_latent_dim * size
        return 2 * self.layers * self.kv_heads * self.head_dim * size


MODELS = {g.name: g for g in [
    ModelGeometry("llama-3.1-8b", 32, 8, 128),
    ModelGeometry("llama-3.1-70b", 80, 8, 128),
    ModelGeometry("llama-3.1-405b", 126, 8, 128),
    ModelGeometry("mistral-7b", 32, 8, 128),
    ModelGeometry("qwen2.5-7b", 28, 4, 128),
    ModelGeometry("qwen3-8b", 36, 8, 128),
    ModelGeometry("gpt-oss-120b", 36, 8, 64),
    ModelGeometry("deepseek-v3", 61, 1, 576, block_size=64, mla_latent_dim=576),
]}


def model_geometry(name: str) -> ModelGeometry:
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def make_kv_cache(geo: ModelGeometry, num_blocks: int, seed: int,
                  device: str = "cpu") -> kvxfer.KVLayout:
    """A vLLM-shaped (NHD) or MLA KV cache filled with bytes that depend only on seed."""
    gen = torch.Generator().manual_seed(seed)
    size = torch.empty(0, dtype=geo.dtype).element_size()
    if geo.mla_latent_dim:
        shape = (num_blocks, geo.block_size, geo.mla_latent_dim)
    else:
        shape = (2, num_blocks, geo.block_size, geo.kv_heads, geo.head_dim)
    numel = 1
    for s in shape:
        numel *= s
    tensors = []
    for _ in range(geo.layers):
        raw = torch.randint(0, 256, (numel * size,), dtype=torch.uint8, generator=gen)
        tensors.append(raw.view(geo.dtype).view(shape).to(device))
    if geo.mla_latent_dim:
        return kvxfer.KVLayout.mla(tensors)
    return kvxfer.KVLayout.vllm(tensors, kv_layout="NHD")

"""A small Llama-style decoder in plain torch, with paged attention over a vLLM cache.

The model is what the disaggregated serving demo (``disagg_serving.py``) runs: RMSNorm,
rotary positions, grouped-query attention and a SwiGLU MLP, with weights drawn from a
fixed seed, so every process that builds it holds the same model. Its KV cache is the
one vLLM keeps (and kvxfer moves): per layer one tensor

    [2 (K, V), num_blocks, block_size, kv_heads, head_dim]      (vLLM "NHD")

and a request's tokens live in the blocks its block table names: token ``p`` is at
``table[p // block_size]``, slot ``p % block_size``. :func:`forward` writes the KV of the
tokens it computes into those slots and attends over every earlier token of the
request through the same table, so it does not care whether the earlier tokens' KV was
computed here, reused from a prefix cache, or written in by a peer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch


@dataclass(frozen=True)
class TinyLlamaConfig:
    vocab: int = 512
    dim: int = 256
    layers: int = 8
    heads: int = 8
    kv_heads: int = 4
    ffn: int = 512
    block_size: int = 16
    rope_theta: float = 10000.0
    dtype: torch.dtype = torch.float32
    seed: int = 1234

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


class TinyLlama:
    """Weights of the model, drawn from ``config.seed``; CPU, inference only."""

    def __init__(self, config: TinyLlamaConfig = TinyLlamaConfig()) -> None:
        self.config = c = config
        gen = torch.Generator().manual_seed(c.seed)

        def w(*shape: int) -> torch.Tensor:
            return (torch.randn(*shape, generator=gen) / math.sqrt(shape[-1])).to(c.dtype)

        hd = c.head_dim
        self.embed = w(c.vocab, c.dim) * math.sqrt(c.dim)
        self.blocks = [{
            "attn_norm": torch.ones(c.dim, dtype=c.dtype),
            "wq": w(c.heads * hd, c.dim), "wk": w(c.kv_heads * hd, c.dim),
            "wv": w(c.kv_heads * hd, c.dim), "wo": w(c.dim, c.heads * hd),
            "mlp_norm": torch.ones(c.dim, dtype=c.dtype),
            "w_gate": w(c.ffn, c.dim), "w_up": w(c.ffn, c.dim), "w_down": w(c.dim, c.ffn),
        } for _ in range(c.layers)]
        self.norm = torch.ones(c.dim, dtype=c.dtype)
        self.lm_head = w(c.vocab, c.dim)
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        self._inv_freq = inv

    def new_cache(self, num_blocks: int) -> list[torch.Tensor]:
        """An empty (zeroed) vLLM NHD cache: one tensor per layer."""
        c = self.config
        return [torch.zeros(2, num_blocks, c.block_size, c.kv_heads, c.head_dim, dtype=c.dtype)
                for _ in range(c.layers)]

    # ------------------------------------------------------------------ math
    @staticmethod
    def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, head_dim]; rotate pairs (i, i + head_dim/2) by position."""
        angles = positions.to(torch.float64)[:, None] * self._inv_freq[None, :]
        cos = angles.cos().to(x.dtype)[:, None, :]
        sin = angles.sin().to(x.dtype)[:, None, :]
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def forward(self, tokens: Sequence[int], start: int, table: Sequence[int],
                cache: list[torch.Tensor],
                before_layer: Optional[Callable[[int], None]] = None,
                after_layer: Optional[Callable[[int], None]] = None) -> torch.Tensor:
        """Compute ``tokens`` (positions ``start`` ...) and return the last one's logits.

        Args:
            tokens: the new tokens of the request.
            start: position of ``tokens[0]``; positions ``< start`` already have their
                KV in ``cache`` at the slots ``table`` names.
            table: the request's block table (covers every position up to the last).
            cache: the paged KV cache (see :meth:`new_cache`).
            before_layer: called with layer i before it reads the cache (a decode
                worker waits there for layer i of the pushed KV to land).
            after_layer: called with layer i once its KV is written (a prefill worker
                pushes layer i from there).

        Returns:
            Logits over the vocabulary for the last token, float32.
        """
        c = self.config
        n, ctx = len(tokens), start + len(tokens)
        if ctx > len(table) * c.block_size:
            raise ValueError(f"block table of {len(table)} blocks cannot hold {ctx} tokens")
        positions = torch.arange(start, ctx)
        blocks = torch.tensor(list(table), dtype=torch.long)
        slot_block = blocks[positions // c.block_size]
        slot = positions % c.block_size
        used = blocks[:-(-ctx // c.block_size)]
        # causal mask: new token i (position start+i) sees positions <= start+i
        mask = torch.arange(ctx)[None, :] <= positions[:, None]
        x = self.embed[torch.tensor(list(tokens), dtype=torch.long)]
        hd, group = c.head_dim, c.heads // c.kv_heads
        for i, p in enumerate(self.blocks):
            if before_layer is not None:
                before_layer(i)
            h = self._rms(x, p["attn_norm"])
            q = self._rope((h @ p["wq"].T).view(n, c.heads, hd), positions)
            k = self._rope((h @ p["wk"].T).view(n, c.kv_heads, hd), positions)
            v = (h @ p["wv"].T).view(n, c.kv_heads, hd)
            cache[i][0, slot_block, slot] = k
            cache[i][1, slot_block, slot] = v
            if after_layer is not None:
                after_layer(i)
            keys = cache[i][0, used].reshape(-1, c.kv_heads, hd)[:ctx]      # [ctx, kvh, hd]
            values = cache[i][1, used].reshape(-1, c.kv_heads, hd)[:ctx]
            keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)       # [heads, ctx, hd]
            values = values.repeat_interleave(group, dim=1).transpose(0, 1)
            scores = (q.transpose(0, 1) @ keys.transpose(1, 2)) / math.sqrt(hd)  # [h, n, ctx]
            scores = scores.masked_fill(~mask[None], float("-inf"))
            attn = (scores.softmax(-1) @ values).transpose(0, 1).reshape(n, c.heads * hd)
            x = x + attn @ p["wo"].T
            h = self._rms(x, p["mlp_norm"])
            x = x + (torch.nn.functional.silu(h @ p["w_gate"].T) * (h @ p["w_up"].T)) @ p["w_down"].T
        return (self._rms(x[-1], self.norm) @ self.lm_head.T).float()


def generate_single_process(model: TinyLlama, prompt: Sequence[int], new_tokens: int) -> list[int]:
    """The reference: prefill and greedy decode in one process, no prefix cache."""
    c = model.config
    total = len(prompt) + new_tokens
    nblocks = -(-total // c.block_size)
    cache = model.new_cache(nblocks)
    table = list(range(nblocks))
    out = [int(model.forward(prompt, 0, table, cache).argmax())]
    while len(out) < new_tokens:
        pos = len(prompt) + len(out) - 1
        out.append(int(model.forward([out[-1]], pos, table, cache).argmax()))
    return out

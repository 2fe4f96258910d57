"""Build a small random-weight Llama and a byte-level BPE tokenizer in one folder.

No model hub is needed: vLLM and transformers both load the folder as a local model,
so the disaggregated examples, tests and benchmarks run anywhere. The weights are
scaled up so that greedy decoding is decided by clear margins, not by ties, which
makes "same tokens" a real check.

    python examples/tiny_llama.py /tmp/tiny-llama                      # 2 layers, tiny
    python examples/tiny_llama.py /tmp/big --layers 8 --kv-heads 8 --head-dim 128
"""

from __future__ import annotations

import argparse
import json
import os

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Prefill workers compute the prompt, decode workers generate the answer.",
    "Paged attention keeps the KV cache in fixed-size blocks of tokens.",
    "A connector moves those blocks from one engine to another over the network.",
    "Tokens must be the same whether one engine or two engines serve the request.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}",
]


def build(path: str, layers: int = 2, hidden: int = 128, heads: int = 4, kv_heads: int = 2,
          head_dim: int = 32, vocab: int = 512, max_positions: int = 8192,
          seed: int = 0) -> str:
    """Write a LlamaForCausalLM and its tokenizer to ``path`` (kept if already built
    with the same arguments); returns ``path``."""
    args = dict(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                head_dim=head_dim, vocab=vocab, max_positions=max_positions, seed=seed)
    stamp = os.path.join(path, "kvxfer_tiny_llama.json")
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == args:
                return path
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    os.makedirs(path, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(path)

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=head_dim,
                         max_position_embeddings=max_positions, bos_token_id=0,
                         eos_token_id=1, tie_word_embeddings=False, torch_dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:  # larger weights: logits with clear margins, no greedy ties
                p.normal_(0.0, 0.2 if "embed" not in name else 1.0)
        model.lm_head.weight.mul_(4.0)
    model.save_pretrained(path, safe_serialization=True)
    with open(stamp, "w") as f:
        json.dump(args, f)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=512)
    a = ap.parse_args()
    print(build(a.path, layers=a.layers, hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads,
                head_dim=a.head_dim, vocab=a.vocab))


if __name__ == "__main__":
    main()

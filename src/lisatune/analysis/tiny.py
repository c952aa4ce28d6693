"""Tiny models built from configs (random weights, no download).

Shipped in the package because a user-facing command uses it: `lisatune bench memory --model tiny[:N_LAYERS]`
(analysis/memory.py) measures on one without a download. The tests and benchmarks build theirs from it too.
"""
from __future__ import annotations

import torch
import transformers as T

ARCHS = {
    "llama": lambda n, pos=128: T.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=n,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=pos),
    "mistral": lambda n, pos=128: T.MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=n,
                                              num_attention_heads=4, num_key_value_heads=2),
    "qwen2": lambda n, pos=128: T.Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=n,
                                          num_attention_heads=4, num_key_value_heads=2),
    "gemma": lambda n, pos=128: T.GemmaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=n,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    "gpt2": lambda n, pos=128: T.GPT2Config(vocab_size=96, n_embd=32, n_layer=n, n_head=4, n_positions=pos,
                                        bos_token_id=0, eos_token_id=0),
    "gpt_neox": lambda n, pos=128: T.GPTNeoXConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=n, num_attention_heads=4),
    "opt": lambda n, pos=128: T.OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=n,
                                      num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=pos),
    "phi": lambda n, pos=128: T.PhiConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=n,
                                      num_attention_heads=4),
}


def tiny_config(arch: str = "llama", n_layers: int = 6, max_positions: int = 128):
    """The config of a tiny `arch` (vocab 96, hidden 32, 4 heads, MLP 64)."""
    return ARCHS[arch](n_layers, max_positions)


def tiny_model(arch: str = "llama", n_layers: int = 6, seed: int = 0, dtype=torch.float32, max_positions: int = 128):
    """A tiny `arch` with seeded random weights, eager attention."""
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(tiny_config(arch, n_layers, max_positions), dtype=dtype,
                                              attn_implementation="eager")

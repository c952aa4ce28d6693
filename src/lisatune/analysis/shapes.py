"""Built-in model shapes for `lisatune plan`: the configs of public models, written out (no download).

Values from the models' published config.json files. Only what shapes memory matters to the planner (sizes,
heads, vocabulary, tying); rope settings are included so the configs are the real ones.
"""
from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

_LLAMA2 = {"model_type": "llama", "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
           "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "bos_token_id": 1, "eos_token_id": 2}



def _llama3_rope(factor: float) -> dict:
    return {"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


_LLAMA3 = {"model_type": "llama", "vocab_size": 128256, "num_key_value_heads": 8, "max_position_embeddings": 131072,
           "rms_norm_eps": 1e-5, "rope_parameters": _llama3_rope(8.0), "bos_token_id": 128000, "eos_token_id": 128001}

SHAPES: dict[str, dict] = {
    "Llama-2-7B": {**_LLAMA2, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32},
    "Llama-2-70B": {**_LLAMA2, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8},
    "Mistral-7B": {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "max_position_embeddings": 32768, "sliding_window": 4096, "rms_norm_eps": 1e-5,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "bos_token_id": 1,
                   "eos_token_id": 2},
    "Llama-3.1-8B": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32},
    "Llama-3.1-70B": {**_LLAMA3, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                      "num_attention_heads": 64},
    "Llama-3.2-1B": {**_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "head_dim": 64, "tie_word_embeddings": True,
                     "rope_parameters": _llama3_rope(32.0)},
    "Llama-3.2-3B": {**_LLAMA3, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                     "num_attention_heads": 24, "head_dim": 128, "tie_word_embeddings": True,
                     "rope_parameters": _llama3_rope(32.0)},
    "Qwen2.5-7B": {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                   "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                   "use_sliding_window": False, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
                   "bos_token_id": 151643, "eos_token_id": 151643},
    "gemma-7b": {"model_type": "gemma", "vocab_size": 256000, "hidden_size": 3072, "intermediate_size": 24576,
                 "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256,
                 "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "bos_token_id": 2,
                 "eos_token_id": 1, "pad_token_id": 0},
    "gemma-2-9b": {"model_type": "gemma2", "vocab_size": 256000, "hidden_size": 3584, "intermediate_size": 14336,
                   "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
                   "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
                   "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": 30.0,
                   "attn_logit_softcapping": 50.0, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                   "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0},
    "Qwen2.5-3B": {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008,
                   "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
                   "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                   "use_sliding_window": False, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
                   "bos_token_id": 151643, "eos_token_id": 151643},
    "SmolLM2-135M": {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}, "bos_token_id": 0,
                     "eos_token_id": 0},
}

# Parameter counts of the published checkpoints: the shapes above must reproduce them (tests/test_plan.py).
PARAMS = {"Llama-2-7B": 6_738_415_616, "Llama-2-70B": 68_976_648_192, "Mistral-7B": 7_241_732_096,
          "Llama-3.1-8B": 8_030_261_248, "Llama-3.1-70B": 70_553_706_496, "Llama-3.2-1B": 1_235_814_400,
          "Llama-3.2-3B": 3_212_749_824, "Qwen2.5-7B": 7_615_616_512, "gemma-7b": 8_537_680_896,
          "gemma-2-9b": 9_241_705_984, "Qwen2.5-3B": 3_085_938_688, "SmolLM2-135M": 134_515_008}


def shape_config(name: str) -> PretrainedConfig | None:
    """The config of a built-in shape (case-insensitive name), or None if `name` is not one."""
    key = next((k for k in SHAPES if k.lower() == name.lower()), None)
    if key is None:
        return None
    kw = dict(SHAPES[key])
    return AutoConfig.for_model(kw.pop("model_type"), **kw)

"""Bytes bitsandbytes holds, from shapes alone (no bitsandbytes needed): what `lisatune plan` counts for quantized
weights and 8-bit optimizer state. tests/test_quant.py holds each formula equal to the tensors bitsandbytes
(0.50) allocates for real layers and optimizers on CPU.
"""
from __future__ import annotations

from math import ceil
from typing import Iterable

NF4_BLOCK = 64  # values per absmax (Params4bit's default blocksize)
NESTED_BLOCK = 256  # absmax values per fp32 scale of the double quantization
ADAM8_BLOCK = 256  # values per fp32 absmax of AdamW8bit's blockwise moments
MIN_8BIT_SIZE = 4096  # AdamW8bit keeps tensors with fewer values in 32-bit
QMAP_BYTES = 256 * 4  # one 256-entry fp32 quantization map


def nf4_bytes(out_features: int, in_features: int) -> int:
    """A Linear4bit's nf4 weight with double-quantized statistics (Params4bit's default, compress_statistics=True;
    what lisa.frozen_weights: nf4 and QLoRA use): the packed 4-bit values (two per byte), one uint8 absmax per
    64 values, their fp32 offset, one fp32 scale per 256 absmax, and the layer's own copies of the nf4 code
    (16 fp32) and of the absmax's dynamic map (256 fp32)."""
    n = out_features * in_features
    blocks = ceil(n / NF4_BLOCK)
    return ceil(n / 2) + blocks + 4 + 4 * ceil(blocks / NESTED_BLOCK) + 16 * 4 + QMAP_BYTES


def int8_bytes(out_features: int, in_features: int) -> int:
    """An int8 weight (bitsandbytes' Int8Params, in a frozen block's FrozenInt8Linear or a Linear8bitLt): one int8
    per value and an fp32 scale per output row (SCB)."""
    return out_features * in_features + 4 * out_features


QUANTIZED = {"int8": int8_bytes, "nf4": nf4_bytes}


def quantized_linear_bytes(out_features: int, in_features: int, kind: str) -> int:
    return QUANTIZED[kind](out_features, in_features)


def adamw8bit_state_bytes(numels: Iterable[int]) -> int:
    """bitsandbytes' AdamW8bit (blockwise) over tensors of `numels` values: a tensor of n >= 4096 values holds two
    uint8 moments (2n bytes) and two fp32 absmax per 256 values; a smaller one two fp32 moments (8n); the step is
    an int, no tensor; the two quantization maps (256 fp32 each) are shared by all of the optimizer's 8-bit
    tensors."""
    numels = list(numels)
    big = [n for n in numels if n >= MIN_8BIT_SIZE]
    small = sum(n for n in numels if n < MIN_8BIT_SIZE)
    return sum(2 * n + 2 * 4 * ceil(n / ADAM8_BLOCK) for n in big) + 8 * small + (2 * QMAP_BYTES if big else 0)

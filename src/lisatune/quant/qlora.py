"""`lora.base: nf4 | int8`: QLoRA's frozen base, the blocks' nn.Linear layers held by bitsandbytes.

Each block's nn.Linear becomes a bitsandbytes Linear4bit (nf4, computing in the model's dtype) or Linear8bitLt
(int8), the layers `lisatune plan`'s lora:base plans and peft adapts. As LISA's frozen blocks (quant/frozen.py),
each keeps its full-precision weight on the host, unregistered (`lisa_full`), and saves and loads that weight
under the usual key, re-quantizing on load: checkpoints hold ordinary model weights and resume bitwise (the
quantization is deterministic), and the final merge adds the LoRA delta to the full-precision weight, not to a
dequantized one. The host copy costs host memory: the model's size in full precision, as before quantizing.
"""
from __future__ import annotations

from functools import cache

import torch
from torch import nn

from ..engine import find_layers
from ..errors import LisaError
from .frozen import _bitsandbytes as frozen_bitsandbytes
from .frozen import _Frozen, quantizable_linears, quantized_module, quantized_weight


def _bitsandbytes(kind: str):
    return frozen_bitsandbytes(kind, "lora.base")


class QLoraBase(_Frozen):
    """A quantized base linear of QLoRA: re-quantized where its quantized weight lives now (the model may have
    been moved since), else onto `lisa_device`."""

    def quantize(self) -> None:
        w = self.weight
        if w is not None and w.device.type != "meta":
            self.__dict__["lisa_device"] = w.device
        self.weight = quantized_weight(_bitsandbytes(self.kind), self.__dict__["lisa_full"], self.kind,
                                       self.__dict__["lisa_device"])


@cache
def _base_class(kind: str) -> type:
    bnb = _bitsandbytes(kind)
    parent = bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit
    return type(f"QLora{parent.__name__}", (QLoraBase, parent), {"kind": kind})


def quantize_base(model: nn.Module, kind: str, device: torch.device | str | None = None) -> nn.Module:
    """Every block's nn.Linear as a QLoraBase of `kind`, in place, quantized onto `device` (default: the device its
    weight is on), one layer at a time; its weight (frozen) becomes the module's host copy. nf4 computes in the
    weight's dtype (bf16 under model.dtype: bf16)."""
    _bitsandbytes(kind)  # refused here, before anything changes, when it is missing
    cls = _base_class(kind)
    path = find_layers(model).blocks_path
    found = [e for block in model.get_submodule(path) for e in quantizable_linears(block)]
    if not found:  # e.g. GPT-2's Conv1D: nothing would be quantized
        raise LisaError(f"lora.base: {kind} quantizes torch.nn.Linear layers, and the blocks ({path}) have none; "
                        "use lora.base: full")
    for parent, attr, lin, _ in found:
        w = lin.weight.requires_grad_(False)
        q = quantized_module(cls, lin, kind, w.dtype)
        if kind == "int8":  # LLM.int8's outlier threshold, as transformers' load_in_8bit: on CUDA, input columns
            q.state.threshold, q.state.use_pool = 6.0, True  # above it multiply in fp16, not quantized to int8
        q.__dict__["lisa_full"] = w.data if w.device.type == "cpu" else w.data.to("cpu")
        q.__dict__["lisa_device"] = w.device if device is None else torch.device(device)
        q.weight = None  # quantize() quantizes onto lisa_device
        q.quantize()
        setattr(parent, attr, q)
    return model


def quantized_bases(model: nn.Module) -> list[QLoraBase]:
    return [m for m in model.modules() if isinstance(m, QLoraBase)]


def place_bases(model: nn.Module, device: torch.device | str) -> None:
    """Each quantized base re-quantized from its host copy straight onto `device`: the device never holds the
    model's block weights in full precision, only one layer's at a time while it quantizes."""
    device = torch.device(device)
    for m in quantized_bases(model):
        w = m.weight
        if w is not None and w.device.type == device.type and device.index in (None, w.device.index):
            continue  # quantized there already (prepare(model, device)): once is enough
        m.__dict__["lisa_device"] = device
        m.weight = None
        m.quantize()


def merged_linear(base: QLoraBase, delta: torch.Tensor) -> nn.Linear:
    """A plain nn.Linear on the host: the base's full-precision weight plus `delta` (the LoRA update, out x in),
    added in fp32 and rounded once to the weight's dtype; the base's bias."""
    full = base.__dict__["lisa_full"]
    lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
    w = (full.to(torch.float32) + delta.detach().to(full.device, torch.float32)).to(full.dtype)
    lin.weight = nn.Parameter(w, requires_grad=False)
    if base.bias is not None:
        lin.bias = nn.Parameter(base.bias.detach().to(full.device), requires_grad=False)
    lin.train(base.training)
    return lin

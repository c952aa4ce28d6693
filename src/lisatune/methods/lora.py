"""LoRA through peft: frozen base weights, trainable low-rank adapters on the blocks' linear layers."""
from __future__ import annotations

import re
import sys
import warnings

import torch
from transformers.pytorch_utils import Conv1D

from ..engine import decay_groups
from ..errors import LisaError, first_line
from ..options import LoraOptions
from ..quant.qlora import QLoraBase, merged_linear, place_bases, quantize_base
from .base import Method, block_linears, trainable


def default_targets(model) -> list[str] | str:
    """The leaf names of the blocks' linear layers (e.g. q_proj, ..., down_proj; c_attn, c_proj, c_fc for GPT-2).

    If one of those names also names a module outside the blocks (say a vision tower's q_proj), peft's
    suffix match would wrap it too, so a regex anchored at the blocks is returned instead.
    """
    path, mods = block_linears(model)
    if not mods:
        raise LisaError(f"lora: no Linear/Conv1D layers found inside the blocks at {path}; pass target_modules")
    leaves = sorted({n.rsplit(".", 1)[-1] for n in mods})
    same_name = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in leaves}
    if same_name == set(mods):
        return leaves
    return rf"{re.escape(path)}\.\d+\.(?:.*\.)?(?:{'|'.join(map(re.escape, leaves))})"


class Lora(Method):
    name = "lora"
    Options = LoraOptions

    def prepare(self, model, device=None):
        from peft import LoraConfig, PeftModel, get_peft_model  # deferred: peft pulls in bitsandbytes, slow and noisy

        if isinstance(model, PeftModel):
            raise LisaError("lora: the model already carries a PEFT adapter; pass the base model")
        o = self.options
        _, mods = block_linears(model)
        targets = o.target_modules or default_targets(model)
        if o.base != "full":  # QLoRA: peft wraps the quantized linears (their class is nn.Linear's)
            quantize_base(model, o.base, device)  # straight onto the device: place() has nothing left to quantize
        cfg = LoraConfig(
            r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout, bias="none", task_type="CAUSAL_LM",
            target_modules=targets,
            # Conv1D stores its weight transposed; telling peft up front avoids a warning per layer.
            fan_in_fan_out=bool(mods) and all(isinstance(m, Conv1D) for m in mods.values()),
        )
        try:
            with warnings.catch_warnings():  # peft 0.21 calls an API transformers 5 deprecated; not ours to fix
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                return get_peft_model(model, cfg)
        except ValueError as e:  # e.g. no module matches target_modules
            names = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in mods}))
            raise LisaError(f"lora: {first_line(e)} (linear layers in the blocks: {names})") from None

    def make_optimizer(self, model, hyper):
        if not _is_peft(model):  # else every base weight would be trained
            raise LisaError("lora: optimizer() needs the model returned by prepare()")
        return torch.optim.AdamW(decay_groups(trainable(model)), **hyper)

    def place(self, model, device):
        """A quantized base (lora.base: nf4 | int8) is quantized again from its host copies straight onto `device`,
        one layer at a time; then the rest of the model moves."""
        place_bases(model, device)
        model.to(device)
        return {}

    def export(self, model, merge=True):
        """merge: the base model with B·A folded into its weights (modifies `model`); else the PeftModel,
        whose save_pretrained writes the adapter only.

        With a quantized base the delta is added to the base's full-precision host copy (in fp32, rounded once to
        the model's dtype), not to a dequantized weight, and each such layer becomes a plain nn.Linear on the
        host: the merged model is the plain Hugging Face model a full-precision LoRA would give."""
        if not _is_peft(model) or not merge:
            return model
        from peft.tuners.lora import LoraLayer  # deferred, as in prepare

        for name, m in list(model.named_modules()):
            if isinstance(m, LoraLayer) and isinstance(m.get_base_layer(), QLoraBase):
                base = m.get_base_layer()
                delta = torch.zeros(base.out_features, base.in_features)
                for a in m.active_adapters:
                    if a in m.lora_A:
                        delta += m.get_delta_weight(a).float().to(delta.device)
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent), attr, merged_linear(base, delta))
        return model.merge_and_unload()  # the adapters on unquantized layers, if any; and the base model unwrapped


def _is_peft(model) -> bool:
    peft = sys.modules.get("peft")  # not imported here: only a model built by peft can be one
    return peft is not None and isinstance(model, peft.PeftModel)

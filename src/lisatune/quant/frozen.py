"""`lisa.frozen_weights: int8 | nf4`: frozen blocks' nn.Linear weights live quantized (bitsandbytes).

A switch hook on one optimizer instance (attach_frozen_weights: at once, at each switch and after
load_state_dict), registered by whoever builds the optimizer (LisaAdamW): every nn.Linear
of a frozen block is replaced in its parent by a FrozenInt8Linear (bitsandbytes' int8 weight with fp32 row
scales, computing x @ dequant(W).T on every device) or a bitsandbytes Linear4bit (nf4) built from its
high-precision weight; an active block gets its original nn.Linear back, with the same
Parameter objects the optimizer holds, so it trains exactly as with `full`. The high-precision copies live in
host memory (`FrozenWeights.host`: parameter name -> CPU tensor): a frozen weight's data is its host copy, and
an active one's is copied back to it when it freezes (on CPU the two are one tensor, so nothing is saved there;
on an accelerator the device holds only the quantized frozen blocks). The quantized modules save and load their
high-precision copy under the usual keys, so model.state_dict(), save_pretrained and every checkpoint carry the
full-precision weights of every block, and loading a state dict re-quantizes from it. Optimizer state is not
touched: state_bytes() is the same as with `full`.

With a spill folder (`lisa.spill_dir`), a block that trained and freezes again writes its full-precision linears
to a safetensors file there and keeps them as that file's mapped pages (the file is unlinked at once: nothing is
left behind, the mapping keeps it readable), so host RAM holds no copy of any trained block: clean file pages
the kernel can drop and re-read, as a loaded checkpoint's. On the host, an active block then trains a private
copy of its weights (never the mapped pages: pages written are private RAM for as long as the mapping lives).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..engine import LisaOptimizer, find_layers
from ..engine.parking import move_state
from ..errors import LisaError


def _bitsandbytes(kind: str, field: str = "lisa.frozen_weights"):
    try:
        import bitsandbytes  # deferred: optional and slow to import, and only this option needs it
    except ImportError:
        raise LisaError(f"{field}: {kind} needs bitsandbytes (pip install bitsandbytes)") from None
    return bitsandbytes


def quantizable_linears(block: nn.Module) -> list[tuple[nn.Module, str, nn.Linear, str]]:
    """(parent, attribute, linear, name in the block) of every linear quantization replaces in `block`: exactly
    nn.Linear (subclasses may compute differently). `lisatune plan` counts the same modules."""
    out = []
    for sub, m in block.named_modules():
        if type(m) is nn.Linear:
            parent, _, attr = sub.rpartition(".")
            out.append((block.get_submodule(parent), attr, m, sub))
    return out


def copy_bytes(block: nn.Module) -> int:
    """The bytes of `block`'s full-precision copy when it is held quantized: its quantizable linears' weights
    (meta tensors too: `lisatune plan` and the host RAM check count the same)."""
    return sum(lin.weight.numel() * lin.weight.element_size() for _, _, lin, _ in quantizable_linears(block))


def private_copies(trained: int, gamma: int, spilled: bool) -> int:
    """How many blocks' full-precision copies are private host RAM once `trained` blocks have trained: each of
    them, or with a spill folder at most γ + 1 (on the host the active blocks train private copies; a freezing
    block is written out one at a time). `lisatune plan` and the host RAM check count the same."""
    return min(trained, gamma + 1) if spilled else trained


def quantized_weight(bnb, w: torch.Tensor, kind: str, device: torch.device) -> nn.Parameter:
    """`w` quantized by bitsandbytes on `device`: Int8Params (int8 + fp32 row scales) or Params4bit (nf4,
    double-quantized absmax: the default compress_statistics=True)."""
    w = w.detach().clone()  # the library quantizes into new storage; never touch the source
    if kind == "int8":
        q = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    return q.to(device)


def quantized_module(cls: type, lin: nn.Linear, kind: str, dtype: torch.dtype) -> nn.Module:
    """An empty bitsandbytes linear of class `cls` (a Linear8bitLt or Linear4bit) in `lin`'s place: its bias, its
    train mode; the caller sets its quantized weight."""
    if kind == "int8":
        q = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False,
                threshold=0.0, device="meta")
    else:
        q = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=dtype,
                quant_type="nf4", device="meta")
        # On a CPU with avx512_bf16 bitsandbytes repacks the weight for its inference kernel (gemv_4bit) at the
        # first eval-mode forward without grad, for good; that kernel has no autograd, so after an evaluation the
        # blocks below got wrong input gradients (and layers under 64 columns failed to repack). Keep the layout
        # whose matmul (MatMul4Bit) is differentiable.
        q.support_avx512bf16_for_cpu = False
    if lin.bias is not None:
        q.bias = lin.bias  # frozen, kept as it is
    q.train(lin.training)
    return q


def quantize_linears(model: nn.Module, kind: str) -> nn.Module:
    """Every block's nn.Linear as a bitsandbytes int8 / nf4 linear, in place and on its device: the frozen base of
    QLoRA (nf4) that `lisatune plan`'s lora:base=nf4 plans; peft then adapts these layers (tests, gpu_check)."""
    bnb = _bitsandbytes(kind)
    cls = bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit
    for block in model.get_submodule(find_layers(model).blocks_path):
        for parent, attr, lin, _ in quantizable_linears(block):
            q = quantized_module(cls, lin, kind, lin.weight.dtype)
            q.weight = quantized_weight(bnb, lin.weight, kind, lin.weight.device)
            setattr(parent, attr, q)
    return model


def dequantize_int8(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An int8 weight with fp32 row scales (bitsandbytes' CB, SCB) in `dtype`: each row times its scale / 127,
    rounded once (bitsandbytes' int8_vectorwise_dequant up to one fp32 rounding: it multiplies by the scale, then
    by 1/127). Built in place in `dtype`, never fp32 first: the transient a frozen int8 linear adds while it runs
    is out x in values of `dtype`, plus an fp32 scale per row."""
    return cb.to(dtype).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))


class Int8DequantLinear(torch.autograd.Function):
    """y = x @ dequant(W).T + b, with the input gradient through the same dequantized weight and no weight
    gradient (the weight is frozen). Nothing of x is kept: backward needs only W, which dequantizes again."""

    @staticmethod
    def forward(ctx, x, cb, scb, bias):
        ctx.save_for_backward(cb, scb)  # the weight itself, not a copy: no activation memory
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, dequantize_int8(cb, scb, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        cb, scb = ctx.saved_tensors
        gx = grad.matmul(dequantize_int8(cb, scb, grad.dtype)) if ctx.needs_input_grad[0] else None
        gb = grad.reshape(-1, grad.shape[-1]).sum(0, dtype=ctx.bias_dtype) if ctx.needs_input_grad[3] else None
        return gx, None, None, gb


def spill(folder: Path, tensors: dict[str, torch.Tensor], tag: str) -> dict[str, torch.Tensor]:
    """`tensors` written to a safetensors file in `folder` and read back as its mapped pages (clean: the kernel
    drops and re-reads them, they are not RAM the run holds). The file is unlinked at once: the mapping keeps it
    readable, and nothing is left behind, even when the process is killed."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=f"{tag}-", suffix=".safetensors", dir=folder)
        os.close(fd)
        try:  # a device's weights are copied down to the host one call at a time
            save_file({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}, path)
            return load_file(path)
        finally:
            os.unlink(path)
    except OSError as e:
        raise LisaError(f"lisa.spill_dir: cannot write {tag}'s full-precision weights to {folder} "
                        f"({e.strerror or e})") from None


class _Frozen:
    """A frozen quantized linear: its weight is quantized from `lisa_full` (the high-precision Parameter LISA
    trains, on the host) onto `lisa_device`, and its state dict is that full weight."""
    kind: str

    def quantize(self) -> None:
        """The one quantize path: when its block freezes, and when a state dict is loaded into it."""
        self.weight = quantized_weight(_bitsandbytes(self.kind), self.__dict__["lisa_full"], self.kind,
                                       self.__dict__["lisa_device"])

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        full = self.__dict__["lisa_full"]
        destination[prefix + "weight"] = full if keep_vars else full.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for key, target in (("weight", self.__dict__["lisa_full"]), ("bias", self.bias)):
            if target is None:
                continue
            if prefix + key not in state_dict:
                missing_keys.append(prefix + key)
                continue
            value = state_dict[prefix + key]
            if value.shape != target.shape:
                error_msgs.append(f"size mismatch for {prefix + key}: copying a param with shape {tuple(value.shape)}"
                                  f", the shape in current model is {tuple(target.shape)}.")
                continue
            folder = self.__dict__.get("lisa_spill")  # (QLoRA's bases never spill)
            if key == "weight" and folder is not None:  # mapped pages of a file of its own, not RAM written
                target.data = spill(folder, {key: value.to(target.dtype)}, prefix.rstrip("."))[key]
            else:
                with torch.no_grad():
                    target.copy_(value)  # into the host copy
        self.quantize()


class FrozenInt8Linear(_Frozen, nn.Module):
    """A frozen block's linear held in int8 (bitsandbytes' Int8Params: int8 values and an fp32 scale per output
    row, the bytes quant/sizes.py counts), computing x @ dequant(W).T + b on every device and in train and eval
    mode. Not bitsandbytes' Linear8bitLt: its matmul quantizes the activations to int8 on CUDA (and on CPU in
    eval mode), and dequantizes the weight on CPU in train mode, so CPU runs neither carried over to CUDA nor
    evaluated what they trained. The price is a transient per call, forward and backward: the dequantized weight
    (out x in values of the input's dtype), freed when the matmul returns."""
    kind = "int8"

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.register_parameter("weight", None)  # set by quantize()
        self.register_parameter("bias", lin.bias)  # frozen, kept as it is
        self.train(lin.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Int8DequantLinear.apply(x, self.weight, self.weight.SCB, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def frozen_module(cls: type, lin: nn.Linear, kind: str, device: torch.device | str,
                  spill_dir: Path | None = None) -> nn.Module:
    """A frozen quantized linear of class `cls` (FrozenInt8Linear, or a Linear4bit with _Frozen) in `lin`'s place,
    its weight quantized from lin.weight (its full-precision copy, wherever it is) onto `device`; with `spill_dir`
    a state dict loaded into it is spilled there, not written into host RAM."""
    q = cls(lin) if kind == "int8" else quantized_module(cls, lin, kind, lin.weight.dtype)
    q.__dict__["lisa_full"] = lin.weight  # not registered: the model's parameters are the quantized ones
    # plain values, nothing of FrozenWeights: a reference from the model back there would be a cycle that keeps
    # every block alive after `del model, opt` until the garbage collector runs
    q.__dict__["lisa_device"] = torch.device(device)
    q.__dict__["lisa_spill"] = spill_dir
    q.quantize()
    return q


# Why FSDP2 cannot hold quantized frozen blocks (recipe/config.py refuses the pair before any model loads).
FSDP_FROZEN_WHY = ("bitsandbytes quantizes a whole plain weight, and FSDP2 holds each rank's shard of it as a "
                   "DTensor; use frozen_weights: full under distributed: fsdp")


class FrozenWeights:
    """The quantized frozen blocks of one LisaOptimizer (its `frozen_weights` attribute)."""

    def __init__(self, opt: LisaOptimizer, kind: str, device: torch.device | str | None = None,
                 spill_dir: str | os.PathLike | None = None):
        """`device`: where the blocks compute (default: where each weight is); `spill_dir`: a folder for the
        full-precision copies of blocks that trained (None: host RAM)."""
        self.kind = kind
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        sharded = next((n for b in opt.layers.blocks for n, p in b if hasattr(p, "to_local")), None)
        if sharded:
            raise LisaError(f"lisa.frozen_weights: {kind} does not support FSDP2 (sharded) parameters ({sharded}): "
                            f"{FSDP_FROZEN_WHY}")
        bnb = _bitsandbytes(kind)  # (refused here, before any block changes, when it is missing)
        self._cls = FrozenInt8Linear if kind == "int8" else \
            type("FrozenLinear4bit", (_Frozen, bnb.nn.Linear4bit), {"kind": "nf4"})
        self._device: dict[str, torch.device] = {}  # where each weight computes (default: where it is now)
        self._linears: list[list[tuple[nn.Module, str, nn.Linear, str]]] = []  # per block: parent, attr, linear
        path = opt.layers.blocks_path
        for i in range(opt.layers.n_blocks):
            entries = []
            for parent, attr, m, sub in quantizable_linears(opt.module.get_submodule(f"{path}.{i}")):
                name = f"{path}.{i}.{sub}.weight"
                entries.append((parent, attr, m, name))
                self._device[name] = torch.device(device) if device is not None else m.weight.device
            self._linears.append(entries)
        if not any(self._linears):  # e.g. GPT-2's Conv1D: quantizing nothing would silently save nothing
            kinds = sorted({type(m).__name__ for m in opt.module.get_submodule(f"{path}.0").modules()
                            if getattr(m, "weight", None) is not None and m.weight.dim() == 2})
            raise LisaError(f"lisa.frozen_weights: {kind} quantizes torch.nn.Linear layers, and the blocks "
                            f"({path}) have none (their weight layers: {', '.join(kinds) or 'none'}); "
                            f"use frozen_weights: full")
        self._quantized: set[int] = set()

    @property
    def host(self) -> dict[str, torch.Tensor]:
        """Parameter name -> the high-precision weight on the host: every frozen block's (the quantized module's
        full-precision copy), and an active block's where it trains on the host."""
        return {name: lin.weight.detach() for entries in self._linears for _, _, lin, name in entries
                if lin.weight.device.type == "cpu"}

    def quantized_blocks(self) -> list[int]:
        return sorted(self._quantized)

    def _freeze(self, i: int, trained: bool = True) -> None:
        weights = {name: lin.weight for _, _, lin, name in self._linears[i]}
        if self.spill_dir is not None and trained:  # the whole block in one file, one block at a time
            host = spill(self.spill_dir, weights, f"block{i}")
        else:
            host = {name: w.detach().to("cpu") for name, w in weights.items()}  # the same tensor on CPU
        for parent, attr, lin, name in self._linears[i]:
            lin.weight.data = host[name]  # the device copy is freed
            setattr(parent, attr, frozen_module(self._cls, lin, self.kind, self._device[name], self.spill_dir))
        self._quantized.add(i)

    def _activate(self, opt: LisaOptimizer, i: int) -> None:
        for parent, attr, lin, name in self._linears[i]:
            w = lin.weight
            w.data = self._trainable(w.data, self._device[name])  # from its host copy
            setattr(parent, attr, lin)
            # The engine made the master / restored parked state before this hook, from the host copy: follow it.
            m = opt.masters().get(name)
            if m is not None and m.device != w.device:
                m.data = m.data.to(w.device)
            st = opt.state.get(m if m is not None else w)
            if st:
                move_state(st, w.device)  # `step` stays where torch keeps it
        self._quantized.discard(i)

    def _trainable(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The tensor an active weight trains in: on the host its host copy itself, or, with a spill folder, a
        private copy of it (mapped pages written would stay private RAM while their mapping lives)."""
        return host.clone() if self.spill_dir is not None and device.type == "cpu" else host.to(device)

    def sync(self, opt: LisaOptimizer, first: bool = False) -> None:
        active = set(opt.active_blocks)
        for i in range(len(self._linears)):
            if i in active and i in self._quantized:
                self._activate(opt, i)
            elif i not in active and i not in self._quantized:
                self._freeze(i, trained=not first)  # at construction nothing has trained: nothing to spill
            elif first and i in active and self.spill_dir is not None:
                for _, _, lin, name in self._linears[i]:
                    if lin.weight.device.type == "cpu":
                        lin.weight.data = self._trainable(lin.weight.detach(), lin.weight.device)


def attach_frozen_weights(opt: LisaOptimizer, kind: str, device: torch.device | str | None = None,
                          spill_dir: str | os.PathLike | None = None) -> FrozenWeights:
    """Hold `opt`'s frozen blocks quantized from now on: synced at once, at every switch and after loading; with
    `device`, quantized straight onto it from wherever the weights are (the host), never whole there in full;
    with `spill_dir`, trained blocks' full-precision copies are mapped files there, not host RAM."""
    fw = FrozenWeights(opt, kind, device, spill_dir)
    fw.sync(opt, first=True)
    opt.register_switch_hook(fw.sync)
    return fw

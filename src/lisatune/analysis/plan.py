"""`lisatune plan`: the memory of one fine-tuning step, predicted without loading a weight, phase by phase.

The model is built from its config on the meta device (shapes and dtypes, no storage), prepared by the real
method (methods/: peft for LoRA, LisaAdamW for LISA), and one real forward and backward runs on meta token
ids. recipe/meter.py counts it exactly as `bench memory` counts a real run (tests/test_plan.py holds the two
equal on tiny models, per component and per phase):

* weights: unique storages of the parameters (LoRA: base + adapters, each in its dtype); linears held by
  bitsandbytes (LISA's frozen blocks with `frozen` int8 / nf4, QLoRA's base) at the bytes it stores, from
  quant/sizes.py (bitsandbytes itself is not needed to plan);
* gradients: unique storages of the .grad of every parameter after backward (the trainable ones);
* fp32 master weights (bf16-mixed only): 4 bytes per element of each trainable parameter not already fp32;
* optimizer state: AdamW's exp_avg and exp_avg_sq per trainable element (fp32 under bf16-mixed, else the
  parameter's dtype, as torch's AdamW allocates them) and its 4-byte `step` per tensor; with `eh_state` 8bit
  the always-on set's as bitsandbytes' AdamW8bit holds it; with LISA's `state_policy` keep, the state of every
  frozen block too (all of them visited: the most it holds);
* activations: unique storages saved for backward (saved_tensors_hooks), parameters excluded; with
  checkpointing, the blocks' inputs kept for recomputation; QLoRA's int8 base linears' inputs, which
  bitsandbytes' matmul keeps on its autograd context (LISA's frozen int8 linears keep none: they dequantize their
  weight per call, a transient of one linear's out x in values that forward+backward adds);
* loss: fused (lisatune's default) never forms the full logits: the decoder runs, then the head and the
  cross-entropy a chunk of tokens at a time (recipe/loss.py, the same function on meta). Counted: the gradient
  of the hidden states it forms in forward and holds until backward, and the label mask its index saves.
  Estimated from shapes: one chunk's logits (and its copies) and, when the head trains in bf16, the fp32
  accumulator of the head's gradient. standard: the model's own logits and loss (the logits' log-softmax is
  an activation, counted); estimated: the logits' gradient and the log-softmax's in backward;
* recompute (checkpointing on): what one block saves when backward recomputes it, counted on a
  forward without checkpointing (the largest block);
* DDP buckets (`world` > 1): DistributedDataParallel copies the trained gradients into its buckets
  (gradient_as_bucket_view off, torch's default and lisatune's): one more copy of them, held from the wrap on.

The phases, each its own figure (what torch.cuda.max_memory_allocated reads per phase, recipe/meter.PhaseMemory):

* static: between steps, after the first: weights + masters + optimizer state (+ DDP buckets). No gradients:
  zero_grad sets them to None.
* forward+backward: static + the most that forward and backward hold at once. Backward frees each block's
  saved tensors once it made the block's gradients, top block first, so the peak is the largest of: the end of
  forward (every activation, the loss, the head's gradient, formed there by the fused loss), each block's
  backward (the activations of the blocks below it and its own, every gradient made so far, the gradients of the
  hidden states entering and leaving it and, with eager attention, of its s x s weights; the block recomputed
  under checkpointing), and the end (every gradient).
  Each block's saved bytes are counted per block on the same meta forward.
* step: static + gradients + the step's transient. Under bf16-mixed (masters) the step walks the trained tensors
  in chunks (engine/masters.py, Masters.budget/pieces/chunks: consecutive tensors in group order while their fp32
  bytes stay within the budget, the largest trained tensor's fp32 size or `step_chunk` if smaller, a tensor over
  the budget in slices); for each chunk it holds an fp32 copy of the chunk's gradients and the optimizer's
  temporary for the chunk, then frees both: the transient is the largest chunk's, at most 8 bytes per element
  of the budget. The optimizer's temporary: torch's AdamW on CUDA (foreach) forms
  sqrt(exp_avg_sq) for every tensor of a group (within the chunk) at once, one moment of them; on CPU (`device`
  cpu) its single-tensor kernel holds sqrt(exp_avg_sq), its quotient by the bias correction and the previous
  tensor's quotient; AdamW8bit's fused blockwise kernel updates in place. Without masters: the temporary of the
  whole largest group.
* switch (LISA): the step's end, where the grads are still held; the switch frees the old active set's masters,
  state and gradients before it makes the new set's masters (state comes at the next step), so its peak is its
  start, static + gradients.

Peak = the largest phase. Beside it, never in it, the device allowance: the CUDA context, cuBLAS's workspaces and
the caching allocator's slack (named constants below, from public figures, to be calibrated from the first GPU
run); the total is the two together. Host memory is its own figure: the full-precision copies of quantized
frozen blocks (quant/frozen.py keeps one per block's linears on the host) and offloaded optimizer state, split
into private RAM (the copies of blocks that trained, offloaded state) and mapped pages (the never-trained
blocks' weights are the checkpoint's safetensors pages): _host_and_setup. The setup peak: the device while the
model arrives, blocks one at a time (quantized on arrival), beside the whole model moved in its dtype.

With `distributed` fsdp (FSDP2) and `world` N the figures are per rank (_per_rank): parameters, gradients,
masters and state sharded on dim 0, plus the unsharded transients of forward and backward; the sharded parts are
held equal to 3 gloo ranks (tests/test_plan_scale.py), the transients are estimated from the shapes.

Every position counts as labelled (the most loss memory); attention is a fused SDPA kernel by default (saves
query, key, value, output and a fp32 logsumexp per query and head, as the CUDA flash kernels and torch's CPU
flash kernel do) or the model's eager attention (saves the s x s weights).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from itertools import combinations
from pathlib import Path

import torch
import transformers.masking_utils as masking_utils
from huggingface_hub import try_to_load_from_cache
from torch import nn
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ..engine import Masters, find_layers
from ..engine.masters import ALIGN, CHUNK_BYTES
from ..engine.layers import decoder_of
from ..errors import LisaError
from ..methods import build_method
from ..quant.frozen import copy_bytes, private_copies, quantizable_linears
from ..quant.sizes import adamw8bit_state_bytes, quantized_linear_bytes
from ..recipe.loss import CHUNK_ELEMENTS, fused_loss, head_of, held_hidden_grads, standard_loss
from ..recipe.models import enable_checkpointing
from ..schema import parse_yaml
from ..recipe.meter import MIB, ActivationMeter, checkpointed_blocks, grad_bytes, unique_bytes, weight_bytes
from .shapes import SHAPES, shape_config

GIB = 2**30
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16}
METHODS = ("full", "lora", "lisa")
SPECS = ("full", "lora", "qlora", "lisa")  # qlora: lora with an nf4 base
WEIGHTS = ("full", "int8", "nf4")  # how quantizable linears are held: as they are, or by bitsandbytes
EH_STATES = ("fp32", "8bit")
STATE_POLICIES = ("drop", "keep", "offload")  # LISA: where a frozen block's optimizer state waits
STEP_CHUNK_KEY = "train.step_chunk_mib"  # the config key that sets the engine's Masters(chunk_bytes)
DISTRIBUTED = ("ddp", "fsdp")  # what `world` > 1 means: replicas with DDP buckets, or FSDP2 shards
DEVICES = ("cuda", "cpu")  # the step's AdamW kernel (foreach / single-tensor) and whether the allowance applies

# The device allowance: device memory a CUDA run holds beyond its tensors. Public figures, to be calibrated from
# the first GPU run: the context from torch.cuda.mem_get_info's used bytes minus the reserved, the slack from
# max_memory_reserved minus max_memory_allocated (benchmarks/gpu_check.py records both).
CUDA_CONTEXT = 512 * MIB  # CUDA context + the kernels loaded: ~700-800 MiB before lazy loading (PyTorch forums,
# "high GPU memory overhead"); lazy module loading, the default since CUDA 12.2 on Linux, loads only kernels used
CUBLAS_WORKSPACE = 2 * (32 * MIB + 8 * MIB + 128 * 1024)  # per cuBLAS handle on Hopper: the cuBLASLt workspace
# (32 MiB, pytorch#120925, NVIDIA's recommendation) and cuBLAS's CUBLAS_WORKSPACE_CONFIG :4096:2:16:8 (8.125 MiB);
# two handles: the main thread's (forward, step) and autograd's device thread's (backward). Allocated through the
# caching allocator: it shows in max_memory_allocated though it is no tensor of the model
ALLOCATOR_SLACK = 0.05  # of the tensor peak: reserved but unallocated blocks (rounding to 2 MiB blocks, split
# blocks that cannot merge); a placeholder, fragmentation can be far larger (pytorch#44742: 13 GB of split free
# blocks on a 32 GB card), which PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True reduces


def device_allowance(peak: int) -> int:
    """What a CUDA run needs beyond a tensor peak of `peak` bytes: context, cuBLAS workspaces, allocator slack."""
    return CUDA_CONTEXT + CUBLAS_WORKSPACE + int(ALLOCATOR_SLACK * peak)
SDPA = "lisatune_plan_fused"  # the fused-kernel attention the planner registers (no "sdpa" in the name: transformers
# refuses names with it for models without SDPA support, Gemma-2 among them)


def _sdpa_saves(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    # On meta, F.scaled_dot_product_attention dispatches to its math fallback, which saves the s x s weights no
    # GPU kernel keeps; torch's CPU flash kernel has a meta implementation and saves what the fused kernels
    # save (key and value unrepeated under GQA). Registered under its own name, transformers builds no mask
    # for it: the attention is causal (every causal LM here, one sequence per row).
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout, True,
                                                                         scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SDPA, _sdpa_saves)
ATTENTION = {"sdpa": SDPA, "eager": "eager"}


@contextmanager
def _no_packing_check():
    """transformers tests the position ids for packed sequences with a data-dependent branch (.item()), which
    meta tensors cannot take; the planner's rows are one sequence each, that test's answer (None)."""
    find = getattr(masking_utils, "find_packed_sequence_indices", None)
    if find is None:
        yield
        return
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = find


# -- what to plan ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    method: str = "lisa"  # full | lora | lisa
    precision: str = "fp32"  # fp32 | bf16 | bf16-mixed
    batch: int = 1
    seq: int = 1024
    checkpointing: bool = False
    loss: str = "fused"  # fused | standard
    attention: str = "sdpa"  # sdpa | eager
    lora_r: int = 16
    lora_base: str = "full"  # LoRA: the blocks' linears as they are, or int8 / nf4 (QLoRA), bitsandbytes
    gamma: int = 2  # LISA: active blocks (0: embedding + head only, planner-only; the engine needs >= 1)
    embed_head: bool = True  # LISA: the embedding and head train (always on), as in the paper
    eh_state: str = "fp32"  # LISA: the always-on set's AdamW state, fp32 or 8bit (lisa.embed_head_state)
    frozen: str = "full"  # LISA: frozen blocks' linears as they are, or int8 / nf4 (lisa.frozen_weights)
    state_policy: str = "drop"  # LISA: a frozen block's state dropped, kept on the device, or offloaded to the host
    world: int = 1  # DDP processes (data parallel: each holds everything, plus DDP's gradient buckets if > 1)
    device: str = "cuda"  # cuda: foreach AdamW, the device allowance; cpu: single-tensor AdamW, no allowance
    step_chunk: int | None = None  # bf16-mixed: the master step's byte cap (engine Masters(chunk_bytes)); None: none
    distributed: str = "ddp"  # with world > 1: ddp (each process holds everything) or fsdp (FSDP2: sharded 1/world)
    trained_blocks: int | None = None  # LISA, quantized frozen blocks: blocks trained so far (private host copies);
    # None: every block (a long run's steady state)
    spill: bool = False  # LISA, quantized frozen blocks: trained blocks' copies are mapped files (lisa.spill_dir)

    @property
    def label(self) -> str:
        if self.method == "lora":
            if self.lora_base == "nf4":
                return f"QLoRA r={self.lora_r}"
            return f"LoRA r={self.lora_r}" + ("" if self.lora_base == "full" else f" ({self.lora_base} base)")
        if self.method == "lisa":
            parts = (["E+H"] if self.embed_head else []) + ([f"{self.gamma}L"] if self.gamma else [])
            how = ([] if self.embed_head else ["E/H frozen"]) + (["8-bit E/H state"] if self.eh_state == "8bit"
                                                                 else [])
            how += [] if self.frozen == "full" else [f"{self.frozen} frozen blocks"]
            how += [] if self.state_policy == "drop" else [f"{self.state_policy} state"]
            how += ["spilled"] if self.spill else []
            return "LISA " + "+".join(parts) + (f" ({', '.join(how)})" if how else "")
        return self.method

    def check(self) -> "Setting":
        if self.method not in METHODS:
            raise LisaError(f"plan: method '{self.method}' is not one of {', '.join(METHODS)}")
        if self.precision not in PRECISIONS:
            raise LisaError(f"plan: precision '{self.precision}' is not one of {', '.join(PRECISIONS)}")
        if self.loss not in ("fused", "standard"):
            raise LisaError(f"plan: loss '{self.loss}' is not fused or standard")
        if self.attention not in ATTENTION:
            raise LisaError(f"plan: attention '{self.attention}' is not one of {', '.join(ATTENTION)}")
        if self.batch < 1 or self.seq < 2:
            raise LisaError(f"plan: batch {self.batch} x seq {self.seq}: need batch >= 1 and seq >= 2")
        if self.world < 1:
            raise LisaError(f"plan: world {self.world}: need >= 1 processes")
        if self.distributed not in DISTRIBUTED:
            raise LisaError(f"plan: distributed '{self.distributed}' is not one of {', '.join(DISTRIBUTED)}")
        if self.distributed == "fsdp":
            self._check_fsdp()
        if self.trained_blocks is not None and self.trained_blocks < 0:
            raise LisaError(f"plan: trained_blocks {self.trained_blocks}: need >= 0")
        if self.step_chunk is not None and self.step_chunk < 4 * ALIGN:
            raise LisaError(f"plan: step_chunk {self.step_chunk} bytes: need at least {4 * ALIGN}")
        if self.lora_r < 1 or self.gamma < 0:
            raise LisaError(f"plan: lora r={self.lora_r}, gamma={self.gamma}: need r >= 1 and gamma >= 0")
        if self.method == "lisa" and self.gamma == 0 and not self.embed_head:
            raise LisaError("plan: LISA with gamma 0 and the embedding/head frozen trains nothing but the norm")
        for name, value, valid in (("lora base", self.lora_base, WEIGHTS), ("eh_state", self.eh_state, EH_STATES),
                                   ("frozen", self.frozen, WEIGHTS), ("state_policy", self.state_policy,
                                                                      STATE_POLICIES), ("device", self.device, DEVICES)):
            if value not in valid:
                raise LisaError(f"plan: {name} '{value}' is not one of {', '.join(valid)}")
        if self.spill and (self.method != "lisa" or self.frozen == "full"):
            raise LisaError("plan: spill holds quantized frozen blocks' copies: it needs lisa with frozen=int8|nf4")
        if self.method == "lisa" and self.eh_state == "8bit" and not self.embed_head:
            raise LisaError("plan: eh_state=8bit is the state of the embedding and head, but embed_head=false "
                            "freezes them")
        return self

    def _check_fsdp(self) -> None:
        """What lisatune's FSDP2 (distributed/launch.py, recipe/config.py DISTRIBUTED) cannot shard: one line each."""
        why = None
        if self.world < 2:
            why = f"--world {self.world}: fsdp shards over 2 processes or more"
        elif self.method == "lora":
            why = "method lora: lisatune's fsdp trains lisa and full only"
        elif self.method == "lisa" and self.frozen != "full":
            why = (f"lisa.frozen_weights: {self.frozen}: bitsandbytes' quantized weights are no DTensors, FSDP2 "
                   "cannot shard them (one process, or distributed: ddp)")
        elif self.method == "lisa" and self.eh_state == "8bit":
            why = ("lisa.embed_head_state: 8bit: bitsandbytes' AdamW8bit steps plain tensors, not FSDP2's "
                   "DTensors (embed_head_state: fp32)")
        elif self.method == "full" and self.precision == "bf16-mixed":
            why = "train.precision: bf16-mixed under fsdp is built for method lisa only"
        if why:
            raise LisaError(f"plan: distributed fsdp: {why}")


_SPEC_KEYS = {"lora": {"r": "lora_r", "base": "lora_base"},
              "lisa": {"gamma": "gamma", "n_layers": "gamma", "embed_head": "embed_head", "eh_state": "eh_state",
                       "embed_head_state": "eh_state", "frozen": "frozen", "frozen_weights": "frozen",
                       "state_policy": "state_policy", "spill": "spill", "spill_dir": "spill"}}
_SPEC_TYPES = {"lora_r": (int, "an integer"), "gamma": (int, "an integer"), "embed_head": (bool, "true/false"),
               "lora_base": (str, "a name"), "eh_state": (str, "a name"), "frozen": (str, "a name"),
               "state_policy": (str, "a name"), "spill": (bool, "true/false")}


def parse_setting(spec: str, base: Setting) -> Setting:
    """"full", "lora", "lora:r=128", "lora:base=nf4" (= "qlora"), "lisa:gamma=4", "lisa:gamma=0,embed_head=false",
    "lisa:eh_state=8bit", "lisa:frozen=nf4", "lisa:state_policy=offload" over `base`."""
    name, _, rest = spec.partition(":")
    if name not in SPECS:
        raise LisaError(f"plan: method '{name}' is not one of {', '.join(SPECS)}")
    changes = {"method": "lora", "lora_base": "nf4"} if name == "qlora" else {"method": name}
    keys = _SPEC_KEYS.get(changes["method"], {})
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        field_name = keys.get(key.strip())
        if not eq or field_name is None:
            raise LisaError(f"plan: method spec '{spec}': '{item}' is not key=value with a key of {name} "
                            f"({', '.join(keys) or 'none'})")
        v = parse_yaml(value, f"method spec {spec!r}")
        kind, what = _SPEC_TYPES[field_name]
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise LisaError(f"plan: method spec '{spec}': {key} = {value!r} is not {what}")
        changes[field_name] = v
    return replace(base, **changes).check()


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as the Hugging Face Hub spells repositories


def _hub_cache() -> str:
    """The Hugging Face cache folder as huggingface_hub resolves it, read now (not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return os.path.join(os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"),
                        "hub")


def model_config_for(model: str | PretrainedConfig, revision: str | None = None) -> tuple[str, PretrainedConfig]:
    """(name, config) of a built-in shape, a model directory, a config.json, a Hub id whose config.json is in the
    Hugging Face cache (read offline: the planner never downloads), or a config object."""
    if isinstance(model, PretrainedConfig):
        return type(model).__name__.removesuffix("Config"), copy.deepcopy(model)
    cfg = shape_config(model)
    if cfg is not None:
        return next(k for k in SHAPES if k.lower() == model.lower()), cfg
    path, name = Path(model).expanduser(), None
    if not path.exists() and _HUB_ID.fullmatch(model):
        cached = try_to_load_from_cache(model, "config.json", cache_dir=_hub_cache(), revision=revision)
        if not isinstance(cached, str):
            raise LisaError(f"plan: model '{model}' is not a built-in shape and its config.json is not in the "
                            f"Hugging Face cache ({_hub_cache()}): download it first (hf download {model} "
                            "config.json), or give a model directory or a config.json")
        path, name = Path(cached).parent, model
    if path.is_dir() and (path / "config.json").is_file() or path.is_file() and path.suffix == ".json":
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as e:
            raise LisaError(f"plan: {model} is not a transformers config ({str(e).strip().splitlines()[0]})") from None
        return name or (path.name if path.is_dir() else path.parent.name or path.name), config
    raise LisaError(f"plan: model '{model}' is not a built-in shape ({', '.join(SHAPES)}), "
                    "a model directory with a config.json, a config.json file or a Hub id in the Hugging Face cache")


# -- one plan -------------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    label: str
    setting: dict
    params: int  # the model's own parameters (LoRA's adapters not included)
    trainable: int  # parameters with a gradient in the step
    weights: int
    grads: int
    masters: int
    state: int  # LISA keep: the frozen blocks' kept state included
    activations: int
    loss_held: int  # counted: the fused loss' gradient of the hidden states
    loss_transient: int  # estimated from shapes: chunk logits, logits' gradient, fp32 head accumulator
    recompute: int  # checkpointing: one block's saved tensors while backward recomputes it
    step_transient: int = 0  # the optimizer step's: the largest chunk's fp32 grads + the optimizer's temporary
    buckets: int = 0  # DDP (world > 1): its buckets, one copy of the trained gradients
    static: int = 0  # between steps: weights + masters + state + buckets
    fwd_bwd: int = 0  # forward+backward: static + activations + grads + loss + recompute (an upper bound)
    step: int = 0  # the optimizer step: static + grads + step_transient
    switch: int = 0  # LISA's switch: its start, static + grads (0: no switch)
    allowance: int = 0  # device allowance (CUDA context, cuBLAS workspaces, allocator slack): beside the peak
    host_frozen: int = 0  # host: full-precision copies of quantized frozen blocks' linears (private + mapped)
    host_offload: int = 0  # host RAM: offloaded optimizer state of the frozen blocks
    host_private: int = 0  # host RAM the run needs: trained blocks' own copies, converted copies, offloaded state
    host_mapped: int = 0  # the checkpoint's file pages never-trained blocks' copies are (reclaimable, not RAM)
    setup: int = 0  # device peak while the model is set up, blocks moved one at a time (quantized on arrival)
    setup_whole: int = 0  # the same if the whole model first moves to the device in its dtype
    gathered: int = 0  # FSDP2: unsharded transients of forward+backward (root, two blocks, their gradients)
    ideal: int = 0  # masters + state an ideal AdamW holds for the trained set: a master and two moments per value
    active: str = ""  # LISA: the active set planned
    notes: list[str] = field(default_factory=list)

    @property
    def state_ratio(self) -> float | None:
        """(masters + optimizer state) / the ideal for the trained set: step counters and 8-bit scales above 1."""
        return (self.masters + self.state) / self.ideal if self.ideal else None

    @property
    def loss(self) -> int:
        return self.loss_held + self.loss_transient

    @property
    def counted(self) -> int:
        """What `bench memory` counts for a real run: weights + grads + masters + state + activations."""
        return self.weights + self.grads + self.masters + self.state + self.activations

    @property
    def peak(self) -> int:
        """The tensor peak: the largest phase (the device allowance not included)."""
        return max(self.fwd_bwd, self.step, self.switch)

    @property
    def total(self) -> int:
        """The tensor peak plus the device allowance: what the device must hold."""
        return self.peak + self.allowance

    @property
    def host(self) -> int:
        """Host memory the run touches: private RAM and mapped file pages (the frozen copies + offloaded state)."""
        return self.host_frozen + self.host_offload

    def to_dict(self) -> dict:
        return {**asdict(self), "loss": self.loss, "counted": self.counted, "peak": self.peak, "total": self.total,
                "host": self.host, "state_ratio": self.state_ratio}


def _build(config: PretrainedConfig, s: Setting) -> nn.Module:
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=PRECISIONS[s.precision],
                                                     attn_implementation=ATTENTION[s.attention])
    except (ValueError, KeyError, TypeError) as e:
        raise LisaError(f"plan: cannot build a causal LM from {type(config).__name__} "
                        f"({str(e).strip().splitlines()[0]})") from None
    if s.checkpointing:
        enable_checkpointing(model)
    return model.train()  # HF checkpoints blocks only in train mode; dropout saves its masks as in training


@dataclass
class _Prepared:
    model: nn.Module
    groups: list[list[nn.Parameter]]  # trainable parameters by torch AdamW group (foreach steps each at once)
    eight_bit: list[nn.Parameter]  # trainable parameters bitsandbytes' AdamW8bit steps (LISA's always-on set)
    quantized: list[nn.Linear]  # linears bitsandbytes holds quantized (s.frozen / s.lora_base): full on meta
    active: str = ""  # LISA: the active set planned
    ordered: list[list[nn.Parameter]] = field(default_factory=list)  # every group, in the optimizer's order
    n8: int = 0  # the first n8 of `ordered` are stepped by AdamW8bit
    frozen_blocks: list[nn.Module] = field(default_factory=list)  # LISA: the blocks not active


def _blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.get_submodule(find_layers(model).blocks_path))


def _prepare(model: nn.Module, s: Setting) -> _Prepared:
    """The prepared model, its trainable parameters by optimizer, the linears held quantized and (LISA) the
    active set planned. On meta the quantized linears stay as they are (bitsandbytes cannot quantize there):
    their bytes come from quant/sizes.py, and what their matmul keeps from ActivationMeter's keeps_input."""
    active, frozen_blocks = "", []
    # QLoRA: the base's linears are quantized before peft wraps them (the same modules become its base layers)
    quantized = [lin for b in _blocks(model) for _, _, lin, _ in quantizable_linears(b)] \
        if s.method == "lora" and s.lora_base != "full" else []
    if s.method == "lisa":
        n = find_layers(model).n_blocks
        if s.gamma > n:
            raise LisaError(f"plan: gamma {s.gamma} exceeds the model's {n} blocks")
        g = max(s.gamma, 1)
        # The lowest γ blocks: backward then runs through every block (the most activations); gradients and
        # state are the same for any γ blocks of a uniform stack.
        opts = {"n_layers": g, "interval": 1, "policy": "weighted", "probabilities": [1.0] * g + [0.0] * (n - g),
                "train_embedding": s.embed_head, "train_head": s.embed_head}
        method = build_method("lisa", opts)
    else:
        method = build_method(s.method, {"r": s.lora_r} if s.method == "lora" else None)
    model = method.prepare(model)
    log = logging.getLogger("lisatune")
    level = log.level
    log.setLevel(logging.WARNING)  # LisaAdamW logs its switch; a plan is not a run
    try:
        opt = method.optimizer(model, lr=1e-5)
    finally:
        log.setLevel(level)
    if s.method == "lisa":
        lm = opt.layers
        if s.gamma == 0:  # E+H only: the engine needs γ >= 1, so its one block is frozen again here
            for _, p in lm.blocks[0]:
                p.requires_grad_(False)
        parts = (["embedding", "head"] if s.embed_head else []) + (["final norm"] if lm.norm else [])
        if s.gamma:
            blocks = "block 0" if s.gamma == 1 else f"blocks 0-{s.gamma - 1}"
            parts.insert(0, f"{blocks} (the lowest: backward runs through every block)")
        active = " + ".join(parts) + ("" if s.gamma else " (no block)")
        frozen_blocks = _blocks(model)[s.gamma:]  # every block but the γ lowest
        if s.frozen != "full":
            quantized = [lin for b in frozen_blocks for _, _, lin, _ in quantizable_linears(b)]
    groups = [[p for p in g["params"] if p.requires_grad] for g in opt.param_groups]
    # 8-bit always-on state: groups 0 and 1 are stepped by AdamW8bit (engine/optim.py), the rest by AdamW
    n8 = 2 if s.method == "lisa" and s.eh_state == "8bit" else 0
    return _Prepared(model, [g for g in groups[n8:] if g], [p for g in groups[:n8] for p in g], quantized, active,
                     groups, n8, frozen_blocks)


def _loss_transient(model: nn.Module, s: Setting, fused: bool, head_trains: bool) -> int:
    """Bytes the loss allocates for a moment beyond what the step holds (estimated from the shapes)."""
    head = head_of(model)
    vocab, hidden = (head.weight.shape if head is not None else (model.config.vocab_size, 0))
    low = PRECISIONS[s.precision] != torch.float32
    if fused:
        n = min(max(1, CHUNK_ELEMENTS // vocab), s.batch * (s.seq - 1))  # rows per chunk
        chunk = n * vocab * 4 + (n * vocab * 2 if low else 0)  # fp32 logits (softmax in place), its bf16 copy
        if head_trains and low:  # p.T.float(), hc.float() and the fp32 accumulator of the head's gradient
            chunk += n * vocab * 4 + n * hidden * 4 + vocab * hidden * 4
        return chunk
    tokens = s.batch * s.seq  # backward: the nll's and the log-softmax's gradients (fp32), its bf16 cast
    return tokens * vocab * (8 + (2 if low else 0))


def _forward(model: nn.Module, s: Setting, fused: bool, meter: ActivationMeter) -> torch.Tensor:
    ids = torch.zeros(s.batch, s.seq, dtype=torch.long, device="meta")
    with _no_packing_check(), meter:
        if fused:
            value = fused_loss(model, ids, None, ids)
            # a real run selects the labelled positions with a boolean index, which saves the mask
            meter.add(torch.empty(s.batch, s.seq - 1, dtype=torch.bool, device="meta"))
        else:
            value = standard_loss(model, ids, None, ids)
    return value


@contextmanager
def _saved_by_block(blocks: list[nn.Module], meter: ActivationMeter):
    """Yields a list that, after the forward, holds what `meter` counted from each block's entry to the next's
    (the last: to its exit): each block's saved tensors (with checkpointing: its input)."""
    marks: list[int] = []
    handles = [b.register_forward_pre_hook(lambda *_: marks.append(meter.bytes)) for b in blocks]
    handles.append(blocks[-1].register_forward_hook(lambda *_: marks.append(meter.bytes)))
    by_block: list[int] = []
    try:
        yield by_block
    finally:
        for h in handles:
            h.remove()
    by_block += [b - a for a, b in zip(marks, marks[1:])]


def _fwd_bwd_peak(m: nn.Module, activations: int, by_block: list[int], loss_held: int, loss_transient: int,
                  recompute: int, flow: int, with_grads: bool = True) -> int:
    """The tensors forward and backward add to the static part at their peak. Backward frees each block's saved
    tensors after it made that block's gradients, top block first: the peak is at the end of forward (every
    activation, the loss, the head's gradient), at some block (with `flow`, the gradients of the hidden states
    entering and leaving it, and with checkpointing the block recomputed), or at the end (every gradient)."""
    blocks = _blocks(m)
    inside = {id(p) for b in blocks for p in b.parameters()}
    embeds = {id(e.weight) for e in m.modules() if isinstance(e, nn.Embedding)} - \
        ({id(head_of(m).weight)} if head_of(m) is not None else set())
    grads = {id(p): p.grad.numel() * p.grad.element_size() if with_grads else 0
             for p in m.parameters() if p.grad is not None}
    outside = [i for i in grads if i not in inside]
    top = sum(grads[i] for i in outside if i not in embeds)  # the head and final norm: their grads come first
    bottom = sum(grads[i] for i in outside if i in embeds)  # the input embeddings: last
    per_block = [sum(grads.get(id(p), 0) for p in {id(p): p for p in b.parameters()}.values()) for b in blocks]
    held = activations - sum(by_block)  # saved outside the blocks (embedding, final norm, loss): kept throughout
    peak = activations + loss_held + loss_transient + top
    below, made = sum(by_block), top
    for k in reversed(range(len(blocks))):  # block k's backward begins: its gradients are still to come
        peak = max(peak, held + below + made + recompute + flow + (loss_held if k == len(blocks) - 1 else 0))
        made += per_block[k]
        below -= by_block[k]
    return max(peak, held + made + bottom)


def _adamw_temporary(sizes: list[int], device: str) -> int:
    """The bytes torch's AdamW allocates beyond its state while it steps tensors (or slices) of one moment's
    `sizes` bytes each, of one group, at once."""
    if not sizes:
        return 0
    if device == "cuda":  # foreach: sqrt(exp_avg_sq) of every tensor, then divided and added to in place
        return sum(sizes)
    # single-tensor: sqrt(exp_avg_sq) and its quotient by the bias correction, while the previous tensor's
    # quotient (`denom`) is still bound
    return max(2 * m + prev for m, prev in zip(sizes, [0] + sizes[:-1]))


def _step_transient(prep: _Prepared, moment: dict[int, int], device: str, chunked: bool,
                    cap: int | None = None, slices: bool = True) -> int:
    """The optimizer step's transient. chunked (fp32 masters): engine/masters.py's chunks of Masters.budget
    (the largest trained tensor's fp32 size, or `cap` if smaller; a tensor over it in slices: AdamW and AdamW8bit
    are elementwise), each with the fp32 copy of its gradients and the optimizer's temporary for its tensors;
    else the largest group's temporary."""
    def temporary(groups: dict[int, list[int]]) -> int:  # one optimizer.step() over `groups` (moment bytes)
        return max((_adamw_temporary(sizes, device) for i, sizes in groups.items() if i >= prep.n8), default=0)

    if not chunked:
        return temporary({i: [moment[id(p)] for p in g] for i, g in enumerate(prep.ordered)})
    tensors = [(i, p) for i, g in enumerate(prep.ordered) for p in g]
    budget = Masters.budget(tensors, cap)
    worst = 0
    for chunk in Masters.chunks(Masters.pieces(tensors, budget, lambda i, p: slices), budget):
        groups: dict[int, list[int]] = {}
        for i, p, a, b in chunk:
            groups.setdefault(i, []).append(moment[id(p)] * (b - a) // p.numel())
        worst = max(worst, sum(4 * (b - a) for _, _, a, b in chunk) + temporary(groups))
    return worst


def plan_memory(model: str | PretrainedConfig, setting: Setting) -> MemoryPlan:
    """Predict one training step's memory for `setting` on `model` (a shape name, directory, config.json or
    config), phase by phase, running the real forward and backward on the meta device."""
    s = setting.check()
    notes = []
    if s.distributed == "fsdp" and s.loss == "fused":  # recipe/config.py DISTRIBUTED: fsdp has no fused loss
        s = replace(s, loss="standard")
        notes.append("fsdp: the model's own logits and loss (lisatune's fused loss needs an unsharded head)")
    _, config = model_config_for(model)
    prep = _prepare(_build(config, s), s)
    m, groups = prep.model, prep.groups
    trainable = list({id(p): p for g in groups + [prep.eight_bit] for p in g}.values())
    kind = s.frozen if s.method == "lisa" else s.lora_base
    # QLoRA's int8 base is bitsandbytes' Linear8bitLt, whose matmul keeps its input (meter.py); LISA's frozen int8
    # linears (quant/frozen.py FrozenInt8Linear) keep nothing but dequantize their weight for each call
    keeps = prep.quantized if kind == "int8" and s.method == "lora" else []
    dequant = max((q.out_features * q.in_features * PRECISIONS[s.precision].itemsize for q in prep.quantized),
                  default=0) if kind == "int8" and s.method == "lisa" else 0
    fused = s.loss == "fused" and head_of(m) is not None and decoder_of(m) is not None
    if s.loss == "fused" and not fused:
        notes.append("no plain Linear head behind get_decoder(): the model's own loss is planned")
    head = head_of(m)
    head_trains = head is not None and head.weight.requires_grad

    recompute = 0
    blocks = checkpointed_blocks(m) if s.checkpointing else []
    if blocks:  # what backward's recomputation of one block saves: a forward without checkpointing, per block
        for b in blocks:
            b.gradient_checkpointing = False
        per = ActivationMeter(m, meta=True, per_block=blocks, keeps_input=keeps)
        _forward(m, s, fused, per)
        recompute = max(per.by_block)
        for b in blocks:
            b.gradient_checkpointing = True

    meter = ActivationMeter(m, blocks, meta=True, keeps_input=keeps)
    with _saved_by_block(_blocks(m), meter) as by_block:
        value = _forward(m, s, fused, meter)
    loss_held = unique_bytes(held_hidden_grads(value), meta=True) if fused else 0  # no reference kept
    value.backward()
    mixed = s.precision == "bf16-mixed"
    masters = sum(4 * p.numel() for p in trainable if mixed and p.dtype != torch.float32)
    moment = {id(p): p.numel() * (4 if mixed else p.element_size()) for p in trainable}
    adam = [p for g in groups for p in g]
    # AdamW: exp_avg and exp_avg_sq (on the fp32 masters under bf16-mixed) and a 4-byte step per tensor
    state = sum(2 * moment[id(p)] + 4 for p in adam) + adamw8bit_state_bytes(p.numel() for p in prep.eight_bit)
    # the least any AdamW holds for the trained set: a master (bf16-mixed) and two moments per value, nothing else
    ideal = masters + sum(2 * moment[id(p)] for p in adam) + sum(2 * p.numel() for p in prep.eight_bit)
    # LISA's frozen blocks' state, once each was active: kept on the device or offloaded to the host
    parked = sum(2 * p.numel() * (4 if mixed else p.element_size()) + 4
                 for b in prep.frozen_blocks for p in b.parameters()) if s.method == "lisa" else 0
    kept, offloaded = (parked if s.state_policy == "keep" else 0), (parked if s.state_policy == "offload" else 0)
    state += kept
    # FSDP2's masters are DTensors, which the engine steps whole (Masters: no slices of a DTensor)
    step_transient = _step_transient(prep, moment, s.device, chunked=masters > 0, cap=s.step_chunk,
                                     slices=s.distributed != "fsdp")
    # quantized linears: bitsandbytes' bytes in place of the meta model's full-precision weights
    weights = (weight_bytes(m, meta=True) - unique_bytes([q.weight for q in prep.quantized], meta=True)
               + sum(quantized_linear_bytes(q.out_features, q.in_features, kind) for q in prep.quantized))
    # quant/frozen.py keeps every block's linears in full precision on the host (an active block's copy too,
    # refreshed when it freezes)
    host_frozen = unique_bytes([lin.weight for b in _blocks(m) for _, _, lin, _ in quantizable_linears(b)],
                               meta=True) if s.method == "lisa" and s.frozen != "full" else 0
    grads = grad_bytes(m, meta=True)
    buckets = grads if s.world > 1 and s.distributed == "ddp" else 0
    static = weights + masters + state + buckets
    loss_transient = _loss_transient(m, s, fused, head_trains)
    hidden = getattr(m.config, "hidden_size", None) or m.get_input_embeddings().weight.shape[1]
    size = PRECISIONS[s.precision].itemsize
    flow = 2 * s.batch * s.seq * hidden * size
    if s.attention == "eager":  # the gradient of the s x s attention weights, formed in each block's backward
        flow += s.batch * m.config.num_attention_heads * s.seq * s.seq * size
    fwd_bwd = static + _fwd_bwd_peak(m, meter.bytes, by_block, loss_held, loss_transient, recompute, flow) + dequant
    step = static + grads + step_transient
    own = sum(p.numel() for n, p in m.named_parameters() if "lora_" not in n)
    plan = MemoryPlan(label=s.label, setting=asdict(s), params=own, trainable=sum(p.numel() for p in trainable),
                      weights=weights, grads=grads, masters=masters, state=state, activations=meter.bytes,
                      loss_held=loss_held, loss_transient=loss_transient, recompute=recompute,
                      step_transient=step_transient, buckets=buckets, static=static, fwd_bwd=fwd_bwd, step=step,
                      switch=static + grads if s.method == "lisa" else 0, host_frozen=host_frozen,
                      host_offload=offloaded, ideal=ideal, active=prep.active, notes=notes)
    _host_and_setup(plan, m, prep, s)
    if s.distributed == "fsdp":
        _per_rank(plan, m, prep, s, moment, _fwd_bwd_peak(m, meter.bytes, by_block, loss_held, loss_transient,
                                                           recompute, flow, with_grads=False))
    plan.allowance = device_allowance(plan.peak) if s.device == "cuda" else 0
    return plan


def _host_and_setup(plan: MemoryPlan, m: nn.Module, prep: _Prepared, s: Setting) -> None:
    """Host memory, private and mapped, and the device's setup peak.

    quant/frozen.py keeps a full-precision copy of every quantized block's linears on the host. A block that never
    trained needs no copy of its own: with the model loaded on the host (transformers maps the safetensors files)
    its weights are the checkpoint's mapped pages, which the kernel can drop and re-read (not RAM the run needs).
    A block that trained holds its own copy (private), refreshed when it freezes: `trained_blocks` of them
    (default every block, a long run's steady state; γ after the first interval). With a spill folder
    (lisa.spill_dir) a block that trained is a mapped file when it freezes: private are at most γ + 1 blocks (on
    the host an active block trains a private copy; a freezing block is written out one at a time). Assumed: the
    checkpoint is stored in the model's dtype; an fp32 run from a bf16 checkpoint converts every copy (private)."""
    blocks = _blocks(m)
    copies = sorted((copy_bytes(b) for b in blocks), reverse=True) if plan.host_frozen else []
    trained = len(copies) if s.trained_blocks is None or s.precision == "fp32" else s.trained_blocks
    if s.precision != "fp32":  # (fp32 from a bf16 checkpoint: every copy converted, spilled or not)
        trained = private_copies(trained, s.gamma, s.spill)
    trained = min(trained, len(copies))
    private = sum(copies[:trained])
    plan.host_private = private + plan.host_offload
    plan.host_mapped = plan.host_frozen - private
    # setup: every block arrives in full precision and is quantized there (if frozen), one block at a time
    largest = max((copy_bytes(b) for b in blocks), default=0) if prep.quantized else 0
    plan.setup = plan.weights + largest
    plan.setup_whole = weight_bytes(m, meta=True)


def _local(p: torch.Tensor, world: int) -> int:
    """Elements of FSDP2's shard of `p` on one rank: dim 0 split in `world` rows blocks, the last padded."""
    if p.ndim == 0:
        return p.numel()
    return -(-p.shape[0] // world) * (p.numel() // p.shape[0])


def _per_rank(plan: MemoryPlan, m: nn.Module, prep: _Prepared, s: Setting, moment: dict[int, int],
              activity: int) -> None:
    """FSDP2 (`fully_shard` on every block and on the root, as distributed/fsdp.py does), per rank: parameters,
    gradients, masters and state sharded on dim 0 (padded to `world` equal rows blocks); forward and backward
    hold the root's parameters unsharded (FSDP2 does not reshard the root after forward) and two blocks' (the
    one computing and the one prefetched), each block's unsharded gradients until its reduce-scatter, the root's
    until the end of backward; the master step chunks the shards (DTensors are not sliced: each chunk is 1/world
    of the one-process chunk). An estimate from the shapes: no multi-GPU run has measured it."""
    n = s.world
    params = list({id(p): p for p in m.parameters()}.values())
    trained = [p for p in params if p.grad is not None]
    frac = {id(p): _local(p, n) / p.numel() for p in params}
    plan.weights = sum(int(_local(p, n) * p.element_size()) for p in params)
    plan.grads = sum(int(_local(p, n) * p.grad.element_size()) for p in trained)
    plan.masters = sum(4 * _local(p, n) for p in trained) if plan.masters else 0
    plan.state = sum(int(2 * moment[id(p)] * frac[id(p)]) + 4 for p in trained)  # (8-bit E/H: refused)
    if s.method == "lisa" and s.state_policy != "drop":  # the frozen blocks' state, sharded the same
        parked = sum(int(2 * _local(p, n) * (4 if s.precision == "bf16-mixed" else p.element_size())) + 4
                     for b in prep.frozen_blocks for p in b.parameters())
        if s.state_policy == "keep":
            plan.state += parked
        else:
            plan.host_offload = plan.host_private = parked
    plan.static = plan.weights + plan.masters + plan.state
    blocks = _blocks(m)
    inside = {id(p) for b in blocks for p in b.parameters()}
    root = sum(p.numel() * p.element_size() for p in params if id(p) not in inside)
    per_block = [sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks]
    block_grads = max((sum(p.grad.numel() * p.grad.element_size() for p in b.parameters() if p.grad is not None)
                       for b in blocks), default=0)
    root_grads = sum(p.grad.numel() * p.grad.element_size() for p in trained if id(p) not in inside)
    plan.gathered = root + 2 * max(per_block, default=0) + block_grads + root_grads
    plan.fwd_bwd = plan.static + plan.grads + activity + plan.gathered
    plan.step_transient = -(-plan.step_transient // n)
    plan.step = plan.static + plan.grads + plan.step_transient
    plan.switch = plan.static + plan.grads if s.method == "lisa" else 0
    plan.setup = plan.weights + max(per_block, default=0)  # a block whole while it is sharded onto the device
    plan.setup_whole = plan.setup
    plan.notes.append("FSDP2 per rank: parameters, gradients, masters and state sharded; forward+backward adds the "
                      "root's parameters unsharded, two blocks' (one computing, one prefetched) and the "
                      "unsharded gradients of a block and of the root (estimated from the shapes)")


# -- fitting a GPU --------------------------------------------------------------------------------
_UNITS = {"": GIB, "g": GIB, "gb": GIB, "gib": GIB, "m": MIB, "mb": MIB, "mib": MIB, "t": 2**40, "tb": 2**40,
          "tib": 2**40}


def parse_size(text: str, what: str = "--gpu", zero: bool = False) -> int:
    """"24GB", "80GiB", "40960MiB", "24" (GiB) -> bytes. GPU memory is sized in binary units: a 24 GB card
    holds 24 GiB, so GB and GiB mean the same here."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and _UNITS.get(m.group(2).lower())
    if not unit or (float(m.group(1)) <= 0 and not zero):
        raise LisaError(f"{what} '{text}' is not a memory size (e.g. 24GB, 80GiB, 40960MiB)")
    return int(float(m.group(1)) * unit)


def _levers(s: Setting) -> list[tuple[str, dict]]:
    """Single changes that lower memory, most usual first, each named by the config keys that make it."""
    out = []
    if s.precision == "bf16-mixed" and s.step_chunk is None:  # no cost but a few more kernel launches
        out.append((f"{STEP_CHUNK_KEY}: {CHUNK_BYTES // MIB}", {"step_chunk": CHUNK_BYTES}))
    if not s.checkpointing:
        out.append(("model.gradient_checkpointing: true", {"checkpointing": True}))
    if s.loss == "standard":
        out.append(("train.fused_loss: true", {"loss": "fused"}))
    if s.attention == "eager":
        out.append(("model.attn_implementation: sdpa", {"attention": "sdpa"}))
    if s.method == "lisa" and s.embed_head and s.gamma > 0:
        out.append(("lisa.train_embedding: false, lisa.train_head: false", {"embed_head": False}))
    if s.method == "lisa" and s.embed_head and s.eh_state == "fp32":
        out.append(("lisa.embed_head_state: 8bit", {"eh_state": "8bit"}))
    if s.method == "lisa" and s.frozen != "nf4":
        out.append(("lisa.frozen_weights: nf4", {"frozen": "nf4"}))
    if s.method == "lisa" and s.state_policy == "keep":
        out.append(("lisa.state_policy: drop", {"state_policy": "drop"}))
    if s.method == "lora" and s.lora_base != "nf4":
        out.append(("lora.base: nf4 (QLoRA)", {"lora_base": "nf4"}))
    if s.method == "lisa" and s.gamma > 1:
        out.append(("lisa.n_layers: 1", {"gamma": 1}))
    if s.precision == "fp32":
        out.append(("train.precision: bf16-mixed", {"precision": "bf16-mixed"}))
    elif s.precision == "bf16-mixed":
        out.append(("model.dtype: bf16, train.precision: fp32 (AdamW state in bf16, no fp32 masters)",
                    {"precision": "bf16"}))
    return out


def alternatives(model: str | PretrainedConfig, s: Setting, budget: int, cache: dict | None = None,
                 max_plans: int = 24, reserve: int | None = None) -> list[tuple[str, MemoryPlan]]:
    """Changes to `s` under which the planner predicts a total (tensor peak + device allowance, or + `reserve`
    when given) within `budget` bytes: each single lever that fits; if none, pairs, then all levers together;
    then the largest smaller batch that fits (alone and with all levers). At most `max_plans` plans are computed."""
    cache = {} if cache is None else cache

    def run(ch: dict) -> MemoryPlan:
        key = tuple(sorted(ch.items()))
        if key not in cache:
            cache[key] = plan_memory(model, replace(s, **ch))
        return cache[key]

    def fits(p: MemoryPlan) -> bool:
        return p.peak + (p.allowance if reserve is None else reserve) <= budget

    def valid(ch: dict) -> bool:  # e.g. 8-bit E/H state with E/H frozen is no setting
        try:
            replace(s, **ch).check()
            return True
        except LisaError:
            return False

    levers = _levers(s)
    found: list[tuple[str, MemoryPlan]] = []
    for k in (1, 2):
        for combo in combinations(levers, k):
            if len(cache) >= max_plans:
                break
            ch = {kk: v for _, c in combo for kk, v in c.items()}
            if not valid(ch):
                continue
            p = run(ch)
            if fits(p):
                found.append(("; ".join(d for d, _ in combo), p))
        if found:
            return found
    # all levers together (the first of two that exclude each other)
    every, descs = {}, []
    for d, c in levers:
        if valid({**every, **c}):
            every.update(c)
            descs.append(d)
    levers = [(d, c) for d, c in levers if d in descs]
    if len(levers) > 2 and fits(run(every)):
        return [("; ".join(d for d, _ in levers), run(every))]
    for base, desc in ([({}, "")] + ([(every, "; ".join(d for d, _ in levers))] if levers else [])):
        b = s.batch // 2
        while b >= 1 and len(cache) < max_plans:
            p = run({**base, "batch": b})
            if fits(p):
                found.append(((desc + "; " if desc else "") + f"train.batch_size: {b}", p))
                break
            b //= 2
        if found:
            break
    return found


# -- output ---------------------------------------------------------------------------------------
def _size(v: int, unit: int) -> str:
    return f"{v / unit:,.2f}" if unit == GIB else f"{v / unit:,.1f}"


def _gib(v: int) -> str:
    unit, name = (GIB, "GiB") if v >= GIB or v == 0 else (MIB, "MiB")
    return f"{v / unit:g} {name}" if v % unit == 0 else f"{v / unit:,.2f} {name}"


def _setting_line(name: str, params: int, s: Setting) -> str:
    ddp = (f", {'FSDP2' if s.distributed == 'fsdp' else 'DDP'} over {s.world} processes (per process)"
           if s.world > 1 else "")
    if s.step_chunk is not None and s.precision == "bf16-mixed":
        ddp = f", master step in {_gib(s.step_chunk)} chunks" + ddp
    return (f"{name} ({params / 1e9:.2f}B params): batch {s.batch} x {s.seq} tokens, {s.precision}, "
            f"checkpointing {'on' if s.checkpointing else 'off'}, {s.loss} loss, {s.attention} attention, "
            f"{s.device}{ddp}")


def markdown(name: str, plans: list[MemoryPlan], budget: int | None = None, reserve: int | None = None,
             alts: dict[str, list[tuple[str, MemoryPlan]]] | None = None) -> str:
    """One table, a row per method, in GiB (MiB if every total is under 1 GiB): the parts, the phases, the tensor
    peak, the device allowance beside it (or the --reserve held back), the total, and host memory."""
    unit = GIB if max(p.total for p in plans) >= GIB else MIB
    u = "GiB" if unit == GIB else "MiB"
    base = Setting(**{k: v for k, v in plans[0].setting.items()})
    host = any(p.host for p in plans)
    ddp = any(p.buckets for p in plans)
    allow = "reserve" if reserve is not None else "device allowance"
    lines = [f"### {_setting_line(name, plans[0].params, base)}", ""]
    fit = f" | fits {_gib(budget)}?" if budget else ""
    lines += [f"| method | trainable params | weights | grads | fp32 masters | optimizer state | activations | "
              f"loss | recompute | {'DDP buckets | ' if ddp else ''}static | fwd+bwd | step | switch | "
              f"**peak {u}** | {allow} | **total** | {'host RAM | host mapped | ' if host else ''}".rstrip(" |")
              + f"{fit} |", "|---|" + "---:|" * (15 + ddp + 2 * host) + ("---|" if budget else "")]
    for p in plans:
        extra = reserve if reserve is not None else p.allowance
        cells = [p.weights, p.grads, p.masters, p.state, p.activations, p.loss, p.recompute] + \
            ([p.buckets] if ddp else []) + [p.static, p.fwd_bwd, p.step]
        row = [_size(c, unit) for c in cells] + [_size(p.switch, unit) if p.switch else "–",
                                                 f"**{_size(p.peak, unit)}**", _size(extra, unit),
                                                 f"**{_size(p.peak + extra, unit)}**"]
        row += [_size(p.host_private, unit), _size(p.host_mapped, unit)] if host else []
        ok = ""
        if budget:
            ok = " | yes" if p.peak + extra <= budget else " | **no**"
        lines.append(f"| {p.label} | {p.trainable / 1e6:,.1f}M | " + " | ".join(row) + f"{ok} |")
    notes = [n for p in plans for n in p.notes] + [f"{p.label}: active {p.active}" for p in plans if p.active]
    if reserve is None and any(p.allowance for p in plans):
        notes.append(f"device allowance = CUDA context {_gib(CUDA_CONTEXT)} + cuBLAS workspaces "
                     f"{_gib(CUBLAS_WORKSPACE)} + allocator slack {ALLOCATOR_SLACK:.0%} of the peak (public "
                     "figures, to be calibrated on a GPU); total = peak + allowance")
    elif reserve is not None:
        notes.append(f"--reserve {_gib(reserve)} held back in place of the device allowance")
    if host:
        trained = {Setting(**p.setting).trained_blocks for p in plans if p.host_frozen}
        who = ("every block" if trained in ({None}, set()) else
               ", ".join("every block" if t is None else str(t) for t in sorted(trained, key=lambda t: t or 1e9)))
        notes.append(f"host RAM (private, what the run needs): the own copies of quantized blocks that trained "
                     f"(assumed: {who}, --trained-blocks; with spill=true at most γ + 1, the rest mapped files of "
                     f"lisa.spill_dir) and offloaded optimizer state; host mapped: the "
                     "never-trained blocks' linears, the checkpoint's safetensors pages (reclaimable file pages); "
                     "the runtime itself (python, torch, CUDA libraries) not included")
    for p in plans:
        if p.setup_whole > p.setup:
            notes.append(f"{p.label}: setup peak {_gib(p.setup)} with blocks moved one at a time and quantized on "
                         f"arrival; {_gib(p.setup_whole)} if the whole model first moves in its dtype")
    if ddp:
        notes.append("DDP buckets: one copy of the trained gradients per process (gradient_as_bucket_view off)")
    notes = list(dict.fromkeys(notes))
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    held = "reserved" if reserve is not None else "allowance"
    for label, found in (alts or {}).items():
        p = next(p for p in plans if p.label == label)
        extra = reserve if reserve is not None else p.allowance
        if found:
            lines += ["", f"{label} does not fit {_gib(budget)} (peak + {_gib(extra)} {held}); it would with:"]
            lines += [f"- {d}: peak {q.peak / GIB:,.2f} GiB, total "
                      f"{(q.peak + (reserve if reserve is not None else q.allowance)) / GIB:,.2f} GiB"
                      for d, q in found]
        else:
            s = Setting(**p.setting)
            if p.weights > budget:
                lines += ["", f"{label} does not fit {_gib(budget)}: its weights alone take {_gib(p.weights)} "
                              "(shard them, e.g. FSDP, or quantize)."]
                continue
            tried = [d for d, _ in _levers(s)] + (["a smaller train.batch_size"] if s.batch > 1 else [])
            lines += ["", f"{label} does not fit {_gib(budget)} with any change the planner tries (tried: "
                          f"{'; '.join(tried) or 'nothing to try'}{' and their combinations' if len(tried) > 1 else ''})."]
    return "\n".join(lines) + "\n"


def run_plan(model: str, specs: list[str], base: Setting, gpu: str | None = None,
             reserve: str | None = None) -> dict:
    """Plans for every method spec; with `gpu`, whether each fits (tensor peak + device allowance, or + `reserve`
    when given: a fixed size held back in its place, as before the allowance) and, if not, the alternatives."""
    name, config = model_config_for(model)
    budget = parse_size(gpu) if gpu else None
    res = parse_size(reserve, "--reserve", zero=True) if reserve is not None else None
    settings = [parse_setting(spec, base) for spec in specs]
    plans = [plan_memory(config, s) for s in settings]
    alts = {}
    if budget:
        if res is not None and res >= budget:
            raise LisaError(f"--reserve {reserve} leaves nothing of --gpu {gpu}")
        for s, p in zip(settings, plans):
            if p.peak + (p.allowance if res is None else res) > budget:
                # only a lower precision or quantization shrinks the weights: else no lever helps if they overflow
                shrink = s.precision == "fp32" or any("frozen" in c or "lora_base" in c for _, c in _levers(s))
                hopeless = p.weights > budget and not shrink
                alts[p.label] = [] if hopeless else alternatives(config, s, budget, reserve=res)
    return {"model": name, "plans": plans, "budget": budget, "reserve": res, "alternatives": alts,
            "markdown": markdown(name, plans, budget, res, alts)}


def to_json(r: dict) -> str:
    return json.dumps({"model": r["model"], "gpu_bytes": r["budget"], "reserve_bytes": r["reserve"],
                       "allowance": {"cuda_context": CUDA_CONTEXT, "cublas_workspace": CUBLAS_WORKSPACE,
                                     "allocator_slack": ALLOCATOR_SLACK},
                       "plans": [p.to_dict() for p in r["plans"]],
                       "alternatives": {k: [{"change": d, **p.to_dict()} for d, p in v]
                                        for k, v in r["alternatives"].items()}}, indent=1)

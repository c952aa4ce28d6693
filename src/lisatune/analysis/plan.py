"""`lisatune plan`: the memory of one fine-tuning step, predicted without loading a weight.

The model is built from its config on the meta device (shapes and dtypes, no storage), prepared by the real
method (methods/: peft for LoRA, LisaAdamW for LISA), and one real forward and backward runs on meta token
ids. meter.py counts it exactly as `bench memory` counts a real run (tests/test_plan.py holds the two equal
on tiny models):

* weights: unique storages of the parameters (LoRA: base + adapters, each in its dtype); linears held by
  bitsandbytes (LISA's frozen blocks with `frozen` int8 / nf4, QLoRA's base) at the bytes it stores, from
  quant/sizes.py (bitsandbytes itself is not needed to plan);
* gradients: unique storages of the .grad of every parameter after backward (the trainable ones);
* fp32 master weights (bf16-mixed only): 4 bytes per element of each trainable parameter not already fp32;
* optimizer state: AdamW's exp_avg and exp_avg_sq per trainable element (fp32 under bf16-mixed, else the
  parameter's dtype, as torch's AdamW allocates them) and its 4-byte `step` per tensor; with `eh_state` 8bit
  the always-on set's as bitsandbytes' AdamW8bit holds it;
* activations: unique storages saved for backward (saved_tensors_hooks), parameters excluded; with
  checkpointing, the blocks' inputs kept for recomputation; int8 linears' inputs, which bitsandbytes' matmul
  keeps on its autograd context;
* loss: fused (lisatune's default) never forms the full logits: the decoder runs, then the head and the
  cross-entropy a chunk of tokens at a time (recipe/loss.py, the same function on meta). Counted: the gradient
  of the hidden states it forms in forward and holds until backward, and the label mask its index saves.
  Estimated from shapes: one chunk's logits (and its copies) and, when the head trains in bf16, the fp32
  accumulator of the head's gradient. standard: the model's own logits and loss (the logits' log-softmax is
  an activation, counted); estimated: the logits' gradient and the log-softmax's in backward;
* recompute (checkpointing on): what one block saves when backward recomputes it, counted on a
  forward without checkpointing (the largest block).

* optimizer step (estimated): torch's AdamW on CUDA (foreach) forms sqrt(exp_avg_sq) for a whole parameter
  group at once: one moment of the largest group, held with every gradient after the activations are gone.

Predicted peak = the larger of forward/backward = weights + grads + masters + state + activations + loss +
recompute (everything at once: an upper bound, since backward frees activations while it makes gradients)
and the optimizer step = weights + grads + masters + state + its temporary. Not included: the CUDA context,
the allocator's cache and fragmentation (see --reserve), kernels' workspaces, and fp32 copies of the
gradients that some mixed-precision frameworks keep (4 more bytes per trainable parameter).

Every position counts as labelled (the most loss memory); attention is a fused SDPA kernel by default (saves
query, key, value, output and a fp32 logsumexp per query and head, as the CUDA flash kernels and torch's CPU
flash kernel do) or the model's eager attention (saves the s x s weights).
"""
from __future__ import annotations

import copy
import json
import logging
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from itertools import combinations
from pathlib import Path

import torch
import transformers.masking_utils as masking_utils
from torch import nn
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ..engine import find_layers
from ..engine.layers import decoder_of
from ..errors import LisaError
from ..methods import build_method
from ..quant.frozen import quantizable_linears
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
SDPA = "lisatune_plan_sdpa"  # the fused-kernel attention the planner registers with transformers


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
        if self.lora_r < 1 or self.gamma < 0:
            raise LisaError(f"plan: lora r={self.lora_r}, gamma={self.gamma}: need r >= 1 and gamma >= 0")
        if self.method == "lisa" and self.gamma == 0 and not self.embed_head:
            raise LisaError("plan: LISA with gamma 0 and the embedding/head frozen trains nothing but the norm")
        for name, value, valid in (("lora base", self.lora_base, WEIGHTS), ("eh_state", self.eh_state, EH_STATES),
                                   ("frozen", self.frozen, WEIGHTS)):
            if value not in valid:
                raise LisaError(f"plan: {name} '{value}' is not one of {', '.join(valid)}")
        if self.method == "lisa" and self.eh_state == "8bit" and not self.embed_head:
            raise LisaError("plan: eh_state=8bit is the state of the embedding and head, but embed_head=false "
                            "freezes them")
        return self


_SPEC_KEYS = {"lora": {"r": "lora_r", "base": "lora_base"},
              "lisa": {"gamma": "gamma", "n_layers": "gamma", "embed_head": "embed_head", "eh_state": "eh_state",
                       "embed_head_state": "eh_state", "frozen": "frozen", "frozen_weights": "frozen"}}
_SPEC_TYPES = {"lora_r": (int, "an integer"), "gamma": (int, "an integer"), "embed_head": (bool, "true/false"),
               "lora_base": (str, "a name"), "eh_state": (str, "a name"), "frozen": (str, "a name")}


def parse_method(spec: str, base: Setting) -> Setting:
    """"full", "lora", "lora:r=128", "lora:base=nf4" (= "qlora"), "lisa:gamma=4", "lisa:gamma=0,embed_head=false",
    "lisa:eh_state=8bit", "lisa:frozen=nf4" over `base`."""
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


def load_config(model: str | PretrainedConfig) -> tuple[str, PretrainedConfig]:
    """(name, config) of a built-in shape, a model directory, a config.json, or a config object."""
    if isinstance(model, PretrainedConfig):
        return type(model).__name__.removesuffix("Config"), copy.deepcopy(model)
    cfg = shape_config(model)
    if cfg is not None:
        return next(k for k in SHAPES if k.lower() == model.lower()), cfg
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file() or path.is_file() and path.suffix == ".json":
        try:
            return path.name if path.is_dir() else path.parent.name or path.name, AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as e:
            raise LisaError(f"plan: {model} is not a transformers config ({str(e).strip().splitlines()[0]})") from None
    raise LisaError(f"plan: model '{model}' is not a built-in shape ({', '.join(SHAPES)}), "
                    "a model directory with a config.json, or a config.json file")


# -- one plan -------------------------------------------------------------------------------------
@dataclass
class Plan:
    label: str
    setting: dict
    params: int  # the model's own parameters (LoRA's adapters not included)
    trainable: int  # parameters with a gradient in the step
    weights: int
    grads: int
    masters: int
    state: int
    activations: int
    loss_held: int  # counted: the fused loss' gradient of the hidden states
    loss_transient: int  # estimated from shapes: chunk logits, logits' gradient, fp32 head accumulator
    recompute: int  # checkpointing: one block's saved tensors while backward recomputes it
    step_temp: int = 0  # estimated: AdamW's (foreach) temporary in the optimizer step, one moment of a group
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
    def step_peak(self) -> int:
        """The optimizer step: activations freed, every gradient and the step's temporary held."""
        return self.weights + self.grads + self.masters + self.state + self.step_temp

    @property
    def peak(self) -> int:
        """The larger of forward/backward (everything counted at once: an upper bound) and the step."""
        return max(self.counted + self.loss + self.recompute, self.step_peak)

    def to_dict(self) -> dict:
        return {**asdict(self), "loss": self.loss, "counted": self.counted, "step_peak": self.step_peak,
                "peak": self.peak, "state_ratio": self.state_ratio}


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


def _blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.get_submodule(find_layers(model).blocks_path))


def _prepare(model: nn.Module, s: Setting) -> _Prepared:
    """The prepared model, its trainable parameters by optimizer, the linears held quantized and (LISA) the
    active set planned. On meta the quantized linears stay as they are (bitsandbytes cannot quantize there):
    their bytes come from quant/sizes.py, and what their matmul keeps from ActivationMeter's keeps_input."""
    active = ""
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
        if s.frozen != "full":  # every block but the γ lowest
            quantized = [lin for b in _blocks(model)[s.gamma:] for _, _, lin, _ in quantizable_linears(b)]
    groups = [[p for p in g["params"] if p.requires_grad] for g in opt.param_groups]
    # 8-bit always-on state: groups 0 and 1 are stepped by AdamW8bit (engine/optim.py), the rest by AdamW
    n8 = 2 if s.method == "lisa" and s.eh_state == "8bit" else 0
    return _Prepared(model, [g for g in groups[n8:] if g], [p for g in groups[:n8] for p in g], quantized, active)


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


def plan_memory(model: str | PretrainedConfig, setting: Setting) -> Plan:
    """Predict one training step's memory for `setting` on `model` (a shape name, directory, config.json or
    config), running the real forward and backward on the meta device."""
    s = setting.check()
    _, config = load_config(model)
    prep = _prepare(_build(config, s), s)
    m, groups = prep.model, prep.groups
    trainable = list({id(p): p for g in groups + [prep.eight_bit] for p in g}.values())
    kind = s.frozen if s.method == "lisa" else s.lora_base
    keeps = prep.quantized if kind == "int8" else []  # bitsandbytes' int8 matmul keeps its input (meter.py)
    notes = []
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
    # torch's AdamW on CUDA (foreach) forms sqrt(exp_avg_sq) for a whole parameter group at once; AdamW8bit's
    # fused blockwise kernel updates in place
    step_temp = max((sum(moment[id(p)] for p in g) for g in groups), default=0)
    # quantized linears: bitsandbytes' bytes in place of the meta model's full-precision weights
    weights = (weight_bytes(m, meta=True) - unique_bytes([q.weight for q in prep.quantized], meta=True)
               + sum(quantized_linear_bytes(q.out_features, q.in_features, kind) for q in prep.quantized))
    own = sum(p.numel() for n, p in m.named_parameters() if "lora_" not in n)
    return Plan(label=s.label, setting=asdict(s), params=own,
                trainable=sum(p.numel() for p in trainable), weights=weights,
                grads=grad_bytes(m, meta=True), masters=masters, state=state, activations=meter.bytes,
                loss_held=loss_held, loss_transient=_loss_transient(m, s, fused, head_trains),
                recompute=recompute, step_temp=step_temp, ideal=ideal, active=prep.active, notes=notes)


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
    """Single changes that lower memory, most usual first."""
    out = []
    if not s.checkpointing:
        out.append(("checkpointing on", {"checkpointing": True}))
    if s.loss == "standard":
        out.append(("fused loss", {"loss": "fused"}))
    if s.attention == "eager":
        out.append(("sdpa attention", {"attention": "sdpa"}))
    if s.method == "lisa" and s.embed_head and s.gamma > 0:
        out.append(("E/H frozen", {"embed_head": False}))
    if s.method == "lisa" and s.embed_head and s.eh_state == "fp32":
        out.append(("8-bit E/H state", {"eh_state": "8bit"}))
    if s.method == "lisa" and s.frozen != "nf4":
        out.append(("nf4 frozen blocks", {"frozen": "nf4"}))
    if s.method == "lora" and s.lora_base != "nf4":
        out.append(("QLoRA (nf4 base)", {"lora_base": "nf4"}))
    if s.method == "lisa" and s.gamma > 1:
        out.append(("gamma 1", {"gamma": 1}))
    if s.precision == "fp32":
        out.append(("bf16-mixed", {"precision": "bf16-mixed"}))
    elif s.precision == "bf16-mixed":
        out.append(("bf16 (AdamW state in bf16, no fp32 masters)", {"precision": "bf16"}))
    return out


def alternatives(model: str | PretrainedConfig, s: Setting, budget: int, cache: dict | None = None,
                 max_plans: int = 24) -> list[tuple[str, Plan]]:
    """Changes to `s` under which the planner predicts a peak within `budget` bytes: each single lever that
    fits; if none, pairs, then all levers together; then the largest smaller batch that fits (alone and with
    all levers). At most `max_plans` plans are computed."""
    cache = {} if cache is None else cache

    def run(ch: dict) -> Plan:
        key = tuple(sorted(ch.items()))
        if key not in cache:
            cache[key] = plan_memory(model, replace(s, **ch))
        return cache[key]

    def valid(ch: dict) -> bool:  # e.g. 8-bit E/H state with E/H frozen is no setting
        try:
            replace(s, **ch).check()
            return True
        except LisaError:
            return False

    levers = _levers(s)
    found: list[tuple[str, Plan]] = []
    for k in (1, 2):
        for combo in combinations(levers, k):
            if len(cache) >= max_plans:
                break
            ch = {kk: v for _, c in combo for kk, v in c.items()}
            if not valid(ch):
                continue
            p = run(ch)
            if p.peak <= budget:
                found.append((", ".join(d for d, _ in combo), p))
        if found:
            return found
    # all levers together (the first of two that exclude each other)
    every, descs = {}, []
    for d, c in levers:
        if valid({**every, **c}):
            every.update(c)
            descs.append(d)
    levers = [(d, c) for d, c in levers if d in descs]
    if len(levers) > 2 and run(every).peak <= budget:
        return [(", ".join(d for d, _ in levers), run(every))]
    for base, desc in ([({}, "")] + ([(every, ", ".join(d for d, _ in levers))] if levers else [])):
        b = s.batch // 2
        while b >= 1 and len(cache) < max_plans:
            p = run({**base, "batch": b})
            if p.peak <= budget:
                found.append(((desc + ", " if desc else "") + f"batch {b}", p))
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
    return (f"{name} ({params / 1e9:.2f}B params): batch {s.batch} x {s.seq} tokens, {s.precision}, "
            f"checkpointing {'on' if s.checkpointing else 'off'}, {s.loss} loss, {s.attention} attention")


def markdown(name: str, plans: list[Plan], budget: int | None = None, reserve: int = 0,
             alts: dict[str, list[tuple[str, Plan]]] | None = None) -> str:
    """One table, a row per method, in GiB (MiB if every peak is under 1 GiB)."""
    unit = GIB if max(p.peak for p in plans) >= GIB else MIB
    u = "GiB" if unit == GIB else "MiB"
    base = Setting(**{k: v for k, v in plans[0].setting.items()})
    lines = [f"### {_setting_line(name, plans[0].params, base)}", ""]
    fit = f" | fits {_gib(budget)}?" if budget else ""
    lines += [f"| method | trainable params | weights | grads | fp32 masters | optimizer state | activations | "
              f"loss | recompute | fwd+bwd | step | **peak {u}**{fit} |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if budget else "")]
    for p in plans:
        cells = [p.weights, p.grads, p.masters, p.state, p.activations, p.loss, p.recompute,
                 p.counted + p.loss + p.recompute, p.step_peak]
        ok = ""
        if budget:
            ok = " | yes" if p.peak + reserve <= budget else " | **no**"
        lines.append(f"| {p.label} | {p.trainable / 1e6:,.1f}M | " + " | ".join(_size(c, unit) for c in cells)
                     + f" | **{_size(p.peak, unit)}**{ok} |")
    notes = list(dict.fromkeys([n for p in plans for n in p.notes] + [f"{p.label}: active {p.active}"
                                                                        for p in plans if p.active]))
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    for label, found in (alts or {}).items():
        if found:
            lines += ["", f"{label} does not fit {_gib(budget)} ({_gib(reserve)} reserved); it would with:"]
            lines += [f"- {d}: peak {p.peak / GIB:,.2f} GiB" for d, p in found]
        else:
            p = next(p for p in plans if p.label == label)
            s = Setting(**p.setting)
            if p.weights > budget:
                lines += ["", f"{label} does not fit {_gib(budget)}: its weights alone take {_gib(p.weights)} "
                              "(shard them, e.g. FSDP, or quantize)."]
                continue
            tried = [d for d, _ in _levers(s)] + (["a smaller batch"] if s.batch > 1 else [])
            lines += ["", f"{label} does not fit {_gib(budget)} with any change the planner tries (tried: "
                          f"{', '.join(tried) or 'nothing to try'}{' and their combinations' if len(tried) > 1 else ''})."]
    return "\n".join(lines) + "\n"


def run_plan(model: str, specs: list[str], base: Setting, gpu: str | None = None, reserve: str = "1GiB") -> dict:
    """Plans for every method spec; with `gpu`, whether each fits and, if not, the alternatives that do."""
    name, config = load_config(model)
    budget = parse_size(gpu) if gpu else None
    res = parse_size(reserve, "--reserve", zero=True) if gpu else 0
    settings = [parse_method(spec, base) for spec in specs]
    plans = [plan_memory(config, s) for s in settings]
    alts = {}
    if budget:
        if res >= budget:
            raise LisaError(f"--reserve {reserve} leaves nothing of --gpu {gpu}")
        for s, p in zip(settings, plans):
            if p.peak + res > budget:
                # only a lower precision or quantization shrinks the weights: else no lever helps if they overflow
                shrink = s.precision == "fp32" or any("frozen" in c or "lora_base" in c for _, c in _levers(s))
                hopeless = p.weights > budget and not shrink
                alts[p.label] = [] if hopeless else alternatives(config, s, budget - res)
    return {"model": name, "plans": plans, "budget": budget, "reserve": res, "alternatives": alts,
            "markdown": markdown(name, plans, budget, res, alts)}


def to_json(r: dict) -> str:
    return json.dumps({"model": r["model"], "gpu_bytes": r["budget"], "reserve_bytes": r["reserve"],
                       "plans": [p.to_dict() for p in r["plans"]],
                       "alternatives": {k: [{"change": d, **p.to_dict()} for d, p in v]
                                        for k, v in r["alternatives"].items()}}, indent=1)

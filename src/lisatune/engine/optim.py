"""LisaOptimizer: Layerwise Importance Sampled AdamW as a real torch optimizer (the engine's core).

It owns its parameter groups. Every `interval` optimizer steps it samples a new active set of units, freezes
the rest (requires_grad=False, grad=None), puts only the active parameters in the inner optimizer's groups, and
parks the optimizer state of the units it froze. Its position in the sampling sequence travels in
`state_dict()`, so any framework that checkpoints optimizers resumes it. Each concern is a part of its own:

    units.py    what is sampled (blocks or modules) and what always trains; γ checked against the model
    groups.py   the fixed group layout, the lr multipliers and warm-up, the 8-bit always-on optimizer
    masters.py  fp32 master weights of a bf16 model and the chunked master step
    parking.py  the state of frozen units (drop / offload / keep)
    sampling.py the active set of each interval

Mixed precision (`master_weights=True`, for a bf16 model): fp32 masters, and so fp32 optimizer state, exist only
for the parameters trained now. A block's masters are made when it activates and freed when it freezes; the
inner optimizer's groups and state hold the masters. The masters of the active set travel in state_dict(), so a
resume continues bitwise; a block that activates again starts from its bf16 weight (the fp32 low bits of an
earlier interval are gone, by design: that is the memory saved).

Whatever must happen at a switch beyond this (quantizing frozen blocks, the distributed rank check, re-wrapping
DDP) is a hook registered on the instance by whoever built or wrapped it (register_switch_hook).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.utils.hooks import RemovableHandle

from ..errors import LisaError
from .groups import (ALWAYS, SAMPLED, WARMING, assign, build_inner, decay_groups, embed_head_8bit, hyperparameters,
                     layout, optimizer_class, warmup)
from .layers import find_layers, unwrap
from .masters import Masters, check_master_weights
from .options import LisaConfig
from .parking import Parking, held_bytes, move_state, tensor_bytes
from .sampling import Sampler
from .units import build_units

log = logging.getLogger("lisatune")

# What a checkpoint written before an option existed means by its absence.
META_DEFAULTS = {"units": "block", "embed_head_lr": None, "activation_warmup": 0, "master_weights": False,
                 "embed_head_state": "fp32"}


def reject_peft(model: nn.Module) -> None:
    lora = next((n for n, _ in model.named_parameters() if "lora_" in n), None)
    if lora or type(model).__name__.startswith("Peft"):
        raise LisaError(
            "LISA trains the base weights of sampled layers and cannot be combined with a PEFT/LoRA "
            f"model (found {lora or type(model).__name__}); pass the plain model or merge the adapter first"
        )


def reshard(model: nn.Module) -> None:
    """Register FSDP2's sharded parameters again where a unit is unsharded now. FSDP2 reshards its root unit in
    backward, so a forward without grad (an evaluation, a probe) leaves the root's parameters as the gathered full
    tensors: an optimizer built on them steps copies that are never written back (the run diverges)."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class LisaOptimizer(torch.optim.Optimizer):
    """LISA over any inner torch optimizer (AdamW by default).

    >>> opt = LisaOptimizer(model, n_layers=2, interval=20, lr=1e-5)
    """

    holds: tuple[str, ...] = ("full",)  # the kinds of lisa.frozen_weights this class implements

    def __init__(self, model: nn.Module, config: LisaConfig | None = None, *, lr: float = 1e-5,
                 weight_decay: float = 0.0, betas: tuple[float, float] | None = None, eps: float | None = None,
                 optimizer_cls: str | type = "adamw", optimizer_kwargs: dict | None = None,
                 master_weights: bool = False, step_chunk_bytes: int | None = None, **options: Any):
        if config is None:
            config = LisaConfig.build(**options)
        elif options:
            config = type(config).build(**{**config.model_dump(), **options})
        if config.frozen_weights not in self.holds:
            raise LisaError(f"lisa.frozen_weights: {config.frozen_weights} is held by LisaAdamW; {type(self).__name__} "
                            "holds weights as they are (frozen_weights: full)")
        model = unwrap(model)
        reject_peft(model)
        reshard(model)
        self.module = model
        self.config = cfg = config
        self.layers = find_layers(model, cfg.blocks_path)
        self.units = units = build_units(self.layers, cfg)
        # Where masters, parked state and quantized weights are made; a model moved since is caught at step().
        self._probe = next(n for n, _ in model.named_parameters())
        self._device = model.get_parameter(self._probe).device
        self.sampler = Sampler(len(units), cfg.n_layers, cfg.policy, cfg.probability_list(), cfg.seed)
        check_master_weights(master_weights, units.trainable())
        self.master_weights = master_weights
        self._masters = Masters(step_chunk_bytes)  # the master step's cap on fp32 bytes (None: the largest tensor)
        self._parking = Parking(cfg.state_policy)
        self._order = {id(p): i for i, (_, p) in enumerate(model.named_parameters())}
        self._name = {id(p): n for n, p in model.named_parameters()}
        self._param = {n: p for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.inner = None  # (no state to restore yet: _unfreeze only sets requires_grad and makes masters)
        for _, p in units.always:
            self._unfreeze(p)

        kw = hyperparameters(lr, weight_decay, betas, eps, optimizer_kwargs)
        inner_groups, always_groups = layout(cfg, list(self._split([p for _, p in units.always])), kw["lr"])
        self.inner = build_inner(optimizer_class(optimizer_cls), inner_groups, kw)
        sharded = next((n for n, p in units.always if hasattr(p, "to_local")), None)
        self.embed_head_optimizer = (embed_head_8bit(cfg, optimizer_cls, always_groups, self.inner.defaults, sharded)
                                     if cfg.embed_head_state == "8bit" else None)
        super().__init__(self.inner.param_groups, self.inner.defaults)
        self._alias()
        self._sealed = True

        self._step = 0
        self._active: tuple[int, ...] = ()
        self.history: list[dict] = []
        self._switch_hooks: OrderedDict[int, Callable] = OrderedDict()  # weak-referenceable, for handles
        self._switch_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._switch(0)

    # -- the algorithm ---------------------------------------------------------------
    def step(self, closure: Callable | None = None):
        moved = self.module.get_parameter(self._probe).device
        if moved != self._device:
            raise LisaError(f"the model moved to {moved} after LisaAdamW was built on {self._device}: "
                            "build the optimizer after model.to(device)")
        with warmup(self.param_groups, self.config, self._step):
            if self.master_weights or self.embed_head_optimizer is not None:
                loss = None
                if closure is not None:  # the grads must exist before they are cast into the masters
                    with torch.enable_grad():
                        loss = closure()
                if self.master_weights:
                    self._masters.step(self.param_groups, self._step_inner)
                else:
                    self._step_inner()
            else:
                loss = self.inner.step(closure)
        self._step += 1
        held = self.state_bytes()
        if held > self.history[-1]["state_bytes"]:
            self.history[-1]["state_bytes"] = held
        if self._step % self.config.interval == 0:
            for hook in list(self._switch_pre_hooks.values()):
                hook(self)
            self._switch(self._step // self.config.interval)
        return loss

    def _step_inner(self) -> None:
        self.inner.step()
        if self.embed_head_optimizer is not None:
            self.embed_head_optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)
        if self.embed_head_optimizer is not None:
            self.embed_head_optimizer.zero_grad(set_to_none=set_to_none)
        self._masters.zero_grad(set_to_none)  # the inner optimizer holds the masters; the grads are on the weights

    def _switch(self, switch: int) -> None:
        peak = self.history[-1]["state_bytes"] if self.history else 0
        self._apply(self.sampler.active(switch), self._active)
        entry = {"switch": switch, "step": self._step, "active": list(self._active),
                 "trainable_params": self.trainable_parameters(), "state_bytes": self.state_bytes()}
        if self.master_weights:
            entry["master_bytes"] = self.master_bytes()  # constant over the interval: made at the switch
        self.history.append(entry)
        log.info("LISA switch %d at step %d: active %s, %s trainable params%s", switch, self._step,
                 ", ".join(self.active_names), f"{entry['trainable_params']:,}",
                 f" (optimizer state peaked at {peak / 2**20:.1f} MiB in the previous interval)" if switch else "",
                 extra={"lisa_switch": switch})
        self._switched()

    def _switched(self) -> None:
        for hook in list(self._switch_hooks.values()):
            hook(self)

    def register_switch_hook(self, hook: Callable[["LisaOptimizer"], None]) -> RemovableHandle:
        """Call hook(optimizer) after each switch and load_state_dict (e.g. to re-wrap DDP). The first switch
        happens at construction: a hook that must see it too calls itself once when registered."""
        handle = RemovableHandle(self._switch_hooks)
        self._switch_hooks[handle.id] = hook
        return handle

    def register_switch_pre_hook(self, hook: Callable[["LisaOptimizer"], None]) -> RemovableHandle:
        """Call hook(optimizer) in step() just before each switch (e.g. to attribute its memory: the switch frees
        and makes state, masters and quantized weights)."""
        handle = RemovableHandle(self._switch_pre_hooks)
        self._switch_pre_hooks[handle.id] = hook
        return handle

    def _apply(self, target: tuple[int, ...], before: tuple[int, ...]) -> None:
        """Make `target` the active set; `before` is the previous switch's (which of target is newly activated)."""
        old, new = self.units.of(self._active), self.units.of(target)
        for i, p in old.items():
            if i not in new:
                self._freeze(p)
        for i, p in new.items():
            if i not in old:
                self._unfreeze(p)
        self._active = tuple(target)
        warm = len(self.param_groups) > WARMING
        prev = self.units.of(before) if warm else new
        assign(self.param_groups, SAMPLED, *self._split([p for i, p in new.items() if i in prev]))
        assign(self.param_groups, WARMING, *self._split([p for i, p in new.items() if i not in prev]))

    def _stepped(self, p: nn.Parameter) -> torch.Tensor:
        """The tensor the inner optimizer steps for the model's parameter p: its master, or p itself."""
        return self._masters.of[self._name[id(p)]] if self.master_weights else p

    def _freeze(self, p: nn.Parameter) -> None:
        p.requires_grad_(False)
        p.grad = None
        name = self._name[id(p)]
        state = self.inner.state.pop(self._stepped(p), None)
        if self.master_weights:
            self._masters.remove(name)
        self._parking.park(name, state)

    def _unfreeze(self, p: nn.Parameter) -> None:
        p.requires_grad_(True)
        name = self._name[id(p)]
        t = self._masters.add(name, p) if self.master_weights else p
        state = self._parking.restore(name, t)
        if state:
            self.inner.state[t] = state

    def _split(self, params: list[nn.Parameter]) -> tuple[list, list]:
        """The tensors to step for `params` (masters or the params), in model order, with decay / without."""
        decay, no_decay = decay_groups(sorted(params, key=lambda p: self._order[id(p)]))
        return [self._stepped(p) for p in decay["params"]], [self._stepped(p) for p in no_decay["params"]]

    def _alias(self) -> None:
        self.param_groups = self.inner.param_groups
        if self.embed_head_optimizer is not None:  # groups 0, 1 are the 8-bit optimizer's (the inner's are empty)
            self.param_groups = [*self.embed_head_optimizer.param_groups, *self.inner.param_groups[ALWAYS + 2:]]
        self.state = self.inner.state

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_sealed", False):
            raise LisaError("LisaAdamW owns its parameter groups; parameters cannot be added")
        super().add_param_group(param_group)

    # -- what it is doing ------------------------------------------------------------
    @property
    def active_blocks(self) -> list[int]:
        """Indices of the transformer blocks active now, whole or in part (`active_layers` is the same)."""
        return sorted({self.units.block[u] for u in self._active} - {None})

    active_layers = active_blocks

    @property
    def active_units(self) -> list[str]:
        """Names of the sampled units active now: "block3" (or with units: module "block3.mlp"), ..., and
        "embed_head" when it is sampled (`active_names` is the same)."""
        return [self.units.names[u] for u in self._active]

    active_names = active_units

    @property
    def unit_names(self) -> list[str]:
        return self.units.names

    @property
    def active(self) -> tuple[int, ...]:
        """Indices (into unit_names) of the sampled units active now."""
        return self._active

    def name_of(self, p: nn.Parameter) -> str:
        """The model's name of a parameter (the key of its parked state and master)."""
        return self._name[id(p)]

    @property
    def steps_done(self) -> int:
        return self._step

    def trainable_parameters(self) -> int:
        return sum(p.numel() for g in self.param_groups for p in g["params"])

    def state_bytes(self) -> int:
        """Bytes of optimizer state held beside the parameters (kept states count; offloaded do not)."""
        kept = self._parking.device_bytes()
        eight = held_bytes(self.embed_head_optimizer.state.values()) if self.embed_head_optimizer is not None else 0
        return tensor_bytes(self.inner.state.values()) + kept + eight

    def master_bytes(self) -> int:
        """Bytes of fp32 master weights held (master_weights: exactly 4 per trained parameter; else 0)."""
        return self._masters.bytes()

    def masters(self) -> dict[str, torch.Tensor]:
        """The fp32 master weights of the parameters trained now, by parameter name (empty without
        master_weights)."""
        return self._masters.of

    def offloaded_bytes(self) -> int:
        return self._parking.host_bytes()

    def activation_counts(self) -> dict[str, int]:
        """How many intervals each unit has been active for, so far."""
        counts = dict.fromkeys(self.unit_names, 0)
        for h in self.history:
            for u in h["active"]:
                counts[self.unit_names[u]] += 1
        return counts

    @torch.no_grad()
    def layer_norms(self) -> dict[str, float]:
        """L2 norm of the weights of each unit: embedding, block0..N-1, head, norm."""
        return {k: float(torch.sqrt(sum(p.detach().float().pow(2).sum() for _, p in v)))
                for k, v in self.layers.units().items()}

    def sampling_state(self) -> dict:
        """Where this optimizer is in the sampling sequence, with the settings that determine it: what every
        rank of a distributed run must hold identically."""
        return {"step": self._step, "switch": self._step // self.config.interval, "active": list(self._active),
                **self._meta()}

    def parked_states(self) -> dict[str, dict]:
        """The optimizer states of frozen parameters kept (`keep`) or offloaded (`offload`), by parameter name.
        Under FSDP2 an offloaded state of a sharded parameter is this rank's shard, a plain host tensor
        (parked_shards() says how it is sharded)."""
        return self._parking.states

    def parked_shards(self) -> dict[str, dict[str, tuple]]:
        """For each offloaded state of a sharded parameter: key -> (mesh, placements, shape, stride) of the
        DTensor its plain host shard in parked_states() stands for."""
        return self._parking.specs

    @torch.no_grad()
    def to(self, device: torch.device | str) -> "LisaOptimizer":
        """Move the model and what this optimizer holds for it (masters, state, kept state) to `device`, for an
        optimizer built while the model was on the host. Offloaded state stays on the host; modules that are no
        longer the model's (the full-precision linears of quantized frozen blocks) stay where they are."""
        device = torch.device(device)
        self.module.to(device)
        for m in self._masters.of.values():
            m.data = m.data.to(device)
        for st in self.inner.state.values():
            move_state(st, device)
        self._parking.to(device)
        self._device = self.module.get_parameter(self._probe).device
        return self

    def map_states(self, fn: Callable[[torch.Tensor, dict], dict]) -> None:
        """Replace the optimizer state of every parameter, active (inner state) or parked, by fn(param, state).
        An offloaded state of an FSDP2 parameter is passed as parked: this rank's plain host shards."""
        for p in list(self.inner.state):
            self.inner.state[p] = fn(p, self.inner.state[p])
        self._parking.map(fn, self._param)

    # -- checkpoints -----------------------------------------------------------------
    def _meta(self) -> dict:
        # "n_layers" stays the key of γ in checkpoints (and in the rank check): older checkpoints load.
        # The lr options shape the groups and the steps, so ranks and checkpoints must agree on them too.
        c = self.config
        return {"seed": c.seed, "policy": c.policy, "units": c.units, "n_layers": c.n_layers, "interval": c.interval,
                "n_units": len(self.units), "probabilities": self.sampler.p.tolist() if self.sampler.p is not None else None,
                "embed_head_lr": c.embed_head_lr, "activation_warmup": c.activation_warmup,
                "master_weights": self.master_weights, "embed_head_state": c.embed_head_state}

    def state_dict(self) -> dict:
        # Under FSDP2 the sharded tensors are DTensors and offloaded parked ones this rank's plain host shards
        # (parked_shards()): the full (single-process) form is gathered by whoever sharded the model.
        sd = self.inner.state_dict()
        sd["lisa"] = {**self._meta(), "step": self._step, "active": list(self._active),
                      "history": [dict(h) for h in self.history],
                      "parked": {n: dict(st) for n, st in self._parking.states.items()}}
        if self.master_weights:  # not re-made from the rounded weights on resume: that would differ
            sd["lisa"]["masters"] = dict(self._masters.of)
        if self.embed_head_optimizer is not None:
            sd["lisa"]["embed_head"] = self.embed_head_optimizer.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        sd = dict(state_dict)
        lisa = sd.pop("lisa", None)
        if lisa is None:
            raise LisaError("not a LisaAdamW state dict (it has no 'lisa' entry)")  # the name users know
        for key, mine in self._meta().items():
            theirs = lisa.get(key, META_DEFAULTS.get(key))  # checkpoints from before an option existed
            if key == "probabilities" and mine is not None and theirs is not None:
                same = len(mine) == len(theirs) and all(abs(a - b) < 1e-12 for a, b in zip(mine, theirs))
            elif key == "embed_head_lr":
                same = (1.0 if theirs is None else theirs) == (1.0 if mine is None else mine)
            else:
                same = theirs == mine
            if not same:
                raise LisaError(f"checkpoint has LISA {key}={theirs!r} but this optimizer has {mine!r}: resume with "
                                "the options it was saved with")
        self._step = int(lisa["step"])
        target = self.sampler.active(self._step // self.config.interval)
        if list(target) != list(lisa["active"]):
            raise LisaError(f"checkpoint active set {lisa['active']} does not match the sampler's {list(target)}")
        self.inner.state.clear()
        self._parking.clear()
        switch = self._step // self.config.interval
        self._apply(target, self.sampler.active(switch - 1) if switch else ())
        self.inner.load_state_dict(sd)
        if self.embed_head_optimizer is not None:
            self.embed_head_optimizer.load_state_dict(lisa["embed_head"])
        self._alias()
        if self.master_weights:
            self._masters.load(lisa.get("masters", {}))
        self._parking.load(lisa["parked"], self._param)
        self.history = [dict(h) for h in lisa["history"]]
        self._switched()


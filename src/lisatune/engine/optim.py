"""LisaOptimizer (alias LisaAdamW): Layerwise Importance Sampled AdamW as a real torch optimizer.

It owns its parameter groups. Every `interval` optimizer steps it samples a new
active set of blocks, freezes the rest (requires_grad=False, grad=None), puts only
the active parameters in the inner optimizer's groups, and drops, offloads or keeps
the optimizer state of the blocks it froze. Its position in the sampling sequence
travels in `state_dict()`, so any framework that checkpoints optimizers resumes it.

Groups are fixed (so LR schedulers and checkpoints see a stable layout):
  0: always-on, with weight decay   1: always-on, no decay (biases, norm weights)
  2: sampled,   with weight decay   3: sampled,   no decay
and, only with activation_warmup > 0 (so without it the layout, checkpoints and steps are exactly as before):
  4: sampled, activated at the last switch, with decay   5: the same, no decay

Units. By default each transformer block is one sampled unit. With `units="module"` each block's direct
submodules that hold a matrix (attention and MLP in a Llama block) are units of their own, and γ counts them;
a block's other parameters (its norms) train while any of its units is active. Freezing and activation are
per parameter, so a unit switching off leaves its block's norms on while a sibling unit stays active.

Learning rates. `embed_head_lr` = m sets groups 0 and 1 to lr·m at construction, so a scheduler (which keeps
each group's initial_lr) scales them like the rest: the always-on set always runs at m × the sampled lr.
`activation_warmup` = N: with lr_t the lr the scheduler set for optimizer step t (0-based), a block activated
at switch s (step sK; a block active at switch s-1 too is not activated, it keeps its moments and its lr)
steps with
    lr_{sK+j} · (j+1)/(N+1)   for j = 0 .. N-1,   then   lr_{sK+j}   for j = N .. K-1.
Every block of the first active set counts as activated at switch 0. The factor is applied inside step() only
and the group's lr restored after it, so schedulers and checkpoints never see a scaled value.

Mixed precision (`master_weights=True`, for a bf16 model): fp32 master copies, and so fp32 optimizer state,
exist only for the parameters trained now (the always-on set and the active blocks). A block's masters are
made from its bf16 weights when it activates (exactly: bf16 is a subset of fp32) and freed when it freezes; in
step() the bf16 .grad of each trained weight is cast into its master's .grad, the inner optimizer steps on the
masters, and each master is rounded (to nearest even) back into its weight. So between steps a weight always
holds its master rounded: a freezing block's master is just freed, and a weight written from outside (loaded
after the optimizer was built, say) replaces its master at the next step. The inner optimizer's groups and
state hold the masters, not the model's parameters; parked (offload/keep) states are keyed by parameter name
as always and restored onto the fresh master. The masters of the active set travel in state_dict(), so a
resume continues bitwise; a block that activates again starts from its bf16 weight (the fp32 low bits of an
earlier interval are gone, by design: that is the memory saved).

8-bit always-on state (`embed_head_state="8bit"`): groups 0 and 1 are stepped by a second inner optimizer,
bitsandbytes' AdamW8bit (blockwise 8-bit moments, 256 values per fp32 scale; tensors under 4096 elements keep
fp32 moments, as the library does), `embed_head_optimizer`; the blocks keep the inner optimizer's fp32 AdamW.
`param_groups` is then [its two groups, the inner's groups 2..], so schedulers see the same layout; its state
travels in state_dict()["lisa"]["embed_head"] and counts in state_bytes().
"""
from __future__ import annotations

import importlib
import logging
from collections import OrderedDict
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import LisaError
from .layers import find_layers, split_block, unwrap
from .options import LisaConfig
from .sampling import Sampler

log = logging.getLogger("lisatune")

OPTIMIZERS = {
    "adamw": "torch.optim.AdamW",
    "adam": "torch.optim.Adam",
    "sgd": "torch.optim.SGD",
    "adamw8bit": "bitsandbytes.optim.AdamW8bit",
}


def optimizer_class(name: str | type) -> type:
    """A torch optimizer class from a short name or a dotted import path (imported, never eval'd)."""
    if not isinstance(name, str):
        return name
    path = OPTIMIZERS.get(name.lower(), name)
    mod, _, cls = path.rpartition(".")
    try:
        return getattr(importlib.import_module(mod), cls)
    except (ImportError, AttributeError, ValueError):
        raise LisaError(f"optimizer '{name}' not found (short names: {', '.join(OPTIMIZERS)})") from None


def reject_peft(model: nn.Module) -> None:
    lora = next((n for n, _ in model.named_parameters() if "lora_" in n), None)
    if lora or type(model).__name__.startswith("Peft"):
        raise LisaError(
            "LISA trains the base weights of sampled layers and cannot be combined with a PEFT/LoRA "
            f"model (found {lora or type(model).__name__}); pass the plain model or merge the adapter first"
        )


def _local(v: torch.Tensor) -> torch.Tensor:
    return v.to_local() if hasattr(v, "to_local") else v  # a DTensor (FSDP2) counts this rank's shard


def tensor_bytes(states: Iterable[dict]) -> int:
    return sum(_local(v).numel() * v.element_size() for st in states for v in st.values() if torch.is_tensor(v))


def held_bytes(states: Iterable[dict]) -> int:
    """tensor_bytes counting a tensor shared between states once (bitsandbytes shares its quantization maps)."""
    seen = {(v.data_ptr(), v.numel() * v.element_size()) for st in states for v in st.values() if torch.is_tensor(v)}
    return sum(n for _, n in seen)


def clear_grads(params: Iterable[torch.Tensor], set_to_none: bool = True) -> None:
    """What Optimizer.zero_grad does, for parameters an optimizer does not hold (the bf16 weights of masters)."""
    for p in params:
        if p.grad is not None:
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_()
                p.grad.zero_()


def decay_groups(params: list[nn.Parameter]) -> list[dict]:
    """Weight decay on matrices only: biases and norm weights (ndim < 2) are exempt, as usual for LMs."""
    return [{"params": [p for p in params if p.ndim >= 2]},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


# What a checkpoint written before an option existed means by its absence.
META_DEFAULTS = {"units": "block", "embed_head_lr": None, "activation_warmup": 0, "master_weights": False, "embed_head_state": "fp32"}
MASTER_DTYPES = (torch.bfloat16,)  # fp16 would also need loss scaling, which this optimizer does not do


def check_master_weights(master_weights: Any, named: Iterable[tuple[str, nn.Parameter]]) -> None:
    """master_weights is a bool, and with it every parameter LISA may train is bf16 (a plain tensor)."""
    if not isinstance(master_weights, bool):
        raise LisaError(f"master_weights must be true or false (got {master_weights!r})")
    if not master_weights:
        return
    for name, p in named:
        if p.dtype not in MASTER_DTYPES:
            raise LisaError(f"master_weights needs bfloat16 weights, but {name} is {p.dtype} (an fp32 model "
                            "already steps in fp32: drop master_weights, or load the model in bfloat16)")
        if hasattr(p, "to_local"):
            raise LisaError(f"master_weights does not support sharded (FSDP2 DTensor) parameters ({name})")


def embed_head_8bit(cfg: LisaConfig, optimizer_cls: str | type, groups: list[dict], defaults: dict,
                    named: Iterable[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit over the always-on groups, with the inner AdamW's hyperparameters."""
    if cfg.sample_embed_head:
        raise LisaError("embed_head_state: 8bit is for the always-on embedding/head, but sample_embed_head is true")
    if (optimizer_cls.lower() if isinstance(optimizer_cls, str) else optimizer_cls) not in (
            "adamw", "adamw8bit", torch.optim.AdamW):
        raise LisaError(f"embed_head_state: 8bit steps the always-on set with AdamW8bit, so it needs "
                        f"optimizer_cls adamw (got {getattr(optimizer_cls, '__name__', optimizer_cls)})")
    if defaults.get("amsgrad") or defaults.get("maximize"):
        raise LisaError("embed_head_state: 8bit does not support amsgrad or maximize")
    sharded = next((n for n, p in named if hasattr(p, "to_local")), None)
    if sharded:
        raise LisaError(f"embed_head_state: 8bit does not support sharded (FSDP2 DTensor) parameters ({sharded})")
    try:
        import bitsandbytes  # deferred: optional, slow to import, and only this option needs it
    except ImportError:
        raise LisaError("lisa.embed_head_state: 8bit needs bitsandbytes (pip install bitsandbytes)") from None
    return bitsandbytes.optim.AdamW8bit(groups, lr=defaults["lr"], betas=tuple(defaults["betas"]),
                                        eps=defaults["eps"], weight_decay=defaults["weight_decay"])


class LisaOptimizer(torch.optim.Optimizer):
    """LISA over any inner torch optimizer (AdamW by default). `LisaAdamW` is the same class.

    >>> opt = LisaOptimizer(model, n_layers=2, interval=20, lr=1e-5)
    """

    # Hooks every instance calls after each switch and load_state_dict, besides its own (register_switch_hook):
    # how a layer above the engine plugs in for all optimizers (lisatune.distributed's rank agreement check).
    _global_switch_hooks: OrderedDict[int, Callable] = OrderedDict()
    # The process group whose ranks must agree on the active set (None: the default group); read by that check.
    process_group = None

    def __init__(self, model: nn.Module, config: LisaConfig | None = None, *, lr: float = 1e-5,
                 weight_decay: float = 0.0, betas: tuple[float, float] | None = None, eps: float | None = None,
                 optimizer_cls: str | type = "adamw", optimizer_kwargs: dict | None = None,
                 master_weights: bool = False, **options: Any):
        if config is None:
            config = LisaConfig.build(**options)
        elif options:
            config = LisaConfig.build(**{**config.model_dump(), **options})
        model = unwrap(model)
        reject_peft(model)
        self.module = model  # the model trained (for layers above that act at switches, e.g. lisatune.quant)
        self.frozen_weights = None  # lisatune.quant's FrozenWeights, attached by its global switch hook
        self.config = cfg = config
        self.layers = lm = find_layers(model, cfg.blocks_path)

        if lm.tied and cfg.train_embedding != cfg.train_head:
            raise LisaError("embedding and head are tied (one tensor): set train_embedding and train_head alike")
        eh = (lm.embedding if cfg.train_embedding else []) + (lm.head if cfg.train_head else [])
        always = [] if cfg.sample_embed_head else list(eh)
        always += (lm.norm if cfg.train_norm else []) + (lm.other if cfg.train_other else [])
        self.unit_names, self._units, self._unit_block = [], [], []  # the sampled units, and each one's block
        for i, block in enumerate(lm.blocks):
            subs, shared = split_block(f"{lm.blocks_path}.{i}", block) if cfg.units == "module" else ({}, [])
            parts = {f"block{i}.{c}": named + shared for c, named in subs.items()} or {f"block{i}": list(block)}
            for name, named in parts.items():
                self.unit_names.append(name)
                self._units.append(named)
                self._unit_block.append(i)
        if cfg.sample_embed_head:
            if not eh:
                raise LisaError("sample_embed_head needs train_embedding or train_head")
            self.unit_names.append("embed_head")
            self._units.append(list(eh))
            self._unit_block.append(None)
        n_units = len(self._units)
        if cfg.policy != "bernoulli" and cfg.n_layers > n_units:
            found = (f"{lm.n_blocks} transformer blocks found at {lm.blocks_path}" if cfg.units == "block" else
                     f"{n_units - cfg.sample_embed_head} block submodules (units: module) found at {lm.blocks_path}")
            raise LisaError(f"n_layers (γ) = {cfg.n_layers} exceeds the {found}"
                            + (" (+1 embed_head unit)" if cfg.sample_embed_head else ""))
        self.sampler = Sampler(n_units, cfg.n_layers, cfg.policy, cfg.probability_list(), cfg.seed)
        check_master_weights(master_weights, always + [np for u in self._units for np in u])
        self.master_weights = master_weights
        self._masters: dict[str, torch.Tensor] = {}  # master_weights: parameter name -> fp32 master
        self._synced: dict[str, int] = {}  # the weight's version counter when it last matched its master
        self._parked: dict[str, dict[str, torch.Tensor]] = {}  # offload/keep: states of frozen params

        self._order = {id(p): i for i, (_, p) in enumerate(model.named_parameters())}
        self._name = {id(p): n for n, p in model.named_parameters()}
        self._param = {n: p for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for _, p in always:
            self._unfreeze(p)  # (no parked state yet: only requires_grad and, with master_weights, a master)
        decay, no_decay = self._split([p for _, p in always])  # groups 0 and 1
        cls = optimizer_class(optimizer_cls)
        kw = {"lr": lr, "weight_decay": weight_decay, **(optimizer_kwargs or {})}
        if betas is not None:
            kw["betas"] = tuple(betas)
        if eps is not None:
            kw["eps"] = eps
        eight = cfg.embed_head_state == "8bit"
        always_groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        if cfg.embed_head_lr is not None:
            for g in always_groups:
                g["lr"] = kw["lr"] * cfg.embed_head_lr
        # With 8-bit always-on state the inner optimizer's groups 0 and 1 stay empty: the second one steps them.
        groups = ([{"params": []}, {"params": [], "weight_decay": 0.0}] if eight else always_groups) + [
            {"params": []}, {"params": [], "weight_decay": 0.0}]
        if cfg.activation_warmup:
            groups += [{"params": []}, {"params": [], "weight_decay": 0.0}]
        try:
            self.inner = cls(groups, **kw)
        except TypeError as e:
            raise LisaError(f"{cls.__name__} does not accept these options: {e}") from None
        self.embed_head_optimizer = (embed_head_8bit(cfg, optimizer_cls, always_groups, self.inner.defaults, always)
                                     if eight else None)
        super().__init__(self.inner.param_groups, self.inner.defaults)
        self._alias()
        self._sealed = True

        self._step = 0
        self._active: tuple[int, ...] = ()
        self.history: list[dict] = []
        self._switch_hooks: OrderedDict[int, Callable] = OrderedDict()  # weak-referenceable, for handles
        self._switch_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._switch(0)
        if cfg.frozen_weights != "full" and self.frozen_weights is None:  # the engine itself holds weights as given
            raise LisaError(f"lisa.frozen_weights: {cfg.frozen_weights} is implemented by lisatune.quant: "
                            "import lisatune.quant before building the optimizer")

    # -- the algorithm ---------------------------------------------------------------
    def step(self, closure: Callable | None = None):
        if self.master_weights or self.embed_head_optimizer is not None:
            loss = None
            if closure is not None:  # the grads must exist before they are cast into the masters
                with torch.enable_grad():
                    loss = closure()
            if self.master_weights:
                self._grads_to_masters()
            self._inner_step(None)
            if self.master_weights:
                self._masters_to_weights()
        else:
            loss = self._inner_step(closure)
        self._step += 1
        held = self.state_bytes()
        if held > self.history[-1]["state_bytes"]:
            self.history[-1]["state_bytes"] = held
        if self._step % self.config.interval == 0:
            for hook in list(self._switch_pre_hooks.values()):
                hook(self)
            self._switch(self._step // self.config.interval)
        return loss

    def _inner_step(self, closure: Callable | None):
        j, n = self._step % self.config.interval, self.config.activation_warmup
        if j >= n:
            return self._step_inner(closure)
        saved = [g["lr"] for g in self.param_groups[4:]]  # the blocks activated at the last switch ramp up
        for g in self.param_groups[4:]:
            g["lr"] = g["lr"] * ((j + 1) / (n + 1))
        try:
            return self._step_inner(closure)
        finally:  # the scheduler's values, exactly
            for g, lr in zip(self.param_groups[4:], saved):
                g["lr"] = lr

    def _step_inner(self, closure: Callable | None):
        loss = self.inner.step(closure)
        if self.embed_head_optimizer is not None:
            self.embed_head_optimizer.step()
        return loss

    @torch.no_grad()
    def _grads_to_masters(self) -> None:
        for name, m in self._masters.items():
            p = self._param[name]
            # A weight written outside the optimizer since its last sync (loaded into the model after this
            # optimizer was built, say) wins over a master it no longer rounds to; the version counter makes
            # the check free when nothing wrote to it.
            if p._version != self._synced[name] and not torch.equal(p, m.to(p.dtype)):
                m.copy_(p)
            m.grad = None if p.grad is None else p.grad.detach().to(torch.float32)

    @torch.no_grad()
    def _masters_to_weights(self) -> None:
        for name, m in self._masters.items():
            p = self._param[name]
            p.copy_(m)  # round to nearest even
            self._synced[name] = p._version
            m.grad = None  # the fp32 grads live only during the step

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)
        if self.embed_head_optimizer is not None:
            self.embed_head_optimizer.zero_grad(set_to_none=set_to_none)
        # The inner optimizer holds the masters; the grads are on the weights.
        clear_grads((self._param[name] for name in self._masters), set_to_none)

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
                 f" (optimizer state peaked at {peak / 2**20:.1f} MiB in the previous interval)" if switch else "")
        self._switched()

    def _switched(self) -> None:
        for hook in [*self._global_switch_hooks.values(), *self._switch_hooks.values()]:
            hook(self)

    def register_switch_hook(self, hook: Callable[["LisaOptimizer"], None]) -> RemovableHandle:
        """Call hook(optimizer) after each switch and load_state_dict (e.g. to re-wrap DDP)."""
        handle = RemovableHandle(self._switch_hooks)
        self._switch_hooks[handle.id] = hook
        return handle

    def register_switch_pre_hook(self, hook: Callable[["LisaOptimizer"], None]) -> RemovableHandle:
        """Call hook(optimizer) in step() just before each switch (e.g. to attribute its memory: the switch frees
        and makes state, masters and quantized weights)."""
        handle = RemovableHandle(self._switch_pre_hooks)
        self._switch_pre_hooks[handle.id] = hook
        return handle

    @classmethod
    def register_global_switch_hook(cls, hook: Callable[["LisaOptimizer"], None]) -> RemovableHandle:
        """Call hook(optimizer) in every instance, at construction, after each switch and after load_state_dict,
        before the instance's own hooks."""
        handle = RemovableHandle(cls._global_switch_hooks)
        cls._global_switch_hooks[handle.id] = hook
        return handle

    def _apply(self, target: tuple[int, ...], before: tuple[int, ...]) -> None:
        """Make `target` the active set; `before` is the previous switch's (which of target is newly activated)."""
        old, new = self._params(self._active), self._params(target)
        for i, p in old.items():
            if i not in new:
                self._freeze(p)
        for i, p in new.items():
            if i not in old:
                self._unfreeze(p)
        self._active = tuple(target)
        warm = len(self.param_groups) > 4
        prev = self._params(before) if warm else new
        stay = [p for i, p in new.items() if i in prev]
        for g, params in ((2, stay), (4, [p for i, p in new.items() if i not in prev])):
            if g < len(self.param_groups):
                decay, no_decay = self._split(params)
                self.param_groups[g]["params"] = decay
                self.param_groups[g + 1]["params"] = no_decay

    def _params(self, units: Iterable[int]) -> dict[int, nn.Parameter]:
        """The parameters of `units` by id, each once (module units share their block's norms), in unit order."""
        return {id(p): p for u in sorted(units) for _, p in self._units[u]}

    def _stepped(self, p: nn.Parameter) -> torch.Tensor:
        """The tensor the inner optimizer steps for the model's parameter p: its master, or p itself."""
        return self._masters[self._name[id(p)]] if self.master_weights else p

    def _freeze(self, p: nn.Parameter) -> None:
        p.requires_grad_(False)
        p.grad = None
        name = self._name[id(p)]
        st = self.inner.state.pop(self._stepped(p), None)
        if self.master_weights:
            # The weight already holds the master rounded (every step ends so), and a weight loaded since
            # must not be overwritten: the master is only freed.
            del self._masters[name], self._synced[name]
        if st and self.config.state_policy != "drop":
            offload = self.config.state_policy == "offload"
            self._parked[name] = {k: v.to("cpu") if offload and torch.is_tensor(v) else v for k, v in st.items()}

    def _unfreeze(self, p: nn.Parameter) -> None:
        p.requires_grad_(True)
        name = self._name[id(p)]
        if self.master_weights:
            self._masters[name] = p.detach().to(torch.float32)  # exact: every bf16 value is an fp32 value
            self._synced[name] = p._version
        st = self._parked.pop(name, None)
        if st:
            t = self._stepped(p)
            self.inner.state[t] = {k: self._to_param(t, k, v) for k, v in st.items()}

    @staticmethod
    def _to_param(p: torch.Tensor, key: str, v: Any) -> Any:
        # As torch does on load: "step" stays where the optimizer keeps it; moments follow the param.
        if not torch.is_tensor(v) or key == "step":
            return v
        return v.to(device=p.device)

    def _split(self, params: list[nn.Parameter]) -> tuple[list, list]:
        """The tensors to step for `params` (masters or the params), in model order, with decay / without."""
        decay, no_decay = decay_groups(sorted(params, key=lambda p: self._order[id(p)]))
        return [self._stepped(p) for p in decay["params"]], [self._stepped(p) for p in no_decay["params"]]

    def _alias(self) -> None:
        self.param_groups = self.inner.param_groups
        if self.embed_head_optimizer is not None:  # groups 0, 1 are the 8-bit optimizer's (the inner's are empty)
            self.param_groups = [*self.embed_head_optimizer.param_groups, *self.inner.param_groups[2:]]
        self.state = self.inner.state

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_sealed", False):
            raise LisaError("LisaAdamW owns its parameter groups; parameters cannot be added")
        super().add_param_group(param_group)

    # -- what it is doing ------------------------------------------------------------
    @property
    def active_blocks(self) -> list[int]:
        """Indices of the transformer blocks active now, whole or in part (`active_layers` is the same)."""
        return sorted({self._unit_block[u] for u in self._active} - {None})

    active_layers = active_blocks

    @property
    def active_units(self) -> list[str]:
        """Names of the sampled units active now: "block3" (or with units: module "block3.mlp"), ..., and
        "embed_head" when it is sampled (`active_names` is the same)."""
        return [self.unit_names[u] for u in self._active]

    active_names = active_units

    @property
    def steps_done(self) -> int:
        return self._step

    def trainable_parameters(self) -> int:
        return sum(p.numel() for g in self.param_groups for p in g["params"])

    def state_bytes(self) -> int:
        """Bytes of optimizer state held beside the parameters (kept states count; offloaded do not)."""
        kept = tensor_bytes(self._parked.values()) if self.config.state_policy == "keep" else 0
        eight = held_bytes(self.embed_head_optimizer.state.values()) if self.embed_head_optimizer is not None else 0
        return tensor_bytes(self.inner.state.values()) + kept + eight

    def master_bytes(self) -> int:
        """Bytes of fp32 master weights held (master_weights: exactly 4 per trained parameter; else 0)."""
        return sum(m.numel() * m.element_size() for m in self._masters.values())

    def masters(self) -> dict[str, torch.Tensor]:
        """The fp32 master weights of the parameters trained now, by parameter name (empty without
        master_weights)."""
        return self._masters

    def offloaded_bytes(self) -> int:
        return tensor_bytes(self._parked.values()) if self.config.state_policy == "offload" else 0

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
        """The optimizer states of frozen parameters kept (`keep`) or offloaded (`offload`), by parameter name."""
        return self._parked

    def map_states(self, fn: Callable[[torch.Tensor, dict], dict]) -> None:
        """Replace the optimizer state of every parameter, active (inner state) or parked, by fn(param, state)
        (e.g. to shard a loaded full state under FSDP2)."""
        for p in list(self.inner.state):
            self.inner.state[p] = fn(p, self.inner.state[p])
        for name in list(self._parked):
            self._parked[name] = fn(self._param[name], self._parked[name])

    # -- checkpoints -----------------------------------------------------------------
    def _meta(self) -> dict:
        # "n_layers" stays the key of γ in checkpoints (and in the rank check): older checkpoints load.
        # The lr options shape the groups and the steps, so ranks and checkpoints must agree on them too.
        c = self.config
        return {"seed": c.seed, "policy": c.policy, "units": c.units, "n_layers": c.n_layers, "interval": c.interval,
                "n_units": len(self._units), "probabilities": self.sampler.p.tolist() if self.sampler.p is not None else None,
                "embed_head_lr": c.embed_head_lr, "activation_warmup": c.activation_warmup,
                "master_weights": self.master_weights, "embed_head_state": c.embed_head_state}

    def state_dict(self) -> dict:
        sd = self.inner.state_dict()
        sd["lisa"] = {**self._meta(), "step": self._step, "active": list(self._active),
                      "history": [dict(h) for h in self.history],
                      "parked": {n: dict(st) for n, st in self._parked.items()}}
        if self.master_weights:  # not re-made from the rounded weights on resume: that would differ
            sd["lisa"]["masters"] = dict(self._masters)
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
        self._parked.clear()
        switch = self._step // self.config.interval
        self._apply(target, self.sampler.active(switch - 1) if switch else ())
        self.inner.load_state_dict(sd)
        if self.embed_head_optimizer is not None:
            self.embed_head_optimizer.load_state_dict(lisa["embed_head"])
        self._alias()
        if self.master_weights:
            saved = lisa.get("masters", {})
            if set(saved) != set(self._masters):
                raise LisaError(f"checkpoint holds master weights for {len(saved)} parameters but the active set "
                                f"has {len(self._masters)}")
            with torch.no_grad():
                for name, m in self._masters.items():
                    m.copy_(saved[name])
                    self._param[name].copy_(m)  # the weight is its master rounded, whatever was loaded into it
                    self._synced[name] = self._param[name]._version
        offload = self.config.state_policy == "offload"
        for name, st in lisa["parked"].items():
            p = self._param[name]
            self._parked[name] = {k: v.to("cpu") if offload and torch.is_tensor(v) and k != "step"
                                  else self._to_param(p, k, v) for k, v in st.items()}
        self.history = [dict(h) for h in lisa["history"]]
        self._switched()


LisaAdamW = LisaOptimizer  # the name of the paper's method, which most users type

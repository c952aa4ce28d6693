"""LisaOptimizer (alias LisaAdamW): Layerwise Importance Sampled AdamW as a real torch optimizer.

It owns its parameter groups. Every `interval` optimizer steps it samples a new
active set of blocks, freezes the rest (requires_grad=False, grad=None), puts only
the active parameters in the inner optimizer's groups, and drops, offloads or keeps
the optimizer state of the blocks it froze. Its position in the sampling sequence
travels in `state_dict()`, so any framework that checkpoints optimizers resumes it.

Groups are fixed (so LR schedulers and checkpoints see a stable layout):
  0: always-on, with weight decay   1: always-on, no decay (biases, norm weights)
  2: sampled,   with weight decay   3: sampled,   no decay
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
from .layers import find_layers, unwrap
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


def decay_groups(params: list[nn.Parameter]) -> list[dict]:
    """Weight decay on matrices only: biases and norm weights (ndim < 2) are exempt, as usual for LMs."""
    return [{"params": [p for p in params if p.ndim >= 2]},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


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
                 optimizer_cls: str | type = "adamw", optimizer_kwargs: dict | None = None, **options: Any):
        if config is None:
            config = LisaConfig.build(**options)
        elif options:
            config = LisaConfig.build(**{**config.model_dump(), **options})
        model = unwrap(model)
        reject_peft(model)
        self.config = cfg = config
        self.layers = lm = find_layers(model, cfg.blocks_path)

        if lm.tied and cfg.train_embedding != cfg.train_head:
            raise LisaError("embedding and head are tied (one tensor): set train_embedding and train_head alike")
        eh = (lm.embedding if cfg.train_embedding else []) + (lm.head if cfg.train_head else [])
        always = [] if cfg.sample_embed_head else list(eh)
        always += (lm.norm if cfg.train_norm else []) + (lm.other if cfg.train_other else [])
        self.unit_names = [f"block{i}" for i in range(lm.n_blocks)]
        self._units = [list(b) for b in lm.blocks]
        if cfg.sample_embed_head:
            if not eh:
                raise LisaError("sample_embed_head needs train_embedding or train_head")
            self.unit_names.append("embed_head")
            self._units.append(list(eh))
        n_units = len(self._units)
        if cfg.policy != "bernoulli" and cfg.n_layers > n_units:
            raise LisaError(
                f"n_layers (γ) = {cfg.n_layers} exceeds the {lm.n_blocks} transformer blocks found at "
                f"{lm.blocks_path}" + (" (+1 embed_head unit)" if cfg.sample_embed_head else "")
            )
        self.sampler = Sampler(n_units, cfg.n_layers, cfg.policy, cfg.probability_list(), cfg.seed)

        self._order = {id(p): i for i, (_, p) in enumerate(model.named_parameters())}
        self._name = {id(p): n for n, p in model.named_parameters()}
        self._param = {n: p for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for _, p in always:
            p.requires_grad_(True)
        decay, no_decay = self._split([p for _, p in always])  # groups 0 and 1
        cls = optimizer_class(optimizer_cls)
        kw = {"lr": lr, "weight_decay": weight_decay, **(optimizer_kwargs or {})}
        if betas is not None:
            kw["betas"] = tuple(betas)
        if eps is not None:
            kw["eps"] = eps
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0},
                  {"params": []}, {"params": [], "weight_decay": 0.0}]
        try:
            self.inner = cls(groups, **kw)
        except TypeError as e:
            raise LisaError(f"{cls.__name__} does not accept these options: {e}") from None
        super().__init__(self.inner.param_groups, self.inner.defaults)
        self._alias()
        self._sealed = True

        self._step = 0
        self._active: tuple[int, ...] = ()
        self._parked: dict[str, dict[str, torch.Tensor]] = {}  # offload/keep: states of frozen params
        self.history: list[dict] = []
        self._switch_hooks: OrderedDict[int, Callable] = OrderedDict()  # weak-referenceable, for handles
        self._switch(0)

    # -- the algorithm ---------------------------------------------------------------
    def step(self, closure: Callable | None = None):
        loss = self.inner.step(closure)
        self._step += 1
        held = self.state_bytes()
        if held > self.history[-1]["state_bytes"]:
            self.history[-1]["state_bytes"] = held
        if self._step % self.config.interval == 0:
            self._switch(self._step // self.config.interval)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def _switch(self, switch: int) -> None:
        peak = self.history[-1]["state_bytes"] if self.history else 0
        self._apply(self.sampler.active(switch))
        entry = {"switch": switch, "step": self._step, "active": list(self._active),
                 "trainable_params": self.trainable_parameters(), "state_bytes": self.state_bytes()}
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

    @classmethod
    def register_global_switch_hook(cls, hook: Callable[["LisaOptimizer"], None]) -> RemovableHandle:
        """Call hook(optimizer) in every instance, at construction, after each switch and after load_state_dict,
        before the instance's own hooks."""
        handle = RemovableHandle(cls._global_switch_hooks)
        cls._global_switch_hooks[handle.id] = hook
        return handle

    def _apply(self, target: tuple[int, ...]) -> None:
        old, new = set(self._active), set(target)
        for u in sorted(old - new):
            for _, p in self._units[u]:
                self._freeze(p)
        for u in sorted(new - old):
            for _, p in self._units[u]:
                self._unfreeze(p)
        self._active = tuple(target)
        decay, no_decay = self._split([p for u in target for _, p in self._units[u]])
        self.param_groups[2]["params"] = decay
        self.param_groups[3]["params"] = no_decay

    def _freeze(self, p: nn.Parameter) -> None:
        p.requires_grad_(False)
        p.grad = None
        st = self.inner.state.pop(p, None)
        if st and self.config.state_policy != "drop":
            offload = self.config.state_policy == "offload"
            self._parked[self._name[id(p)]] = {k: v.to("cpu") if offload and torch.is_tensor(v) else v
                                               for k, v in st.items()}

    def _unfreeze(self, p: nn.Parameter) -> None:
        p.requires_grad_(True)
        st = self._parked.pop(self._name[id(p)], None)
        if st:
            self.inner.state[p] = {k: self._to_param(p, k, v) for k, v in st.items()}

    @staticmethod
    def _to_param(p: torch.Tensor, key: str, v: Any) -> Any:
        # As torch does on load: "step" stays where the optimizer keeps it; moments follow the param.
        if not torch.is_tensor(v) or key == "step":
            return v
        return v.to(device=p.device)

    def _split(self, params: list[nn.Parameter]) -> tuple[list, list]:
        decay, no_decay = decay_groups(sorted(params, key=lambda p: self._order[id(p)]))
        return decay["params"], no_decay["params"]

    def _alias(self) -> None:
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_sealed", False):
            raise LisaError("LisaAdamW owns its parameter groups; parameters cannot be added")
        super().add_param_group(param_group)

    # -- what it is doing ------------------------------------------------------------
    @property
    def active_blocks(self) -> list[int]:
        """Indices of the transformer blocks active now (`active_layers` is the same)."""
        return [u for u in self._active if u < self.layers.n_blocks]

    active_layers = active_blocks

    @property
    def active_units(self) -> list[str]:
        """Names of the sampled units active now: "block3", ..., and "embed_head" when it is sampled
        (`active_names` is the same)."""
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
        return tensor_bytes(self.inner.state.values()) + kept

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
        c = self.config
        return {"seed": c.seed, "policy": c.policy, "n_layers": c.n_layers, "interval": c.interval,
                "n_units": len(self._units), "probabilities": self.sampler.p.tolist() if self.sampler.p is not None else None}

    def state_dict(self) -> dict:
        sd = self.inner.state_dict()
        sd["lisa"] = {**self._meta(), "step": self._step, "active": list(self._active),
                      "history": [dict(h) for h in self.history],
                      "parked": {n: dict(st) for n, st in self._parked.items()}}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        sd = dict(state_dict)
        lisa = sd.pop("lisa", None)
        if lisa is None:
            raise LisaError("not a LisaAdamW state dict (it has no 'lisa' entry)")  # the name users know
        for key, mine in self._meta().items():
            if key == "probabilities" and mine is not None and lisa[key] is not None:
                same = len(mine) == len(lisa[key]) and all(abs(a - b) < 1e-12 for a, b in zip(mine, lisa[key]))
            else:
                same = lisa[key] == mine
            if not same:
                raise LisaError(f"checkpoint has LISA {key}={lisa[key]!r} but this optimizer has {mine!r}")
        self._step = int(lisa["step"])
        target = self.sampler.active(self._step // self.config.interval)
        if list(target) != list(lisa["active"]):
            raise LisaError(f"checkpoint active set {lisa['active']} does not match the sampler's {list(target)}")
        self.inner.state.clear()
        self._parked.clear()
        self._apply(target)
        self.inner.load_state_dict(sd)
        self._alias()
        offload = self.config.state_policy == "offload"
        for name, st in lisa["parked"].items():
            p = self._param[name]
            self._parked[name] = {k: v.to("cpu") if offload and torch.is_tensor(v) and k != "step"
                                  else self._to_param(p, k, v) for k, v in st.items()}
        self.history = [dict(h) for h in lisa["history"]]
        self._switched()


LisaAdamW = LisaOptimizer  # the name of the paper's method, which most users type

"""Which units are active in each interval: a pure function of (seed, switch index).

Each draw uses its own generator seeded from (seed, switch, cycle), never a global
RNG, so every rank and every resumed run sees the same sequence.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..errors import LisaError
from .units import check_n_layers

POLICIES = ("uniform", "bernoulli", "weighted", "cyclic")


class Sampler:
    """Draws the active set for switch s (the interval of optimizer steps [sK, (s+1)K)): `n_layers` (γ) of
    `n_units` units, or under bernoulli each unit with its own probability."""

    def __init__(self, n_units: int, n_layers: int, policy: str = "uniform",
                 probabilities: Sequence[float] | None = None, seed: int = 0):
        if policy not in POLICIES:
            raise LisaError(f"policy '{policy}' is not one of {', '.join(POLICIES)}")
        self.n_units, self.n_layers, self.policy, self.seed = n_units, n_layers, policy, int(seed)
        check_n_layers(n_layers, n_units if policy != "bernoulli" or probabilities is None else None)
        self.p = None
        if policy == "bernoulli":
            # Algorithm 1 in its general form; without probabilities, its uniform form γ/N_L.
            p = [n_layers / n_units] * n_units if probabilities is None else list(probabilities)
            self.p = self._check(p, "probabilities")
            if np.any(self.p > 1):
                bad = int(np.argmax(self.p > 1))
                raise LisaError(f"probabilities[{bad}] = {self.p[bad]} is outside [0, 1]")
        else:
            if policy == "weighted":
                if probabilities is None:
                    raise LisaError("policy 'weighted' needs probabilities (one weight per layer)")
                w = self._check(list(probabilities), "weights")
                if np.count_nonzero(w) < n_layers:
                    raise LisaError(f"weighted sampling needs at least γ = {n_layers} layers with a weight > 0")
                self.p = w / w.sum()
            elif probabilities is not None:
                raise LisaError(f"probabilities apply to policies 'bernoulli' and 'weighted', not '{policy}'")

    def _check(self, values: list[float], what: str) -> np.ndarray:
        if len(values) != self.n_units:
            raise LisaError(f"{what} has {len(values)} entries but the model has {self.n_units} sampleable units")
        arr = np.asarray(values, dtype=np.float64)
        for i, v in enumerate(arr):
            if not math.isfinite(v) or v < 0:
                raise LisaError(f"{what}[{i}] = {values[i]} is outside [0, 1]")
        return arr

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def active(self, switch: int) -> tuple[int, ...]:
        """Sorted indices of the active units during switch interval `switch`."""
        n, k = self.n_units, self.n_layers
        if self.policy == "uniform":
            chosen = self._rng(switch).choice(n, size=k, replace=False)
        elif self.policy == "weighted":
            chosen = self._rng(switch).choice(n, size=k, replace=False, p=self.p)
        elif self.policy == "bernoulli":
            chosen = np.flatnonzero(self._rng(switch).random(n) < self.p)
        else:  # cyclic: one permutation per cycle, visited k at a time
            per_cycle = math.ceil(n / k)
            cycle, j = divmod(switch, per_cycle)
            perm = self._rng(cycle, 1).permutation(n)
            chosen = perm[j * k:(j + 1) * k]
            if len(chosen) < k:  # the last chunk of a cycle is topped up from the same permutation
                chosen = np.concatenate([chosen, perm[: k - len(chosen)]])
        return tuple(sorted(int(i) for i in chosen))

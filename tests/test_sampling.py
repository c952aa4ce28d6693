"""The samplers: a pure function of (seed, switch), with the stated statistics."""
import random

import numpy as np
import pytest
import torch

from lisatune import LisaError, Sampler

DRAWS = 4000


def freq(s: Sampler, n=DRAWS):
    counts = np.zeros(s.n_units)
    for i in range(n):
        counts[list(s.active(i))] += 1
    return counts / n


def test_same_sequence_from_fresh_objects_in_any_order_and_no_global_rng_use():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    a = [Sampler(30, 2, seed=7).active(s) for s in range(50)]
    b = Sampler(30, 2, seed=7)
    assert [b.active(s) for s in reversed(range(50))][::-1] == a
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == before
    assert [Sampler(30, 2, seed=8).active(s) for s in range(50)] != a


def test_uniform_draws_gamma_distinct_layers_with_equal_frequency():
    s = Sampler(10, 3, "uniform", seed=0)
    assert all(len(set(s.active(i))) == 3 for i in range(200))
    f = freq(s)
    # binomial sd of a frequency 0.3 over 4000 draws is 0.0072; allow 5 sd
    assert np.all(np.abs(f - 0.3) < 0.036), f


def test_bernoulli_frequencies_match_each_layers_probability():
    p = [1.0, 0.0, 0.1, 0.5, 0.9, 0.25]
    f = freq(Sampler(6, 2, "bernoulli", p, seed=3))
    sd = np.sqrt(np.array(p) * (1 - np.array(p)) / DRAWS)
    assert np.all(np.abs(f - p) <= 5 * sd + 1e-12), (f, p)


def test_bernoulli_without_probabilities_is_the_papers_uniform_form():
    f = freq(Sampler(8, 2, "bernoulli", seed=0))
    assert np.all(np.abs(f - 0.25) < 5 * np.sqrt(0.25 * 0.75 / DRAWS))


def test_weighted_favours_heavier_layers():
    w = [1, 2, 4, 8, 0, 1]
    f = freq(Sampler(6, 2, "weighted", w, seed=0))
    assert f[4] == 0
    assert f[0] < f[1] < f[2] < f[3]
    assert abs(f[0] - f[5]) < 0.05  # equal weights, equal frequency
    assert np.isclose(f.sum(), 2)


@pytest.mark.parametrize("n,k", [(6, 2), (6, 3), (5, 2), (7, 7), (30, 4)])
def test_cyclic_visits_every_layer_once_per_cycle(n, k):
    s = Sampler(n, k, "cyclic", seed=0)
    per_cycle = -(-n // k)
    for c in range(5):
        sets = [s.active(c * per_cycle + j) for j in range(per_cycle)]
        assert all(len(set(x)) == k for x in sets)
        seen = [u for x in sets for u in x]
        assert set(seen) == set(range(n))
        if n % k == 0:
            assert sorted(seen) == list(range(n))  # exactly once
    if k < n:  # a fresh permutation each cycle
        assert [s.active(j) for j in range(per_cycle)] != [s.active(per_cycle + j) for j in range(per_cycle)]


@pytest.mark.parametrize("kw,msg", [
    (dict(n_units=4, n_layers=5), r"n_layers \(γ\) = 5 must be between 1 and the 4"),
    (dict(n_units=4, n_layers=0), r"n_layers \(γ\) = 0 must be between 1"),
    (dict(n_units=3, n_layers=1, policy="bernoulli", probabilities=[0.5, 1.5, 0]), r"probabilities\[1\] = 1.5 is outside \[0, 1\]"),
    (dict(n_units=3, n_layers=1, policy="bernoulli", probabilities=[0.5, -0.1, 0]), r"probabilities\[1\] = -0.1 is outside"),
    (dict(n_units=3, n_layers=1, policy="bernoulli", probabilities=[0.5]), "has 1 entries but the model has 3"),
    (dict(n_units=3, n_layers=2, policy="weighted", probabilities=[1, 0, 0]), "at least γ = 2 layers with a weight"),
    (dict(n_units=3, n_layers=1, policy="weighted"), "needs probabilities"),
    (dict(n_units=3, n_layers=1, policy="uniform", probabilities=[1, 1, 1]), "apply to policies"),
    (dict(n_units=3, n_layers=1, policy="best"), "policy 'best' is not one of"),
])
def test_bad_settings_are_rejected(kw, msg):
    with pytest.raises(LisaError, match=msg):
        Sampler(**kw)

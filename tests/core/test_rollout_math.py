"""Rollout arithmetic: hand values from AEPO_SPEC section 3, NumPy / jnp agreement, broadcasting."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from aepo_jax.core import rollout_math as rm


def test_budget_split_hand_values():
    # k = 12, beta = 0.5: sigmoid(0) = 0.5 -> floor(6) + 1 = 7.
    assert rm.budget_split(12, 1.0, 1.0) == 7
    # sigmoid(0.5 * 2) = 0.7311 -> floor(8.77) + 1 = 9; sigmoid(-1) = 0.2689 -> floor(3.23) + 1 = 4.
    assert rm.budget_split(12, 3.0, 1.0) == 9
    assert rm.budget_split(12, 1.0, 3.0) == 4
    # Saturation: sigmoid -> 1 gives floor(k) + 1 = k + 1, clipped to k; sigmoid -> 0 gives 1.
    assert rm.budget_split(12, 1e3, 0.0) == 12
    assert rm.budget_split(12, -1e3, 0.0) == 1
    assert rm.budget_split(1, 0.3, 0.2) == 1


@settings(max_examples=25)
@given(k=st.integers(1, 32), h_root=st.floats(-5, 5), h_tool=st.floats(-5, 5), beta=st.floats(0.01, 3))
def test_budget_split_matches_formula_in_numpy_and_jax(k, h_root, h_tool, beta):
    want = min(max(math.floor(k / (1 + math.exp(-beta * (h_root - h_tool)))) + 1, 1), k)
    got_np = rm.budget_split(k, h_root, h_tool, beta)
    got_jnp = rm.budget_split(jnp.asarray(k), jnp.float32(h_root), jnp.float32(h_tool), beta)
    assert isinstance(got_np, (np.integer, np.ndarray)) and isinstance(got_jnp, jax.Array)
    # floor() may flip at an exact integer boundary between float32 and float64: allow that one step.
    assert got_np == want and abs(int(got_jnp) - want) <= 1


def test_budget_split_broadcasts_and_is_monotone():
    h_root = np.linspace(-3, 3, 13)
    m = rm.budget_split(np.full(13, 16), h_root, 0.0)
    assert m.shape == (13,) and (np.diff(m) >= 0).all() and m.min() >= 1 and m.max() <= 16
    np.testing.assert_array_equal(rm.budget_split(16, jnp.asarray(h_root), 0.0), m)


def test_branch_probability_hand_values():
    # (0.4 + 0.2 * 1.0) * (1 - 0.05 * 2) = 0.6 * 0.9 = 0.54
    np.testing.assert_allclose(rm.branch_probability(0.4, 1.0, 2), 0.54)
    assert rm.should_branch(0.4, 1.0, 2) and not rm.should_branch(0.4, 1.0, 2, tau=0.55)
    np.testing.assert_allclose(rm.branch_probability(0.9, 2.0, 0), 1.0)  # clipped to 1
    np.testing.assert_allclose(rm.branch_probability(0.9, 2.0, 25), 0.0)  # penalty max(0, 1 - 1.25)
    np.testing.assert_allclose(rm.branch_probability(0.1, -1.0, 0), 0.0)  # clipped to 0
    # ARPO (lam = 0): no penalty however many consecutive branches.
    np.testing.assert_allclose(rm.branch_probability(0.5, 0.5, 10, lam=0.0), 0.6)


def test_branch_probability_numpy_and_jax_agree():
    rng = np.random.default_rng(0)
    u, dh, l = rng.random(50), rng.normal(size=50), rng.integers(0, 30, 50)
    got_np = rm.branch_probability(u, dh, l)
    got_jnp = jax.jit(rm.branch_probability)(jnp.asarray(u), jnp.asarray(dh), jnp.asarray(l))
    want = np.clip((u + 0.2 * dh) * np.maximum(0, 1 - 0.05 * l), 0, 1)
    np.testing.assert_allclose(got_np, want, rtol=1e-12)
    np.testing.assert_allclose(got_jnp, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(rm.should_branch(u, dh, l), want >= 0.5)


def test_segment_entropy():
    h = np.arange(1.0, 31.0)  # 30 tokens, the window keeps the first 20
    ln_v = math.log(151_936)
    np.testing.assert_allclose(rm.segment_entropy(h, vocab_size=151_936), np.mean(h[:20]) / ln_v)
    np.testing.assert_allclose(rm.segment_entropy(h, vocab_size=151_936, reduction="sum"),
                               np.sum(h[:20]) / ln_v)
    mask = np.zeros(30, bool)
    mask[5::2] = True  # the first 20 *valid* tokens are h[5], h[7], ..., h[29] (13 of them)
    np.testing.assert_allclose(rm.segment_entropy(h, mask, vocab_size=151_936), np.mean(h[5::2]) / ln_v)
    np.testing.assert_allclose(rm.segment_entropy(h, mask, vocab_size=151_936, window=3),
                               np.mean([6, 8, 10]) / ln_v)
    assert rm.segment_entropy(h, np.zeros(30, bool), vocab_size=10) == 0.0
    # Batched, jnp, and the uniform distribution's entropy ln|V| normalises to 1.
    batch = jnp.full((4, 25), math.log(100.0))
    np.testing.assert_allclose(rm.segment_entropy(batch, vocab_size=100), np.ones(4), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown reduction 'max'"):
        rm.segment_entropy(h, vocab_size=10, reduction="max")
    with pytest.raises(ValueError, match="mask"):
        rm.segment_entropy(h, np.ones(29), vocab_size=10)

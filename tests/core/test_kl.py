"""KL estimators against their definitions, and against the exact KL of two categoricals."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aepo_jax.core.kl import KL_ESTIMATORS, kl_divergence


def test_estimators_match_definitions():
    rng = np.random.default_rng(0)
    logp, ref = rng.normal(size=(3, 5)) - 2, rng.normal(size=(3, 5)) - 2
    x = logp - ref
    want = {"k1": x, "k2": x**2 / 2, "k3": np.exp(-x) - 1 + x}
    for name, value in want.items():
        got = kl_divergence(jnp.asarray(logp, jnp.float32), jnp.asarray(ref, jnp.float32), name)
        np.testing.assert_allclose(got, value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert (np.asarray(kl_divergence(jnp.asarray(logp), jnp.asarray(ref), "k3")) >= 0).all()
    np.testing.assert_array_equal(kl_divergence(jnp.asarray(logp), jnp.asarray(logp), "k3"), 0.0)


def test_k1_and_k3_are_unbiased_for_the_exact_kl():
    """E_{a ~ pi}[k(a)] = KL(pi || ref) for k1 and k3 (exact expectation over a small vocabulary)."""
    rng = np.random.default_rng(1)
    logp, ref = jax.nn.log_softmax(rng.normal(size=7)), jax.nn.log_softmax(rng.normal(size=7))
    p = np.exp(np.asarray(logp, np.float64))
    exact = np.sum(p * (np.asarray(logp, np.float64) - np.asarray(ref, np.float64)))
    for name in ("k1", "k3"):
        np.testing.assert_allclose(np.sum(p * kl_divergence(logp, ref, name)), exact, rtol=1e-4, err_msg=name)


def test_bad_input():
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k9'; known: \['k1', 'k2', 'k3'\]"):
        kl_divergence(jnp.zeros(3), jnp.zeros(3), "k9")
    with pytest.raises(ValueError, match="ref_logprobs"):
        kl_divergence(jnp.zeros(3), jnp.zeros(4))
    assert sorted(KL_ESTIMATORS) == ["k1", "k2", "k3"]

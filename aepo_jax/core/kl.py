"""Per-token estimators of KL(pi || pi_ref) from samples of pi (Schulman 2020, "Approximating KL
Divergence", http://joschu.net/blog/kl-approx.html; k3 is GRPO's, arXiv 2402.03300).

With log_ratio = log pi(a) - log pi_ref(a) and a ~ pi:
  k1 = log_ratio                               unbiased, high variance, can be negative
  k2 = log_ratio^2 / 2                         biased, low variance, >= 0
  k3 = exp(-log_ratio) - 1 + log_ratio         unbiased, low variance, >= 0
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from aepo_jax.core import checks


def _k1(log_ratio: jax.Array) -> jax.Array:
    return log_ratio


def _k2(log_ratio: jax.Array) -> jax.Array:
    return 0.5 * log_ratio**2


def _k3(log_ratio: jax.Array) -> jax.Array:
    return jnp.expm1(-log_ratio) + log_ratio


KL_ESTIMATORS: dict[str, Callable[[jax.Array], jax.Array]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_divergence(logprobs: jax.Array, ref_logprobs: jax.Array, estimator: str = "k3") -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) (see the module docstring); same shape as the inputs."""
    checks.check_choice(estimator, KL_ESTIMATORS, "KL estimator")
    checks.check_shapes(jnp.shape(logprobs), ref_logprobs=ref_logprobs)
    return KL_ESTIMATORS[estimator](logprobs - ref_logprobs)

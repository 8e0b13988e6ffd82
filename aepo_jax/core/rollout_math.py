"""AEPO's rollout arithmetic (Dong et al. 2025, arXiv 2510.14545, sec. 3.1; AEPO_SPEC sec. 3).

Pure functions on scalars or arrays. Called from the host-side rollout scheduler with Python / NumPy
values they compute in NumPy (no device round trip); given a `jax.Array` (or inside jit) they use jnp.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aepo_jax.core import checks


def _xp(*args: Any):
    return jnp if any(isinstance(a, jax.Array) for a in args) else np


def budget_split(k: Any, h_root: Any, h_tool: Any, beta: float = 0.5) -> Any:
    """Entropy pre-monitoring: number m of global samples out of a budget of k (the rest are branches).

      m = clip(floor(k * sigmoid(beta * (H_root - H_tool))) + 1, 1, k)
    A question more uncertain than its tool results gets more independent samples; uncertain tool
    results get more branch budget. Integer result, shape of the broadcast inputs.
    """
    xp = _xp(k, h_root, h_tool, beta)
    sigmoid = 0.5 * (1.0 + xp.tanh(0.5 * beta * (xp.asarray(h_root) - xp.asarray(h_tool))))
    return xp.clip(xp.floor(k * sigmoid).astype(int) + 1, 1, k)


def branch_probability(u: Any, delta_h: Any, consecutive: Any, gamma: float = 0.2,
                       lam: float = 0.05) -> Any:
    """Entropy-balanced branching probability with the consecutive-branch penalty.

      p = clip((u + gamma * dH) * max(0, 1 - lam * l), 0, 1),   u ~ U(0, 1)
    dH = H_segment - H_initial of the path; l = consecutive tool rounds that already branched.
    ARPO's rule is lam = 0 (arXiv 2507.19849).
    """
    xp = _xp(u, delta_h, consecutive)
    penalty = xp.maximum(0.0, 1.0 - lam * xp.asarray(consecutive))
    return xp.clip((xp.asarray(u) + gamma * xp.asarray(delta_h)) * penalty, 0.0, 1.0)


def should_branch(u: Any, delta_h: Any, consecutive: Any, gamma: float = 0.2, lam: float = 0.05,
                  tau: float = 0.5) -> Any:
    """Branch iff branch_probability(u, dH, l) >= tau (bool, shape of the broadcast inputs)."""
    return branch_probability(u, delta_h, consecutive, gamma, lam) >= tau


def segment_entropy(entropies: Any, mask: Any = None, *, vocab_size: int, window: int = 20,
                    reduction: str = "mean") -> Any:
    """Entropy signal of a generated segment, from its first `window` valid tokens, over the last axis.

      mean: (1 / n) sum_{t in first w} H_t / ln|V|     (AEPO_SPEC 3, our default; 0 when n = 0)
      sum:        sum_{t in first w} H_t / ln|V|     (the released code's scale)
    `entropies` [..., T] are per-token full-vocabulary entropies; `mask` [..., T] marks the segment's
    tokens (default: all).
    """
    checks.check_choice(reduction, ("mean", "sum"), "reduction")
    xp = _xp(entropies, mask)
    entropies = xp.asarray(entropies, dtype=xp.float32)
    mask = xp.ones(entropies.shape, bool) if mask is None else xp.asarray(mask).astype(bool)
    checks.check_shapes(entropies.shape, mask=mask)
    selected = mask & (xp.cumsum(mask, axis=-1) <= window)
    total = xp.sum(xp.where(selected, entropies, 0.0), axis=-1)
    if reduction == "mean":
        total = total / xp.maximum(xp.sum(selected, axis=-1), 1)
    return total / math.log(vocab_size)

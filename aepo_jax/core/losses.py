"""Policy-gradient losses for LLM RL, in one registry with one keyword signature.

    loss, metrics = POLICY_LOSSES[name](logprobs=..., old_logprobs=..., advantages=..., loss_mask=...,
                                        entropies=None, ref_logprobs=None, **hyper_parameters)

Per-token arrays are [N, T] float (log pi_theta, log pi_old, advantages; advantages may also be [N], one
per sequence) and `loss_mask` [N, T] in {0, 1}. r_t = exp(log pi_theta - log pi_old), sg = stop-gradient,
A = advantage. Every entry is `policy_loss` with its own defaults:

| name  | per-token loss (before aggregation)                                        | paper              |
|-------|----------------------------------------------------------------------------|--------------------|
| grpo  | max(-A r, -A clip(r, 1-el, 1+eh)); A<0: min(., -A c)                        | arXiv 2402.03300   |
| dapo  | grpo with clip-higher eh = 0.28                                             | arXiv 2503.14476   |
| gspo  | grpo on s_i = exp(mean_t log r_it), eps 3e-4 / 4e-4, seq-mean-token-mean    | arXiv 2507.18071   |
| cispo | -sg(clip(r, 1-el, 1+eh)) A r/sg(r)   (gradient of -sg(w) A log pi)          | arXiv 2506.13585   |
| gppo  | grpo with clip(r, (1-el) r/sg(r), (1+eh) r/sg(r))                           | arXiv 2508.07629   |
| arpo  | grpo (ARPO changes the rollout and, optionally, the advantages)             | arXiv 2507.19849   |
| aepo  | grpo with upper bound (1+eh) r/sg(r): clipped tokens keep gradient (1+eh)   | arXiv 2510.14545   |

Gradient of the loss with respect to log pi_theta(a_t), per token and before the aggregation weight
(PPO family): -A r inside the clip range; 0 for A > 0, r > 1+eh (AEPO, GPPO: -A (1+eh)); 0 for A < 0,
r < 1-el (GPPO: -A (1-el)); 0 in the dual-clip region (A < 0, r > c).

Aggregation (`aggregation`), with w_t the weight of token t (0 on masked tokens) and L = sum_t w_t l_t:
  token-mean           w = 1 / #valid tokens of the batch (DAPO, AEPO; the default)
  seq-mean-token-mean  w = 1 / (#sequences * #valid tokens of t's sequence) (GRPO paper, GSPO)
  seq-mean-token-sum   w = 1 / #sequences
  constant             w = 1 / loss_normalizer, a fixed number (Dr. GRPO, arXiv 2503.20783)
Counts are over the GLOBAL batch when `axis_name` is given (psum inside shard_map / pmap). Sequences are
rows, or (packed rows) runs of equal `segment_ids`.

Optional terms: + kl_coef * agg(KL_t(pi || pi_ref)) with the k1 / k2 / k3 estimator (needs
`ref_logprobs`), and - entropy_coef * agg(H_t) (needs differentiable `entropies`).

Non-finite inputs: a valid token where any given input is NaN / inf is dropped from the loss (as if its
mask were 0) and counted in `metrics["nonfinite_fraction"]`; the loss and its gradient stay finite.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from aepo_jax.core import checks
from aepo_jax.core.kl import KL_ESTIMATORS, kl_divergence
from aepo_jax.core.reductions import (count_sequences, masked_mean, masked_sum, masked_zscore, psum,
                                      sequence_sum)

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "constant")
SURROGATES = ("ppo", "cispo")
RATIO_LEVELS = ("token", "sequence")

_sg = lax.stop_gradient


def aggregation_weights(
    loss_mask: jax.Array,
    aggregation: str = "token-mean",
    *,
    segment_ids: jax.Array | None = None,
    loss_normalizer: float | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    """Token weights w [N, T] (0 on masked tokens, no gradient) such that loss = psum(sum_t w_t l_t).

    See the module docstring for the four modes. Empty batches give weights 0 (no division by zero).
    """
    checks.check_choice(aggregation, AGGREGATIONS, "aggregation")
    mask = jnp.asarray(loss_mask).astype(bool)
    ones = mask.astype(jnp.float32)
    if aggregation == "token-mean":
        weights = ones / jnp.maximum(masked_sum(ones, mask, axis_name), 1.0)
    elif aggregation == "constant":
        if loss_normalizer is None or not loss_normalizer > 0:
            raise ValueError(f"aggregation='constant' needs loss_normalizer > 0, got {loss_normalizer}")
        weights = ones / loss_normalizer
    else:
        weights = ones / jnp.maximum(count_sequences(mask, segment_ids, axis_name), 1.0)
        if aggregation == "seq-mean-token-mean":
            weights = weights / jnp.maximum(sequence_sum(ones, mask, segment_ids), 1.0)
    return _sg(weights)


def clipped_surrogate(
    ratio: jax.Array,
    advantages: jax.Array,
    *,
    clip_eps_low: float,
    clip_eps_high: float,
    dual_clip: float | None = None,
    preserve_low: bool = False,
    preserve_high: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv 1707.06347) per token, with options.

      l_t = max(-A r, -A clip(r, lo, hi));   A < 0 and dual_clip c:  l_t = min(l_t, -A c)
    (dual clip: Ye et al. 2020, arXiv 1912.09729). Bounds are lo = 1 - eps_low and hi = 1 + eps_high, or,
    gradient-preserving, lo = (1 - eps_low) r / sg(r) and hi = (1 + eps_high) r / sg(r): same forward
    value, but a clipped token keeps the gradient (1 -+ eps) grad log pi instead of 0 (GPPO, arXiv
    2508.07629 both sides; AEPO, arXiv 2510.14545 sec. 3.2 the upper side).
    Returns the per-token loss and the boolean masks of the active clips: low (A < 0, r < 1 - eps_low),
    high (A > 0, r > 1 + eps_high), dual (the dual clip bound the loss).
    """
    carrier = ratio / _sg(ratio)  # value 1, gradient d log pi
    lo = (1.0 - clip_eps_low) * (carrier if preserve_low else 1.0)
    hi = (1.0 + clip_eps_high) * (carrier if preserve_high else 1.0)
    below, above = ratio < 1.0 - clip_eps_low, ratio > 1.0 + clip_eps_high
    clipped = jnp.where(above, hi, jnp.where(below, lo, ratio))
    unclipped_loss, clipped_loss = -advantages * ratio, -advantages * clipped
    loss = jnp.where(clipped_loss > unclipped_loss, clipped_loss, unclipped_loss)
    flags = {"low": below & (advantages < 0), "high": above & (advantages > 0)}
    if dual_clip is None:
        flags["dual"] = jnp.zeros_like(below)
    else:
        bound = -advantages * dual_clip
        flags["dual"] = (advantages < 0) & (loss > bound)
        loss = jnp.where(flags["dual"], bound, loss)
    return loss, flags


def cispo_surrogate(
    ratio: jax.Array, advantages: jax.Array, *, clip_eps_low: float, clip_eps_high: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CISPO (MiniMax-M1, arXiv 2506.13585): clip the importance weight, never the gradient.

      l_t = -sg(clip(r, 1 - eps_low, 1 + eps_high)) A r / sg(r)
    Its gradient equals that of the paper's -sg(clip(r)) A log pi; r / sg(r) (value 1) replaces log pi so
    the reported value, -clip(r) A, is comparable with the other losses. Flags mark truncated weights.
    """
    weight = _sg(jnp.clip(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high))
    flags = {"low": ratio < 1.0 - clip_eps_low, "high": ratio > 1.0 + clip_eps_high}
    flags["dual"] = jnp.zeros_like(flags["low"])
    return -advantages * weight * ratio / _sg(ratio), flags


def policy_loss(
    *,
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    loss_mask: jax.Array,
    entropies: jax.Array | None = None,
    ref_logprobs: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    surrogate: str = "ppo",
    ratio_level: str = "token",
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip: float | None = 3.0,
    preserve_low: bool = False,
    preserve_high: bool = False,
    aggregation: str = "token-mean",
    loss_normalizer: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    high_entropy_z: float = 1.0,
    axis_name: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The policy loss behind every `POLICY_LOSSES` entry (defaults = GRPO); see the module docstring.

    Args:
      logprobs: [N, T] log pi_theta(a_t) (differentiable), e.g. from `token_logprobs_and_entropy`.
      old_logprobs: [N, T] log pi_old(a_t) of the policy that sampled the tokens.
      advantages: [N, T] or [N] (one per sequence).
      loss_mask: [N, T] in {0, 1} (or bool): 1 = token sampled by the policy.
      entropies: optional [N, T] policy entropies H_t: entropy bonus and entropy metrics.
      ref_logprobs: optional [N, T] log pi_ref(a_t): KL penalty and metric.
      segment_ids: optional [N, T] ints in [0, T): packed rows, sequences are runs of equal ids.
      surrogate: "ppo" (clipped_surrogate) or "cispo" (cispo_surrogate).
      ratio_level: "token" (r_t) or "sequence" (GSPO-token, arXiv 2507.18071:
        s_t = sg(s_i) pi(a_t) / sg(pi(a_t)) with s_i = exp(mean of log r over sequence i)).
      clip_eps_low, clip_eps_high: clip range [1 - eps_low, 1 + eps_high].
      dual_clip: c > 1 bounding the loss of A < 0 tokens at -A c; None to disable (ppo only).
      preserve_low, preserve_high: gradient-preserving bounds (ppo only), see `clipped_surrogate`.
      aggregation, loss_normalizer: see `aggregation_weights`.
      kl_coef, kl_estimator: weight and estimator ("k1" / "k2" / "k3") of the KL to the reference.
      entropy_coef: weight of the entropy bonus (subtracted from the loss).
      high_entropy_z: a token is "high-entropy" (for metrics) when its batch z-score exceeds this.
      axis_name: psum axis inside shard_map / pmap; counts and statistics become global.

    Returns:
      (loss, metrics): a float32 scalar and a dict of float32 scalars (no gradient): pg_loss, kl,
      entropy_mean, entropy_std, clipfrac_low / high / dual, high_entropy_clipfrac, approx_kl
      (KL(pi_old || pi_theta), k3), ratio_mean / min / max, nonfinite_fraction, num_tokens.
    """
    checks.check_choice(surrogate, SURROGATES, "surrogate")
    checks.check_choice(ratio_level, RATIO_LEVELS, "ratio_level")
    checks.check_choice(kl_estimator, KL_ESTIMATORS, "KL estimator")
    if surrogate == "cispo" and (dual_clip is not None or preserve_low or preserve_high):
        raise ValueError("surrogate='cispo' takes no dual_clip / preserve_low / preserve_high")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    if jnp.ndim(logprobs) != 2:
        raise ValueError(f"logprobs must be [N, T], got shape {jnp.shape(logprobs)}")
    shape = jnp.shape(logprobs)
    if jnp.ndim(advantages) == 1:
        checks.check_shapes(shape[:1], advantages=advantages)
        advantages = jnp.broadcast_to(jnp.asarray(advantages)[:, None], shape)
    checks.check_shapes(shape, old_logprobs=old_logprobs, advantages=advantages, loss_mask=loss_mask,
                        entropies=entropies, ref_logprobs=ref_logprobs, segment_ids=segment_ids)
    _check_coef_input(kl_coef, ref_logprobs, "kl_coef", "ref_logprobs")
    _check_coef_input(entropy_coef, entropies, "entropy_coef", "entropies")
    mask = checks.check_binary_mask(loss_mask)

    # Drop valid tokens with a non-finite input; zero every unused entry so no NaN reaches a gradient.
    inputs = {"logprobs": logprobs, "old_logprobs": old_logprobs, "advantages": advantages,
              "entropies": entropies, "ref_logprobs": ref_logprobs}
    inputs = {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items() if v is not None}
    finite = functools.reduce(jnp.logical_and, [jnp.isfinite(v) for v in inputs.values()])
    valid = mask & finite
    x = {k: jnp.where(valid, v, 0.0) for k, v in inputs.items()}

    log_ratio = x["logprobs"] - x["old_logprobs"]
    if ratio_level == "sequence":
        seq_log_ratio = sequence_sum(log_ratio, valid, segment_ids) / jnp.maximum(
            sequence_sum(jnp.ones(shape), valid, segment_ids), 1.0)
        log_ratio = _sg(seq_log_ratio) + x["logprobs"] - _sg(x["logprobs"])
    ratio = jnp.exp(log_ratio)
    if surrogate == "ppo":
        token_loss, clips = clipped_surrogate(
            ratio, x["advantages"], clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high,
            dual_clip=dual_clip, preserve_low=preserve_low, preserve_high=preserve_high)
    else:
        token_loss, clips = cispo_surrogate(
            ratio, x["advantages"], clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high)

    weights = aggregation_weights(valid, aggregation, segment_ids=segment_ids,
                                  loss_normalizer=loss_normalizer, axis_name=axis_name)
    aggregate = lambda values: psum(jnp.sum(weights * values), axis_name)

    loss = aggregate(token_loss)
    metrics = {"pg_loss": loss}
    if "ref_logprobs" in x:
        token_kl = kl_divergence(x["logprobs"], x["ref_logprobs"], kl_estimator)
        loss = loss + kl_coef * aggregate(token_kl)
        metrics["kl"] = masked_mean(token_kl, valid, axis_name)
    if "entropies" in x:
        loss = loss - entropy_coef * aggregate(x["entropies"])
    metrics.update(_metrics(_sg(ratio), clips, x.get("entropies"), mask, valid,
                            high_entropy_z=high_entropy_z, axis_name=axis_name))
    return loss, jax.tree.map(_sg, metrics)


def _metrics(ratio, clips, entropies, mask, valid, *, high_entropy_z, axis_name):
    """Diagnostics over the valid tokens of the global batch (see `policy_loss`)."""
    mean = lambda values: masked_mean(values, valid, axis_name)
    count = lambda m: masked_sum(jnp.ones(m.shape), m, axis_name)
    pmin = lambda v: v if axis_name is None else lax.pmin(v, axis_name)
    pmax = lambda v: v if axis_name is None else lax.pmax(v, axis_name)
    num_tokens = count(valid)
    any_clip = (clips["low"] | clips["high"] | clips["dual"]).astype(jnp.float32)
    metrics = {f"clipfrac_{side}": mean(flag.astype(jnp.float32)) for side, flag in clips.items()}
    metrics.update({
        "approx_kl": mean(ratio - 1.0 - jnp.log(ratio)),  # k3 of KL(pi_old || pi_theta)
        "ratio_mean": mean(ratio),
        "ratio_min": jnp.where(num_tokens > 0, pmin(jnp.min(jnp.where(valid, ratio, jnp.inf))), 0.0),
        "ratio_max": jnp.where(num_tokens > 0, pmax(jnp.max(jnp.where(valid, ratio, -jnp.inf))), 0.0),
        "nonfinite_fraction": count(mask & ~valid) / jnp.maximum(count(mask), 1.0),
        "num_tokens": num_tokens,
    })
    if entropies is not None:
        high = valid & (masked_zscore(entropies, valid, axis_name) > high_entropy_z)
        metrics["entropy_mean"] = mean(entropies)
        metrics["entropy_std"] = jnp.sqrt(mean((entropies - metrics["entropy_mean"]) ** 2))
        metrics["high_entropy_clipfrac"] = masked_mean(any_clip, high, axis_name)
    return metrics


def _check_coef_input(coef: Any, array: Any, coef_name: str, array_name: str) -> None:
    value = checks.concrete_value(coef)
    if array is None and (value is None or value != 0):
        raise ValueError(f"{coef_name}={coef} needs {array_name}")


class _Registry(dict):
    """A dict whose missing-key error lists the known names."""

    def __missing__(self, name):
        raise KeyError(f"unknown policy loss {name!r}; known: {sorted(self)}")


def _entry(doc: str, **defaults):
    fn = functools.partial(policy_loss, **defaults)
    fn.__doc__ = doc + "\n\nSame keyword signature as `policy_loss`; these defaults differ: " + repr(defaults)
    return fn


POLICY_LOSSES: dict[str, Any] = _Registry(
    grpo=_entry("GRPO (Shao et al. 2024, arXiv 2402.03300): PPO clip eps 0.2 / 0.2 + dual clip c = 3."),
    dapo=_entry("DAPO (Yu et al. 2025, arXiv 2503.14476): clip-higher eps 0.2 / 0.28, token-mean. "
                "Dynamic sampling and the overlong penalty live in `advantages`.", clip_eps_high=0.28),
    gspo=_entry("GSPO (Zheng et al. 2025, arXiv 2507.18071): sequence ratio s_i = exp(mean_t log r_it),"
                " clipped to [1 - 3e-4, 1 + 4e-4], seq-mean-token-mean.", ratio_level="sequence",
                clip_eps_low=3e-4, clip_eps_high=4e-4, dual_clip=None,
                aggregation="seq-mean-token-mean"),
    cispo=_entry("CISPO (MiniMax 2025, arXiv 2506.13585): clipped, stop-gradient importance weight; "
                 "no lower bound by default (eps_low = 1), eps_high = 0.28.", surrogate="cispo",
                 clip_eps_low=1.0, clip_eps_high=0.28, dual_clip=None),
    gppo=_entry("GPPO (Su et al. 2025, arXiv 2508.07629): gradient-preserving clip on both sides.",
                preserve_low=True, preserve_high=True),
    arpo=_entry("ARPO (Dong et al. 2025, arXiv 2507.19849): the GRPO loss; use "
                "`advantages.hard_attribution_advantages` for hard attribution."),
    aepo=_entry("AEPO (Dong et al. 2025, arXiv 2510.14545): gradient-preserving upper clip "
                "(1 + eps_h) r / sg(r), dual clip kept; pair with `entropy_aware_advantages`.",
                preserve_high=True),
)

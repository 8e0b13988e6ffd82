"""Advantage estimators and reward shaping for outcome-reward RL of LLMs.

Layout: a batch holds N trajectories; sequence-level arrays are [N] with the k samples of each question
stored contiguously (`group_size` = k, N a multiple of k); token-level arrays are [N, T] with a 0/1
`loss_mask` (1 = token the policy sampled). Functions that normalise over the whole batch take an optional
`axis_name` and psum their statistics, so inside `shard_map` / `pmap` they use the GLOBAL batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from aepo_jax.core import checks
from aepo_jax.core.reductions import masked_zscore


def _groups(rewards: jax.Array, group_size: int) -> jax.Array:
    """rewards [N] -> float32 [N / group_size, group_size]."""
    n = jnp.shape(rewards)[0]
    if jnp.ndim(rewards) != 1 or group_size < 1 or n % group_size:
        raise ValueError(f"rewards must be [N] with N a multiple of group_size; got shape "
                         f"{jnp.shape(rewards)} and group_size={group_size}")
    return jnp.asarray(rewards, jnp.float32).reshape(-1, group_size)


def grpo_advantages(rewards: jax.Array, group_size: int, *, scale_by_std: bool = True,
                    eps: float = 1e-6) -> jax.Array:
    """Group-normalised advantage (GRPO, Shao et al. 2024, arXiv 2402.03300), [N].

      A_i = (R_i - mean_g R) / (std_g R + eps)      std unbiased (k - 1), per question group g
      A_i =  R_i - mean_g R                         when scale_by_std=False
    Invariant to shifting the rewards and (up to eps) to scaling them by a positive constant.
    """
    r = _groups(rewards, group_size)
    centred = r - jnp.mean(r, axis=1, keepdims=True)
    if scale_by_std:
        std = jnp.sqrt(jnp.sum(centred**2, axis=1, keepdims=True) / max(group_size - 1, 1))
        centred = centred / (std + eps)
    return centred.reshape(-1)


def dr_grpo_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
    """Dr. GRPO advantage (Liu et al. 2025, arXiv 2503.20783): A_i = R_i - mean_g R, no std division.

    The other half of Dr. GRPO is the loss aggregation without length normalisation: use
    `aggregation="constant"` with `loss_normalizer` = (sequences x max response length) in the loss.
    """
    return grpo_advantages(rewards, group_size, scale_by_std=False)


def rloo_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024, arXiv 2402.14740), [N].

      A_i = R_i - (1 / (k - 1)) sum_{j != i, j in g} R_j  =  k / (k - 1) (R_i - mean_g R)
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs group_size >= 2, got {group_size}")
    r = _groups(rewards, group_size)
    baseline = (jnp.sum(r, axis=1, keepdims=True) - r) / (group_size - 1)
    return (r - baseline).reshape(-1)


def reinforce_pp_advantages(
    rewards: jax.Array,
    loss_mask: jax.Array,
    *,
    group_size: int | None = None,
    token_kl: jax.Array | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    axis_name: str | None = None,
) -> jax.Array:
    """REINFORCE++ advantage (Hu 2025, arXiv 2501.03262), [N, T], 0 on masked tokens.

      r_t = R 1[t = last valid token] - kl_coef * KL_t          (per-token KL penalty in the reward)
      G_t = sum_{s >= t, valid} gamma^(#valid tokens in (t, s]) r_s        (return-to-go)
      A_t = (G_t - mean G) / std G      over the valid tokens of the global batch (not per group)
    With `group_size` set (REINFORCE++-baseline), R is first replaced by R - mean_g R.
    Discounting skips masked (tool-result) tokens: they are not actions of the policy. `token_kl` is the
    caller's per-token estimate, e.g. `kl.kl_divergence(old_logprobs, ref_logprobs, "k1")`. The whitening
    uses the unbiased std, with std = 0 -> 1.
    """
    n, t = jnp.shape(loss_mask)
    checks.check_shapes((n,), rewards=rewards)
    checks.check_shapes((n, t), token_kl=token_kl)
    mask = checks.check_binary_mask(loss_mask)
    rewards = jnp.asarray(rewards, jnp.float32)
    if group_size is not None:
        rewards = dr_grpo_advantages(rewards, group_size)
    last = t - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    token_rewards = jnp.where(jnp.arange(t) == last[:, None], rewards[:, None], 0.0)
    if token_kl is not None:
        token_rewards = token_rewards - kl_coef * token_kl
    token_rewards = jnp.where(mask, token_rewards, 0.0)

    # G_t = b_t + a_t G_{t+1} with (a, b) = (gamma, r_t) on valid tokens and (1, 0) on masked ones: a
    # linear recurrence, solved right to left by an associative scan over composed affine maps.
    def compose(later, current):
        return current[0] * later[0], current[1] + current[0] * later[1]

    decay = jnp.where(mask, gamma, 1.0)
    _, returns = lax.associative_scan(compose, (decay[:, ::-1], token_rewards[:, ::-1]), axis=1)
    return masked_zscore(returns[:, ::-1], mask, axis_name)


def entropy_aware_advantages(
    advantages: jax.Array,
    entropies: jax.Array,
    loss_mask: jax.Array,
    *,
    alpha: float = 0.2,
    axis_name: str | None = None,
) -> jax.Array:
    """AEPO entropy-aware advantage (Dong et al. 2025, arXiv 2510.14545, sec. 3.2), [N, T].

      z_t = (H_t - mean H) / std H    over the valid tokens of the global batch (psum over `axis_name`),
                                      std unbiased, std = 0 -> 1
      A_t = A_acc * (1 + alpha * sg(z_t))
    `advantages` is A_acc, [N] (one per trajectory, e.g. `grpo_advantages`) or [N, T]; `entropies` are the
    current policy's full-vocabulary entropies H_t [N, T]. Masked tokens get 0. Valid tokens whose entropy
    is not finite are left out of the statistics and get z = 0 (the loss reports them as non-finite).
    For the released code's per-micro-batch statistics, call it per micro-batch without `axis_name`.
    """
    checks.check_shapes(jnp.shape(loss_mask), entropies=entropies)
    mask = checks.check_binary_mask(loss_mask)
    advantages = jnp.asarray(advantages, jnp.float32)
    if advantages.ndim == 1:
        checks.check_shapes(jnp.shape(loss_mask)[:1], advantages=advantages)
        advantages = advantages[:, None]
    else:
        checks.check_shapes(jnp.shape(loss_mask), advantages=advantages)
    entropies = lax.stop_gradient(jnp.asarray(entropies, jnp.float32))
    z = masked_zscore(entropies, mask & jnp.isfinite(entropies), axis_name)
    return jnp.where(mask, advantages * (1.0 + alpha * z), 0.0)


def hard_attribution_advantages(
    advantages: jax.Array, parent: jax.Array, branch_point: jax.Array, seq_len: int
) -> jax.Array:
    """ARPO hard attribution (Dong et al. 2025, arXiv 2507.19849), [N, T = seq_len].

    Rows form a forest: `parent[i]` is the row row i branched from (-1 for a root) and `branch_point[i]`
    the number of leading tokens (prompt included) row i shares with its parent. A token is shared by every
    row that copied it; its advantage is the mean sequence advantage of those rows:
      A[i, t] = mean{ A_j : rows i and j share their first t + 1 tokens }
    so a token only one trajectory holds keeps that trajectory's advantage. Vectorised in jnp (jit-safe):
    one `while_loop` step per tree level, O(N^2 + N T) memory. The tree is validated when concrete.
    """
    n = jnp.shape(advantages)[0]
    checks.check_shapes((n,), advantages=advantages, parent=parent, branch_point=branch_point)
    _check_forest(parent, branch_point, seq_len)
    advantages = jnp.asarray(advantages, jnp.float32)
    parent = jnp.asarray(parent, jnp.int32)
    branch_point = jnp.asarray(branch_point, jnp.int32)
    rows, positions = jnp.arange(n), jnp.arange(seq_len)

    # Climb every row's ancestor chain in lock step. `node[j]` is the current ancestor of row j and
    # `length[j]` how many leading tokens j shares with it. shared[j, a] = that length (0: not an ancestor);
    # owner[j, t] = the highest ancestor still holding token t of row j, i.e. the row that generated it.
    def climb(state):
        node, length, shared, owner = state
        live = node >= 0
        shared = shared.at[rows, jnp.where(live, node, n)].set(length, mode="drop")
        owner = jnp.where(live[:, None] & (positions < length[:, None]), node[:, None], owner)
        safe = jnp.maximum(node, 0)
        return (jnp.where(live, parent[safe], -1), jnp.minimum(length, branch_point[safe]), shared, owner)

    state = (rows, jnp.full((n,), seq_len, jnp.int32), jnp.zeros((n, n), jnp.int32),
             jnp.broadcast_to(rows[:, None], (n, seq_len)))
    _, _, shared, owner = lax.while_loop(lambda s: jnp.any(s[0] >= 0), climb, state)

    # Rows holding token t of row a: those j with shared[j, a] > t. Histogram over the shared length,
    # then a reverse cumulative sum gives the sum / count for every (a, t).
    cols = jnp.broadcast_to(rows[None, :], (n, n))
    hist = jnp.zeros((n, seq_len + 1), jnp.float32)
    sums = hist.at[cols, shared].add(jnp.broadcast_to(advantages[:, None], (n, n)))
    counts = hist.at[cols, shared].add(1.0)
    tail = lambda x: jnp.cumsum(x[:, ::-1], axis=1)[:, ::-1][:, 1:]  # sum over lengths > t
    return tail(sums)[owner, positions] / tail(counts)[owner, positions]


def _check_forest(parent, branch_point, seq_len: int) -> None:
    """ValueError unless parent/branch_point (when concrete) describe a forest with valid branch points."""
    p, b = checks.concrete_value(parent), checks.concrete_value(branch_point)
    if p is None or b is None:
        return
    n = p.shape[0]
    if ((p < -1) | (p >= n) | (p == np.arange(n))).any():
        raise ValueError(f"parent must hold -1 or another row's index in [0, {n}), got {p.tolist()}")
    if ((b < 0) | (b > seq_len)).any():
        raise ValueError(f"branch_point must be in [0, seq_len={seq_len}], got {b.tolist()}")
    node = np.arange(n)
    for _ in range(n):
        node = np.where(node >= 0, p[np.maximum(node, 0)], -1)
    if (node >= 0).any():
        raise ValueError(f"parent links contain a cycle (rows {np.flatnonzero(node >= 0).tolist()})")


def dynamic_sampling_mask(rewards: jax.Array, group_size: int) -> jax.Array:
    """DAPO dynamic sampling (Yu et al. 2025, arXiv 2503.14476): True for rows whose group has at least
    two distinct rewards. Groups with identical rewards have zero GRPO advantage and are dropped (or
    re-sampled) by the caller. [N] bool."""
    r = _groups(rewards, group_size)
    keep = jnp.max(r, axis=1) > jnp.min(r, axis=1)
    return jnp.repeat(keep, group_size)


def overlong_penalty(lengths: jax.Array, *, max_length: int, cache_length: int) -> jax.Array:
    """DAPO soft overlong punishment (Yu et al. 2025, arXiv 2503.14476), added to the reward.

      R_len(L) = 0                                  L <= L_max - L_cache
                 ((L_max - L_cache) - L) / L_cache  L_max - L_cache < L <= L_max
                 -1                                 L > L_max
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"need 0 < cache_length <= max_length, got {cache_length}, {max_length}")
    lengths = jnp.asarray(lengths, jnp.float32)
    soft = jnp.minimum((max_length - cache_length - lengths) / cache_length, 0.0)
    return jnp.where(lengths > max_length, -1.0, soft)

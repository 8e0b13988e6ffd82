"""Advantages: float64 NumPy references written from the formulas, invariants, sharding, bad input."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from aepo_jax.core import advantages as adv
from tests.core import helpers


def np_group_norm(rewards, k, scale=True):
    out = np.zeros(len(rewards))
    for start in range(0, len(rewards), k):
        g = np.asarray(rewards[start:start + k], np.float64)
        out[start:start + k] = (g - g.mean()) / ((g.std(ddof=1) + 1e-6) if scale else 1.0)
    return out


def np_zscore(x, mask):
    v = x[mask.astype(bool)]
    std = v.std(ddof=1) if v.size > 1 else 0.0
    return np.where(mask, (x - v.mean()) / (std if std > 0 else 1.0), 0.0)


rewards_st = st.lists(st.floats(-3, 3, allow_nan=False), min_size=8, max_size=8)


@settings(max_examples=15)
@given(rewards=rewards_st, shift=st.floats(-100, 100), scale=st.floats(0.1, 50))
def test_group_normalised_matches_numpy_and_is_shift_scale_invariant(rewards, shift, scale):
    r = np.asarray(rewards)
    for k in (2, 4):
        got = adv.grpo_advantages(jnp.asarray(r), k)
        np.testing.assert_allclose(got, np_group_norm(r, k), rtol=1e-4, atol=1e-4)
        moved = adv.grpo_advantages(jnp.asarray(r * scale + shift), k)
        # Invariant up to eps = 1e-6 in the denominator and float32 rounding of the shifted rewards.
        np.testing.assert_allclose(moved, got, rtol=1e-3, atol=2e-3 * (1 + abs(shift) / scale))
        np.testing.assert_allclose(adv.grpo_advantages(jnp.asarray(r + shift), k, scale_by_std=False),
                                   np_group_norm(r, k, scale=False), atol=1e-4 * (1 + abs(shift)))
        np.testing.assert_allclose(adv.dr_grpo_advantages(jnp.asarray(r), k), np_group_norm(r, k, False),
                                   atol=1e-6)


def test_grpo_hand_values():
    got = adv.grpo_advantages(jnp.array([1.0, 0.0, 0.0, 0.0, 2.0, 2.0]), 3)
    # group 1: mean 1/3, unbiased std sqrt(1/3); group 2: mean 4/3, std sqrt(4/3).
    s1, s2 = np.sqrt(1 / 3), np.sqrt(4 / 3)
    want = [2 / 3 / s1, -1 / 3 / s1, -1 / 3 / s1, -4 / 3 / s2, 2 / 3 / s2, 2 / 3 / s2]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_array_equal(adv.grpo_advantages(jnp.ones(4), 2), 0.0)  # identical rewards


def test_rloo_leave_one_out():
    r = np.array([1.0, 0.0, 3.0, 2.0, -1.0, 5.0])
    want = [r[i] - np.mean([r[j] for j in range(3 * (i // 3), 3 * (i // 3) + 3) if j != i])
            for i in range(6)]
    np.testing.assert_allclose(adv.rloo_advantages(jnp.asarray(r), 3), want, rtol=1e-6)
    with pytest.raises(ValueError, match="group_size >= 2"):
        adv.rloo_advantages(jnp.asarray(r), 1)


def np_reinforce_pp(rewards, mask, k=None, kl=None, kl_coef=0.0, gamma=1.0):
    rewards = np.asarray(rewards, np.float64).copy()
    if k:
        for s in range(0, len(rewards), k):
            rewards[s:s + k] -= rewards[s:s + k].mean()
    n, t = mask.shape
    returns = np.zeros((n, t))
    for i in range(n):
        valid = [j for j in range(t) if mask[i, j]]
        r = {j: (-kl_coef * kl[i, j] if kl is not None else 0.0) for j in valid}
        if valid:
            r[valid[-1]] += rewards[i]
        for a, j in enumerate(valid):
            returns[i, j] = sum(gamma**b * r[valid[a + b]] for b in range(len(valid) - a))
    return np_zscore(returns, mask)


@pytest.mark.parametrize("k,gamma,kl_coef", [(None, 1.0, 0.0), (3, 1.0, 0.0), (None, 0.9, 0.1),
                                             (3, 0.95, 0.05)])
def test_reinforce_pp_matches_numpy(k, gamma, kl_coef):
    rng = np.random.default_rng(1)
    mask = rng.random((6, 9)) < 0.6  # holes = tool-result tokens in the middle of a trajectory
    mask[2] = False
    rewards, kl = rng.normal(size=6), rng.normal(size=(6, 9))
    got = adv.reinforce_pp_advantages(jnp.asarray(rewards), jnp.asarray(mask), group_size=k,
                                      token_kl=jnp.asarray(kl), kl_coef=kl_coef, gamma=gamma)
    np.testing.assert_allclose(got, np_reinforce_pp(rewards, mask, k, kl, kl_coef, gamma), rtol=1e-5,
                               atol=1e-5)


def np_entropy_aware(a_acc, entropies, mask, alpha):
    return np.where(mask, a_acc[:, None] * (1 + alpha * np_zscore(entropies, mask)), 0.0)


def test_entropy_aware_matches_numpy_and_stops_gradient():
    rng = np.random.default_rng(2)
    mask = rng.random((5, 7)) < 0.7
    h, a = rng.uniform(0, 4, (5, 7)), rng.normal(size=5)
    got = adv.entropy_aware_advantages(jnp.asarray(a), jnp.asarray(h), jnp.asarray(mask), alpha=0.2)
    np.testing.assert_allclose(got, np_entropy_aware(a, h, mask, 0.2), rtol=1e-5, atol=1e-6)
    per_token = adv.entropy_aware_advantages(jnp.broadcast_to(jnp.asarray(a)[:, None], (5, 7)),
                                             jnp.asarray(h), jnp.asarray(mask))
    np.testing.assert_allclose(per_token, got, rtol=1e-6)
    grad = jax.grad(lambda e: jnp.sum(adv.entropy_aware_advantages(jnp.asarray(a), e, mask)))(jnp.asarray(h))
    np.testing.assert_array_equal(grad, 0.0)  # sg(z_t)
    # Constant entropy: std = 0 -> 1, z = 0, A unchanged on valid tokens.
    flat = adv.entropy_aware_advantages(jnp.asarray(a), jnp.ones((5, 7)), jnp.asarray(mask))
    np.testing.assert_allclose(flat, np.where(mask, a[:, None], 0.0), rtol=1e-7)
    # A non-finite entropy on a valid token stays out of the statistics and keeps A_acc.
    bad = h.copy()
    bad[0, 0], mask[0, 0] = np.nan, True
    got = adv.entropy_aware_advantages(jnp.asarray(a), jnp.asarray(bad), jnp.asarray(mask))
    stats_mask = mask.copy()
    stats_mask[0, 0] = False
    want = np.where(mask, a[:, None] * (1 + 0.2 * np_zscore(np.nan_to_num(bad), stats_mask)), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


class EntropyAwareVariantsTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_transforms(self):
        rng = np.random.default_rng(3)
        mask = jnp.asarray(rng.random((4, 6)) < 0.7)
        h, a = jnp.asarray(rng.uniform(0, 4, (4, 6)), jnp.float32), jnp.asarray(rng.normal(size=4), jnp.float32)
        pmapped = self.variant.type == chex.ChexVariantType.WITH_PMAP
        # Under pmap every device holds a copy of the batch; psum'd statistics of 8 copies are unchanged
        # except the unbiased (n - 1) variance: the test's reference accounts for that.
        fn = self.variant(lambda a, h, m: adv.entropy_aware_advantages(
            a, h, m, alpha=0.3, axis_name="i" if pmapped else None))
        got = fn(a, h, mask)
        if pmapped:
            m = np.asarray(mask)
            v = np.asarray(h)[m]
            n = v.size
            z = (np.asarray(h) - v.mean()) / np.sqrt(np.sum((v - v.mean()) ** 2) * 8 / (8 * n - 1))
            want = np.where(m, np.asarray(a)[:, None] * (1 + 0.3 * z), 0.0)
        else:
            want = np_entropy_aware(np.asarray(a), np.asarray(h), np.asarray(mask), 0.3)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_sharded_statistics_equal_single_device():
    """shard_map over 8 devices (psum'd mean / variance) == one device, for AEPO and REINFORCE++."""
    rng = np.random.default_rng(4)
    mask = rng.random((16, 5)) < 0.6
    mask[5] = False  # an empty row on one device
    a, h = rng.normal(size=16).astype(np.float32), rng.uniform(0, 4, (16, 5)).astype(np.float32)
    r, kl = rng.normal(size=16).astype(np.float32), rng.normal(size=(16, 5)).astype(np.float32)

    def both(a, h, m, r, kl, axis_name=None):
        return (adv.entropy_aware_advantages(a, h, m, axis_name=axis_name),
                adv.reinforce_pp_advantages(r, m, token_kl=kl, kl_coef=0.1, axis_name=axis_name))

    args = (a, h, jnp.asarray(mask), r, kl)
    sharded = helpers.shard_rows(lambda *x: both(*x, axis_name=helpers.AXIS), 5,
                                 out_specs=(helpers.P(helpers.AXIS), helpers.P(helpers.AXIS)))
    chex.assert_trees_all_close(sharded(*args), both(*args), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(both(*args)[0], np_entropy_aware(a, h, mask, 0.2), rtol=1e-5, atol=1e-6)


def np_hard_attribution(a, parent, branch_point, seq_len):
    """Brute force: row j holds token t of row i iff their common prefix is longer than t."""
    n = len(a)

    def chain(i):  # [(ancestor-or-self, tokens shared with it)], from i up to its root
        out, length = [(i, seq_len)], seq_len
        while parent[i] >= 0:
            length = min(length, branch_point[i])
            i = parent[i]
            out.append((i, length))
        return out

    def common_prefix(i, j):
        ci, cj = dict(chain(i)), dict(chain(j))
        shared = [min(ci[x], cj[x]) for x in ci if x in cj]
        return max(shared) if shared else 0

    cp = np.array([[common_prefix(i, j) for j in range(n)] for i in range(n)])
    return np.array([[np.mean([a[j] for j in range(n) if cp[i, j] > t]) for t in range(seq_len)]
                     for i in range(n)])


def random_forest(rng, n, seq_len):
    parent, branch_point = np.full(n, -1), np.zeros(n, int)
    for i in range(n):
        if i and rng.random() < 0.75:
            parent[i] = rng.integers(0, i)
            branch_point[i] = rng.integers(1, seq_len + 1)
    order = rng.permutation(n)  # rows need not be in tree order
    inverse = np.argsort(order)
    parent = np.where(parent[order] >= 0, inverse[np.maximum(parent[order], 0)], -1)
    return parent, branch_point[order]


@settings(max_examples=15)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 9))
def test_hard_attribution_matches_brute_force(seed, n):
    rng = np.random.default_rng(seed)
    seq_len = 8
    parent, branch_point = random_forest(rng, n, seq_len)
    a = rng.normal(size=n)
    fn = jax.jit(adv.hard_attribution_advantages, static_argnums=3)
    got = fn(jnp.asarray(a, jnp.float32), jnp.asarray(parent), jnp.asarray(branch_point), seq_len)
    np.testing.assert_allclose(got, np_hard_attribution(a, parent, branch_point, seq_len), rtol=1e-5,
                               atol=1e-6)


def test_hard_attribution_hand_example():
    # Row 1 branches from row 0 after 4 tokens; row 2 from row 1 after 7.
    got = adv.hard_attribution_advantages(jnp.array([1.0, 2.0, 3.0]), jnp.array([-1, 0, 1]),
                                          jnp.array([0, 4, 7]), 10)
    want = [[2] * 4 + [1] * 6, [2] * 4 + [2.5] * 3 + [2] * 3, [2] * 4 + [2.5] * 3 + [3] * 3]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(ValueError, match="cycle"):
        adv.hard_attribution_advantages(jnp.zeros(3), jnp.array([2, 0, 1]), jnp.array([1, 1, 1]), 4)
    with pytest.raises(ValueError, match="parent"):
        adv.hard_attribution_advantages(jnp.zeros(2), jnp.array([-1, 1]), jnp.array([0, 1]), 4)
    with pytest.raises(ValueError, match="branch_point"):
        adv.hard_attribution_advantages(jnp.zeros(2), jnp.array([-1, 0]), jnp.array([0, 5]), 4)


def test_dapo_helpers():
    keep = adv.dynamic_sampling_mask(jnp.array([1.0, 1.0, 0.0, 1.0, 0.5, 0.5]), 2)
    np.testing.assert_array_equal(keep, [False, False, True, True, False, False])
    got = adv.overlong_penalty(jnp.array([10, 16, 18, 20, 21]), max_length=20, cache_length=4)
    np.testing.assert_allclose(got, [0.0, 0.0, -0.5, -1.0, -1.0])


def test_bad_input():
    with pytest.raises(ValueError, match="multiple of group_size"):
        adv.grpo_advantages(jnp.zeros(7), 4)
    with pytest.raises(ValueError, match="entropies"):
        adv.entropy_aware_advantages(jnp.zeros(3), jnp.zeros((3, 4)), jnp.ones((3, 5)))
    with pytest.raises(ValueError, match="advantages"):
        adv.entropy_aware_advantages(jnp.zeros(4), jnp.zeros((3, 5)), jnp.ones((3, 5)))
    with pytest.raises(ValueError, match="only 0 and 1"):
        adv.entropy_aware_advantages(jnp.zeros(3), jnp.zeros((3, 5)), jnp.full((3, 5), 2))
    with pytest.raises(ValueError, match="rewards"):
        adv.reinforce_pp_advantages(jnp.zeros(4), jnp.ones((3, 5)))
    with pytest.raises(ValueError, match="cache_length"):
        adv.overlong_penalty(jnp.zeros(2), max_length=4, cache_length=5)

"""Policy losses: values and gradients against an independent float64 NumPy implementation of the
formulas of AEPO_SPEC sections 4-5, hand-computed gradient weights, invariants, sharding and bad input."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from aepo_jax.core.losses import AGGREGATIONS, POLICY_LOSSES, aggregation_weights
from tests.core import helpers

# Hyper-parameters of each loss, stated here from the spec / papers (not read from the code under test).
SPEC = {
    "grpo": dict(el=0.2, eh=0.2, c=3.0, kind="ppo"),
    "dapo": dict(el=0.2, eh=0.28, c=3.0, kind="ppo"),
    "gspo": dict(el=3e-4, eh=4e-4, c=None, kind="gspo"),
    "cispo": dict(el=1.0, eh=0.28, c=None, kind="cispo"),
    "gppo": dict(el=0.2, eh=0.2, c=3.0, kind="ppo", keep_low=True, keep_high=True),
    "arpo": dict(el=0.2, eh=0.2, c=3.0, kind="ppo"),
    "aepo": dict(el=0.2, eh=0.2, c=3.0, kind="ppo", keep_high=True),
}
NAMES = sorted(SPEC)
LOG_RATIO_GRID = np.array([-1.0, -0.5, -0.1, 0.0, 0.05, 0.3, 0.7, 1.3])  # away from every clip boundary
KL_DERIVATIVE = {"k1": lambda x: np.ones_like(x), "k2": lambda x: x, "k3": lambda x: 1 - np.exp(-x)}
KL_VALUE = {"k1": lambda x: x, "k2": lambda x: x**2 / 2, "k3": lambda x: np.exp(-x) - 1 + x}


# ----------------------------------------------------------------------------- NumPy float64 reference
def np_weights(mask, aggregation, segment_ids=None, normalizer=None):
    mask = np.asarray(mask, np.float64)
    n, t = mask.shape
    seq = [[(i, 0 if segment_ids is None else int(segment_ids[i, j])) for j in range(t)] for i in range(n)]
    lengths = {}
    for i in range(n):
        for j in range(t):
            lengths[seq[i][j]] = lengths.get(seq[i][j], 0) + mask[i, j]
    n_seqs = sum(1 for v in lengths.values() if v > 0)
    w = np.zeros_like(mask)
    for i in range(n):
        for j in range(t):
            if not mask[i, j]:
                continue
            if aggregation == "token-mean":
                w[i, j] = 1 / mask.sum()
            elif aggregation == "seq-mean-token-mean":
                w[i, j] = 1 / (n_seqs * lengths[seq[i][j]])
            elif aggregation == "seq-mean-token-sum":
                w[i, j] = 1 / n_seqs
            else:
                w[i, j] = 1 / normalizer
    return w, seq


def np_loss(name, lp, old, adv, mask, *, aggregation, segment_ids=None, normalizer=None, el=None,
            eh=None, c="spec", ref=None, kl_coef=0.0, kl="k3", ent=None, ent_coef=0.0):
    """(loss, d loss / d logprobs, d loss / d entropies) of the spec's formulas, float64."""
    spec = SPEC[name]
    el = spec["el"] if el is None else el
    eh = spec["eh"] if eh is None else eh
    c = spec["c"] if c == "spec" else c
    lp, old, mask = (np.asarray(a, np.float64) for a in (lp, old, mask))
    adv = np.broadcast_to(np.asarray(adv, np.float64).reshape(lp.shape[0], -1), lp.shape)
    w, seq = np_weights(mask, aggregation, segment_ids, normalizer)
    r = np.exp(lp - old)
    if spec["kind"] == "gspo":  # s_i = exp(mean_t log r), the loss of sequence i on each of its tokens
        s = np.ones_like(r)
        members = {}
        for i, j in zip(*np.nonzero(mask)):
            members.setdefault(seq[i][j], []).append((i, j))
        for toks in members.values():
            val = np.exp(np.mean([lp[i, j] - old[i, j] for i, j in toks]))
            for i, j in toks:
                s[i, j] = val
        r = s
    l1, l2 = -adv * r, -adv * np.clip(r, 1 - el, 1 + eh)
    if spec["kind"] == "cispo":
        per_tok, dtok = l2, l2  # value -clip(r) A (see cispo_surrogate), gradient -clip(r) A
    else:
        per_tok = np.maximum(l1, l2)
        clip_active = l2 > l1
        upper, lower = clip_active & (r > 1 + eh), clip_active & (r < 1 - el)
        dtok = np.where(clip_active, 0.0, -adv * r)
        if spec.get("keep_high"):
            dtok = np.where(upper, -adv * (1 + eh), dtok)
        if spec.get("keep_low"):
            dtok = np.where(lower, -adv * (1 - el), dtok)
        if c is not None:
            dual = (adv < 0) & (per_tok > -adv * c)
            per_tok = np.where(dual, -adv * c, per_tok)
            dtok = np.where(dual, 0.0, dtok)
    loss = np.sum(w * per_tok)
    if spec["kind"] == "gspo":  # d/d lp_t of sum_u w_u L_i(u) = (sum_{u in i} w_u) dL_i/ds s / n_i
        grad = np.zeros_like(lp)
        for toks in members.values():
            wsum = sum(w[i, j] for i, j in toks)
            for i, j in toks:
                grad[i, j] = wsum * dtok[i, j] / len(toks)
    else:
        grad = w * dtok
    if ref is not None:
        x = lp - np.asarray(ref, np.float64)
        loss += kl_coef * np.sum(w * KL_VALUE[kl](x))
        grad = grad + kl_coef * w * KL_DERIVATIVE[kl](x)
    d_ent = None
    if ent is not None:
        loss -= ent_coef * np.sum(w * np.asarray(ent, np.float64))
        d_ent = -ent_coef * w
    return loss, grad * mask, d_ent


def make_batch(seed, n=6, t=7, seq_adv=False):
    rng = np.random.default_rng(seed)
    old = -rng.uniform(0.1, 3.0, (n, t))
    lp = old + rng.choice(LOG_RATIO_GRID, (n, t)) + rng.uniform(-0.01, 0.01, (n, t))
    adv = rng.normal(size=(n,) if seq_adv else (n, t))
    mask = rng.random((n, t)) < 0.75
    mask[0, 0] = True
    mask[-1] = False  # one empty sequence
    return dict(logprobs=lp, old_logprobs=old, advantages=adv, loss_mask=mask,
                entropies=rng.uniform(0.0, 3.0, (n, t)), ref_logprobs=old + rng.normal(0, 0.3, (n, t)))


def f32(batch):
    return {k: jnp.asarray(v) if k == "segment_ids" else jnp.asarray(v, jnp.float32)
            for k, v in batch.items()}


def jax_loss_and_grads(name, batch, **hp):
    def fn(lp, ent):
        return POLICY_LOSSES[name](**{**f32(batch), "logprobs": lp, "entropies": ent}, **hp)
    b = f32(batch)
    (loss, metrics), (g_lp, g_ent) = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(
        b["logprobs"], b["entropies"])
    return loss, metrics, g_lp, g_ent


def gspo_overrides(name):
    # GSPO's default eps (3e-4 / 4e-4) clips almost every sequence; a wide range exercises both regions.
    return dict(clip_eps_low=0.2, clip_eps_high=0.2) if name == "gspo" else {}


# ----------------------------------------------------------------------------- values and gradients
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_loss_and_gradient_match_numpy(name, aggregation):
    for seed in range(3):
        batch = make_batch(seed, seq_adv=name == "gspo")
        hp = dict(aggregation=aggregation, loss_normalizer=37.0 if aggregation == "constant" else None)
        for wide in (False, True):
            extra = gspo_overrides(name) if wide else {}
            loss, _, g_lp, g_ent = jax_loss_and_grads(name, batch, **hp, **extra)
            want, want_g, _ = np_loss(name, batch["logprobs"], batch["old_logprobs"], batch["advantages"],
                                      batch["loss_mask"], aggregation=aggregation, normalizer=37.0,
                                      el=extra.get("clip_eps_low"), eh=extra.get("clip_eps_high"))
            np.testing.assert_allclose(loss, want, rtol=2e-5, atol=1e-6)
            np.testing.assert_allclose(g_lp, want_g, rtol=2e-5, atol=1e-7)
            np.testing.assert_array_equal(g_ent, 0.0)  # no entropy bonus by default


@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
@pytest.mark.parametrize("name", ["grpo", "aepo"])
def test_kl_and_entropy_terms_match_numpy(kl, name):
    batch = make_batch(11)
    loss, metrics, g_lp, g_ent = jax_loss_and_grads(name, batch, kl_coef=0.05, kl_estimator=kl,
                                                    entropy_coef=0.01)
    want, want_g, want_ge = np_loss(name, batch["logprobs"], batch["old_logprobs"], batch["advantages"],
                                    batch["loss_mask"], aggregation="token-mean", ref=batch["ref_logprobs"],
                                    kl_coef=0.05, kl=kl, ent=batch["entropies"], ent_coef=0.01)
    np.testing.assert_allclose(loss, want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(g_lp, want_g, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(g_ent, want_ge, rtol=1e-6, atol=1e-9)
    m = batch["loss_mask"]
    x = (batch["logprobs"] - batch["ref_logprobs"])[m]
    np.testing.assert_allclose(metrics["kl"], np.mean(KL_VALUE[kl](x)), rtol=1e-5, atol=1e-7)


def test_metrics_match_numpy():
    batch = make_batch(3)
    _, metrics, _, _ = jax_loss_and_grads("grpo", batch)
    m = batch["loss_mask"]
    a, r = batch["advantages"][m], np.exp(batch["logprobs"] - batch["old_logprobs"])[m]
    low, high, dual = (a < 0) & (r < 0.8), (a > 0) & (r > 1.2), (a < 0) & (r > 3.0)
    h = batch["entropies"][m]
    high_h = (h - h.mean()) / h.std(ddof=1) > 1.0
    want = {
        "clipfrac_low": low.mean(), "clipfrac_high": high.mean(), "clipfrac_dual": dual.mean(),
        "ratio_mean": r.mean(), "ratio_min": r.min(), "ratio_max": r.max(),
        "approx_kl": np.mean(r - 1 - np.log(r)), "entropy_mean": h.mean(), "entropy_std": h.std(),
        "high_entropy_clipfrac": (low | high | dual)[high_h].mean(), "num_tokens": m.sum(),
        "nonfinite_fraction": 0.0,
    }
    assert low.any() and high.any() and dual.any() and high_h.any()
    for k, v in want.items():
        np.testing.assert_allclose(metrics[k], v, rtol=1e-5, atol=1e-7, err_msg=k)


def test_gradient_weights_by_region():
    """Hand-computed d loss / d log pi per token (constant normaliser 1 = plain token sum).

    Tokens: (A=+1, r=1.5) upper clip, (A=-1, r=0.5) lower clip, (A=-1, r=4) dual clip, (A=+2, r=1) inside.
    """
    lr = np.log([1.5, 0.5, 4.0, 1.0])
    batch = dict(logprobs=jnp.asarray(lr[None], jnp.float32), old_logprobs=jnp.zeros((1, 4)),
                 advantages=jnp.array([[1.0, -1.0, -1.0, 2.0]]), loss_mask=jnp.ones((1, 4)))
    want = {"grpo": [0, 0, 0, -2], "arpo": [0, 0, 0, -2], "dapo": [0, 0, 0, -2],
            "aepo": [-1.2, 0, 0, -2], "gppo": [-1.2, 0.8, 0, -2],
            "cispo": [-1.28, 0.5, 1.28, -2]}  # CISPO: -A clip(r, 0, 1.28), nothing dropped
    for name, g in want.items():
        grad = jax.grad(lambda x: POLICY_LOSSES[name](**{**batch, "logprobs": x}, aggregation="constant",
                                                      loss_normalizer=1.0)[0])(batch["logprobs"])
        np.testing.assert_allclose(grad[0], g, atol=1e-6, err_msg=name)
    # The forward values of GRPO and AEPO are equal: only the gradient differs.
    values = [POLICY_LOSSES[n](**batch)[0] for n in ("grpo", "aepo", "gppo")]
    np.testing.assert_allclose(values, values[0], rtol=1e-7)
    np.testing.assert_allclose(values[0], np.mean([-1 * 1.2, 1 * 0.8, 1 * 3.0, -2 * 1.0]), rtol=1e-6)


def test_gspo_is_the_sequence_objective():
    """GSPO's loss on two sequences, computed by hand: -mean_i min(s_i A_i, clip(s_i) A_i)."""
    lr = np.array([[0.1, 0.3, 0.0], [-0.2, -0.4, 0.5]])
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    adv = np.array([1.0, -2.0])
    s = np.exp([0.2, -0.1 / 3])
    want = -np.mean([min(s[0] * 1.0, 1.0004 * 1.0), min(s[1] * -2.0, max(s[1], 1 - 3e-4) * -2.0)])
    loss, _ = POLICY_LOSSES["gspo"](logprobs=jnp.asarray(lr, jnp.float32), old_logprobs=jnp.zeros((2, 3)),
                                    advantages=jnp.asarray(adv), loss_mask=jnp.asarray(mask))
    np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_gspo_token_gradient_with_per_token_advantages():
    """GSPO-token: s_it = sg(s_i) pi_t / sg(pi_t), so d loss / d log pi_t = -w_t A_t s_i (unclipped)
    and 0 where the sequence ratio is clipped against A_t."""
    lr = np.array([[0.1, 0.3, -0.2], [0.5, 0.4, 0.3]])  # s = exp(0.0667) inside, exp(0.4) above 1.2
    a = np.array([[1.0, -0.5, 2.0], [1.0, -1.0, 0.5]])
    s = np.exp(lr.mean(axis=1, keepdims=True))
    want = -(1 / 6) * a * s * np.array([[1, 1, 1], [0, 1, 0]])  # row 2: A > 0 tokens are clipped
    grad = jax.grad(lambda x: POLICY_LOSSES["gspo"](
        logprobs=x, old_logprobs=jnp.zeros((2, 3)), advantages=jnp.asarray(a), loss_mask=jnp.ones((2, 3)),
        clip_eps_low=0.2, clip_eps_high=0.2)[0])(jnp.asarray(lr, jnp.float32))
    np.testing.assert_allclose(grad, want, rtol=1e-6)


# ----------------------------------------------------------------------------- properties
@settings(max_examples=10)
@given(seed=st.integers(0, 10_000), name=st.sampled_from(NAMES), aggregation=st.sampled_from(AGGREGATIONS))
def test_ratio_one_gives_minus_weighted_mean_advantage(seed, name, aggregation):
    batch = make_batch(seed)
    batch["logprobs"] = batch["old_logprobs"]
    loss, _ = POLICY_LOSSES[name](**f32(batch), aggregation=aggregation, loss_normalizer=13.0)
    w, _ = np_weights(batch["loss_mask"], aggregation, normalizer=13.0)
    np.testing.assert_allclose(loss, -np.sum(w * batch["advantages"]), rtol=1e-5, atol=1e-7)


@settings(max_examples=10)
@given(seed=st.integers(0, 10_000), name=st.sampled_from(NAMES))
def test_zero_advantages_give_zero_gradient(seed, name):
    batch = make_batch(seed)
    batch["advantages"] = np.zeros_like(batch["advantages"])
    _, _, g_lp, _ = jax_loss_and_grads(name, batch)
    np.testing.assert_array_equal(g_lp, 0.0)


@settings(max_examples=10)
@given(seed=st.integers(0, 10_000), name=st.sampled_from(NAMES), aggregation=st.sampled_from(AGGREGATIONS))
def test_padding_changes_nothing(seed, name, aggregation):
    """Random extra rows and columns with mask 0, holding garbage (NaN, inf, huge), change nothing."""
    batch = make_batch(seed)
    rng = np.random.default_rng(seed + 1)
    garbage = lambda shape: rng.choice([np.nan, np.inf, -np.inf, 1e30, -5.0, 0.3], shape)
    padded = {}
    for k, v in batch.items():
        v = np.concatenate([v, garbage((v.shape[0], 3))], axis=1)
        padded[k] = np.concatenate([v, garbage((2, v.shape[1]))], axis=0)
    padded["loss_mask"] = np.pad(batch["loss_mask"], ((0, 2), (0, 3)))
    hp = dict(aggregation=aggregation, loss_normalizer=13.0, entropy_coef=0.01, kl_coef=0.1)
    loss, metrics, g_lp, g_ent = jax_loss_and_grads(name, batch, **hp)
    p_loss, p_metrics, p_g_lp, p_g_ent = jax_loss_and_grads(name, padded, **hp)
    chex.assert_trees_all_close((p_loss, p_metrics), (loss, metrics), rtol=1e-6, atol=1e-7)
    n, t = batch["loss_mask"].shape
    chex.assert_trees_all_close((p_g_lp[:n, :t], p_g_ent[:n, :t]), (g_lp, g_ent), rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(p_g_lp[n:], 0.0)
    np.testing.assert_array_equal(p_g_lp[:, t:], 0.0)


@pytest.mark.parametrize("name", NAMES)
def test_packed_equals_unpacked(name):
    """Two sequences per row with segment ids give the loss and gradients of one sequence per row."""
    batch = make_batch(5, n=8, t=5, seq_adv=False)
    if name == "gspo":  # GSPO needs one advantage per sequence
        batch["advantages"] = np.repeat(batch["advantages"][:, :1], 5, axis=1)
    packed = {k: v.reshape(4, 10) for k, v in batch.items()}
    packed["segment_ids"] = np.tile(np.repeat([0, 1], 5), (4, 1))
    for aggregation in AGGREGATIONS:
        hp = dict(aggregation=aggregation, loss_normalizer=13.0, entropy_coef=0.01, kl_coef=0.1,
                  **gspo_overrides(name))
        loss, metrics, g_lp, g_ent = jax_loss_and_grads(name, batch, **hp)
        p_loss, p_metrics, p_g_lp, p_g_ent = jax_loss_and_grads(name, packed, **hp)
        chex.assert_trees_all_close((p_loss, p_metrics), (loss, metrics), rtol=1e-5, atol=1e-7)
        chex.assert_trees_all_close((p_g_lp.reshape(8, 5), p_g_ent.reshape(8, 5)), (g_lp, g_ent),
                                    rtol=1e-5, atol=1e-9)


def test_aggregation_weights_match_numpy_packed():
    rng = np.random.default_rng(0)
    mask = rng.random((3, 8)) < 0.7
    seg = np.sort(rng.integers(0, 3, (3, 8)), axis=1)
    for aggregation in AGGREGATIONS:
        w = aggregation_weights(jnp.asarray(mask), aggregation, segment_ids=jnp.asarray(seg),
                                loss_normalizer=5.0)
        np.testing.assert_allclose(w, np_weights(mask, aggregation, seg, 5.0)[0], rtol=1e-6)


def test_nonfinite_inputs_are_dropped_and_reported():
    batch = make_batch(2)
    clean_loss, _, _, _ = jax_loss_and_grads("aepo", batch)
    bad = {k: v.copy() for k, v in batch.items()}
    bad["logprobs"][0, 0] = np.nan  # a valid token
    bad["entropies"][-1, 2] = np.inf  # a masked token: ignored, not counted
    loss, metrics, g_lp, _ = jax_loss_and_grads("aepo", bad)
    assert np.isfinite(loss) and np.isfinite(g_lp).all()
    np.testing.assert_allclose(metrics["nonfinite_fraction"], 1 / batch["loss_mask"].sum(), rtol=1e-6)
    assert g_lp[0, 0] == 0
    batch["loss_mask"][0, 0] = False  # same as masking that token
    want, _, _, _ = jax_loss_and_grads("aepo", batch)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    assert clean_loss != loss


# ----------------------------------------------------------------------------- transforms / sharding
class VariantsTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_aepo_loss_under_transforms(self):
        batch = f32(make_batch(7))
        pmapped = self.variant.type == chex.ChexVariantType.WITH_PMAP

        @self.variant
        def fn(batch):
            # Under pmap every device holds the whole batch: the psums scale numerators and denominators
            # alike, so loss and gradient must equal the single-device ones (pmap transposes a psum into a
            # psum: each device gets the sum of the 8 copies' gradients, 8 x 1/8).
            return jax.value_and_grad(lambda lp: POLICY_LOSSES["aepo"](
                **{**batch, "logprobs": lp}, axis_name="i" if pmapped else None)[0])(batch["logprobs"])

        loss, grad = fn(batch)
        want, want_g, _ = np_loss("aepo", batch["logprobs"], batch["old_logprobs"], batch["advantages"],
                                  batch["loss_mask"], aggregation="token-mean")
        np.testing.assert_allclose(loss, want, rtol=2e-5)
        np.testing.assert_allclose(grad, want_g, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("name,aggregation", [(n, "token-mean") for n in NAMES] + [
    ("aepo", a) for a in AGGREGATIONS if a != "token-mean"] + [("gspo", "seq-mean-token-mean")])
def test_sharded_loss_equals_single_device(name, aggregation):
    batch = f32(make_batch(9, n=16, t=6, seq_adv=name == "gspo"))
    batch["loss_mask"] = batch["loss_mask"].at[3].set(0)  # an empty row on one device
    hp = dict(aggregation=aggregation, loss_normalizer=40.0, kl_coef=0.05, entropy_coef=0.01,
              **gspo_overrides(name))
    keys = sorted(batch)

    def run(axis_name, *arrays):
        b = dict(zip(keys, arrays))
        (loss, metrics), grad = jax.value_and_grad(
            lambda lp: POLICY_LOSSES[name](**{**b, "logprobs": lp}, axis_name=axis_name, **hp),
            has_aux=True)(b["logprobs"])
        return loss, metrics, grad

    single = run(None, *(batch[k] for k in keys))
    sharded = helpers.shard_rows(lambda *a: run(helpers.AXIS, *a), len(keys),
                                 out_specs=(helpers.P(), helpers.P(), helpers.P(helpers.AXIS)))
    chex.assert_trees_all_close(sharded(*(batch[k] for k in keys)), single, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- defaults and bad input
def test_defaults_follow_the_spec():
    import inspect
    for name, spec in SPEC.items():
        kw = inspect.signature(POLICY_LOSSES[name]).parameters
        assert kw["clip_eps_low"].default == spec["el"], name
        assert kw["clip_eps_high"].default == spec["eh"], name
        assert kw["dual_clip"].default == spec["c"], name
        assert kw["kl_coef"].default == 0 and kw["entropy_coef"].default == 0, name
    assert inspect.signature(POLICY_LOSSES["aepo"]).parameters["aggregation"].default == "token-mean"


def test_bad_input_is_reported():
    batch = f32(make_batch(0))
    with pytest.raises(KeyError, match=r"unknown policy loss 'ppo2'.*\['aepo', 'arpo', 'cispo'"):
        POLICY_LOSSES["ppo2"]
    with pytest.raises(ValueError, match="old_logprobs"):
        POLICY_LOSSES["grpo"](**{**batch, "old_logprobs": batch["old_logprobs"][:, :-1]})
    with pytest.raises(ValueError, match="advantages"):
        POLICY_LOSSES["grpo"](**{**batch, "advantages": jnp.zeros((5,))})
    with pytest.raises(ValueError, match=r"only 0 and 1.*0\.5"):
        POLICY_LOSSES["grpo"](**{**batch, "loss_mask": batch["loss_mask"] * 0.5})
    with pytest.raises(ValueError, match=r"unknown aggregation 'mean'.*constant"):
        POLICY_LOSSES["grpo"](**batch, aggregation="mean")
    with pytest.raises(ValueError, match="loss_normalizer"):
        POLICY_LOSSES["grpo"](**batch, aggregation="constant")
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        POLICY_LOSSES["grpo"](**batch, kl_estimator="k4")
    with pytest.raises(ValueError, match="kl_coef=0.1 needs ref_logprobs"):
        POLICY_LOSSES["grpo"](**{**batch, "ref_logprobs": None}, kl_coef=0.1)
    with pytest.raises(ValueError, match="dual_clip"):
        POLICY_LOSSES["grpo"](**batch, dual_clip=0.5)
    with pytest.raises(ValueError, match="cispo"):
        POLICY_LOSSES["cispo"](**batch, preserve_high=True)
    with pytest.raises(TypeError):
        POLICY_LOSSES["grpo"](**batch, clip_eps=0.2)

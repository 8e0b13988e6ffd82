"""Log-probs and entropy: dense path against float64 NumPy, chunked path against the dense one (values
and gradients from both outputs), limits (one-hot, uniform), dtypes, memory and bad input."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from aepo_jax.core.logprobs import logprobs_and_entropy_from_logits, token_logprobs_and_entropy


def np_logprobs_and_entropy(logits, targets, temperature):
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    p = np.exp(logp)
    return np.take_along_axis(logp, targets[..., None], -1)[..., 0], -(p * logp).sum(-1)


def random_problem(seed, b, t, h, v, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(b, t, h))
    lm_head = rng.normal(size=(h, v)) * 1.5 / np.sqrt(h)
    targets = rng.integers(0, v, (b, t))
    return jnp.asarray(hidden, dtype), jnp.asarray(lm_head, dtype), jnp.asarray(targets)


def test_dense_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 11)) * 3
    targets = rng.integers(0, 11, (3, 4))
    for temperature in (0.6, 1.0, 1.7):
        got = logprobs_and_entropy_from_logits(jnp.asarray(logits, jnp.float32), jnp.asarray(targets),
                                               temperature=temperature)
        chex.assert_trees_all_close(got, np_logprobs_and_entropy(logits, targets, temperature),
                                    rtol=1e-5, atol=1e-6)


def test_one_hot_and_uniform_limits():
    v = 13
    one_hot = jnp.full((2, v), -jnp.inf).at[:, 4].set(0.0)
    logp, entropy = logprobs_and_entropy_from_logits(one_hot, jnp.array([4, 5]))
    np.testing.assert_array_equal(entropy, 0.0)
    np.testing.assert_array_equal(logp, [0.0, -np.inf])
    grad = jax.grad(lambda x: logprobs_and_entropy_from_logits(x, jnp.array([4, 4]))[1].sum())(one_hot)
    assert np.isfinite(grad).all()
    _, entropy = logprobs_and_entropy_from_logits(jnp.zeros((2, v)), jnp.array([0, 1]))
    np.testing.assert_allclose(entropy, np.log(v), rtol=1e-6)
    # Chunked: a huge logit gap (p of the others underflows to 0) and an all-zero LM head.
    hidden = jnp.ones((1, 2, 3))
    lm_head = jnp.zeros((3, v)).at[:, 7].set(500.0)
    logp, entropy = token_logprobs_and_entropy(hidden, lm_head, jnp.array([[7, 7]]), chunk_size=4)
    np.testing.assert_array_equal(entropy, 0.0)
    np.testing.assert_array_equal(logp, 0.0)
    logp, entropy = token_logprobs_and_entropy(hidden, jnp.zeros((3, v)), jnp.array([[0, 12]]), chunk_size=5)
    np.testing.assert_allclose(entropy, np.log(v), rtol=1e-6)
    np.testing.assert_allclose(logp, -np.log(v), rtol=1e-6)


@settings(max_examples=12)
@given(b=st.integers(1, 2), t=st.integers(1, 4), h=st.integers(1, 6), v=st.integers(1, 40),
       chunk=st.integers(1, 48), temperature=st.floats(0.3, 2.0), seed=st.integers(0, 1000))
def test_chunked_matches_dense_forward_and_backward(b, t, h, v, chunk, temperature, seed):
    hidden, lm_head, targets = random_problem(seed, b, t, h, v)
    rng = np.random.default_rng(seed + 1)
    g_logp, g_entropy = (jnp.asarray(rng.normal(size=(b, t)), jnp.float32) for _ in range(2))

    def objective(fn):
        def f(hidden, lm_head, temperature):
            logp, entropy = fn(hidden, lm_head, temperature)
            return jnp.sum(g_logp * logp) + jnp.sum(g_entropy * entropy), (logp, entropy)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

    chunked = objective(lambda x, w, tt: token_logprobs_and_entropy(x, w, targets, temperature=tt,
                                                                     chunk_size=chunk))
    dense = objective(lambda x, w, tt: logprobs_and_entropy_from_logits(
        jnp.einsum("bth,hv->btv", x, w), targets, temperature=tt))
    got, want = chunked(hidden, lm_head, temperature), dense(hidden, lm_head, temperature)
    chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-5)
    # And the dense path against float64 NumPy.
    logits = np.einsum("bth,hv->btv", np.asarray(hidden, np.float64), np.asarray(lm_head, np.float64))
    chex.assert_trees_all_close(got[0][1], np_logprobs_and_entropy(logits, np.asarray(targets), temperature),
                                rtol=2e-5, atol=2e-5)


def test_entropy_gradient_alone_matches_finite_differences():
    """d sum(H) / d lm_head from the custom VJP against float64 central differences."""
    hidden, lm_head, targets = random_problem(3, 1, 3, 4, 9)
    f = lambda w: jnp.sum(token_logprobs_and_entropy(hidden, w, targets, chunk_size=4)[1])
    grad = np.asarray(jax.grad(f)(lm_head))
    x = np.asarray(hidden, np.float64)[0]
    w0 = np.asarray(lm_head, np.float64)
    h_of = lambda w: np_logprobs_and_entropy(x @ w, np.asarray(targets)[0], 1.0)[1].sum()
    fd = np.zeros_like(w0)
    for idx in np.ndindex(w0.shape):
        e = np.zeros_like(w0)
        e[idx] = 1e-6
        fd[idx] = (h_of(w0 + e) - h_of(w0 - e)) / 2e-6
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-5)


class ChunkedVariantsTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_bf16_inputs_give_bf16_cotangents(self):
        hidden, lm_head, targets = random_problem(4, 2, 3, 8, 50, jnp.bfloat16)

        @self.variant
        def value_and_grad(hidden, lm_head):
            def f(hidden, lm_head):
                logp, entropy = token_logprobs_and_entropy(hidden, lm_head, targets, chunk_size=16)
                return jnp.sum(logp) + jnp.sum(entropy), (logp, entropy)
            return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(hidden, lm_head)

        (_, (logp, entropy)), (g_hidden, g_lm_head) = value_and_grad(hidden, lm_head)
        chex.assert_type([logp, entropy, g_hidden, g_lm_head],
                         [jnp.float32, jnp.float32, jnp.bfloat16, jnp.bfloat16])
        # float32 math on the bf16 values: same as the float64 reference on the same (rounded) inputs.
        logits = np.einsum("bth,hv->btv", np.asarray(hidden, np.float64), np.asarray(lm_head, np.float64))
        want = np_logprobs_and_entropy(logits, np.asarray(targets), 1.0)
        chex.assert_trees_all_close((logp, entropy), want, rtol=1e-5, atol=1e-5)


def test_memory_stays_chunk_sized():
    """Compiled value+grad never holds [tokens, vocab] float32 (8 MiB per chunk here vs 256 MiB dense)."""
    n, h, v, chunk = 2048, 64, 32768, 1024
    shapes = (jax.ShapeDtypeStruct((1, n, h), jnp.float32), jax.ShapeDtypeStruct((h, v), jnp.float32),
              jax.ShapeDtypeStruct((1, n), jnp.int32))

    def temp_bytes(fn):
        f = lambda x, w, y: jnp.sum(sum(fn(x, w, y)))
        compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*shapes).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    chunked = temp_bytes(lambda x, w, y: token_logprobs_and_entropy(x, w, y, chunk_size=chunk))
    dense = temp_bytes(lambda x, w, y: logprobs_and_entropy_from_logits(x @ w, y))
    logits_bytes = n * v * 4
    assert dense >= logits_bytes
    assert chunked < 4 * n * chunk * 4 <= logits_bytes / 8, (chunked, dense)


def test_bad_input():
    hidden, lm_head, targets = random_problem(0, 1, 2, 3, 5)
    with pytest.raises(ValueError, match="lm_head"):
        token_logprobs_and_entropy(hidden, lm_head.T, targets)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs_and_entropy(hidden, lm_head, targets[:, :1])
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs_and_entropy(hidden, lm_head, targets, chunk_size=0)
    with pytest.raises(ValueError, match="targets"):
        logprobs_and_entropy_from_logits(jnp.zeros((2, 3, 5)), targets)

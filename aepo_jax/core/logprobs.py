"""Per-token log-probability of the target and full-vocabulary entropy of the policy.

With z = (h W) / T the temperature-scaled logits of one position, p = softmax(z) and y the target id:
  log p(y) = z_y - logsumexp(z)
  H        = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v
Gradients (used by the custom VJP below), per logit v:
  d log p(y) / d z_v = 1[v = y] - p_v
  d H / d z_v        = -p_v (log p_v + H)

`token_logprobs_and_entropy` never materialises the [tokens, vocab] logits: it walks the vocabulary in
chunks with an online log-sum-exp (Milakov & Gimelshein 2018, arXiv 1805.02867) in the forward pass and
recomputes each chunk's logits in the backward pass (a `jax.custom_vjp`), so the float32 working set is
[tokens, chunk_size] whatever the vocabulary (Qwen3: 151,936). Gradients flow from both outputs, so an
entropy bonus or any loss on H is exact.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from aepo_jax.core import checks

_F32 = jnp.float32


def logprobs_and_entropy_from_logits(
    logits: jax.Array, targets: jax.Array, *, temperature: float | jax.Array = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Dense reference (and the sampler's path): (log p(target), H) from logits [..., V], in float32.

    Logits of -inf (masked vocabulary entries) are allowed: they get p = 0 and add nothing to H.
    """
    checks.check_shapes(jnp.shape(logits)[:-1], targets=targets)
    z = logits.astype(_F32) / jnp.asarray(temperature, _F32)
    logp = jax.nn.log_softmax(z, axis=-1)
    p = jnp.exp(logp)
    safe_logp = jnp.where(p > 0, logp, 0.0)  # 0 * -inf would be NaN in the value and the gradient
    target_logp = jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return target_logp, -jnp.sum(p * safe_logp, axis=-1)


def token_logprobs_and_entropy(
    hidden: jax.Array,
    lm_head: jax.Array,
    targets: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    chunk_size: int = 1024,
) -> tuple[jax.Array, jax.Array]:
    """(log p(target), H) for every position, from hidden states and the LM-head matrix, vocab-chunked.

    Args:
      hidden: [..., H] final normed hidden states (any float dtype).
      lm_head: [H, V] the output projection (logits = hidden @ lm_head). The matmuls of both passes take
        their operands in the promoted dtype of the two (bf16 and bf16: bf16 operands) and accumulate in
        float32; the softmax statistics are float32 whatever the inputs.
      targets: [...] integer next-token ids.
      temperature: T, logits are divided by it (float or traced scalar; differentiable).
      chunk_size: vocabulary columns per chunk (static). The last chunk overlaps the previous one instead
        of padding the vocabulary, so any V works without copying the LM head.

    Returns:
      float32 arrays of shape [...]: the target log-probabilities and the full-vocabulary entropies.
      Their cotangents flow to `hidden` and `lm_head` in those arrays' dtypes.
    """
    *lead, h_dim = jnp.shape(hidden)
    checks.check_shapes((h_dim, jnp.shape(lm_head)[-1]), lm_head=lm_head)
    checks.check_shapes(tuple(lead), targets=targets)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    inv_t = 1.0 / jnp.asarray(temperature, _F32)
    logp, entropy = _chunked(
        hidden.reshape(-1, h_dim), lm_head, targets.reshape(-1).astype(jnp.int32), inv_t,
        min(chunk_size, lm_head.shape[1]))
    return logp.reshape(lead), entropy.reshape(lead)


def _chunk_logits(h, w, i, chunk):
    """Logits of chunk i: (unscaled f32 logits [N, C], W columns [H, C], column ids, fresh-column mask)."""
    start = jnp.minimum(i * chunk, w.shape[1] - chunk)  # the last chunk is shifted left to stay in range
    w_c = lax.dynamic_slice_in_dim(w, start, chunk, axis=1)
    cols = start + jnp.arange(chunk)
    fresh = cols >= i * chunk  # columns not already covered by an earlier chunk
    return jnp.dot(h, w_c, preferred_element_type=_F32), w_c, cols, fresh


def _chunk_stats(h, w, y, inv_t, i, chunk):
    """Online-softmax statistics of one chunk: (max m, sum e^(z-m), sum e^(z-m) (z-m), z_target)."""
    raw, _, cols, fresh = _chunk_logits(h, w, i, chunk)
    z = jnp.where(fresh, raw * inv_t, -jnp.inf)
    m = jnp.max(z, axis=-1)
    d = jnp.where(fresh, z - m[:, None], 0.0)
    e = jnp.where(fresh, jnp.exp(d), 0.0)
    z_y = jnp.sum(jnp.where(fresh & (cols == y[:, None]), z, 0.0), axis=-1)
    return m, jnp.sum(e, axis=-1), jnp.sum(e * d, axis=-1), z_y


def _merge(a, b):
    """Combines the statistics of two disjoint column sets (associative)."""
    (m1, s1, u1, y1), (m2, s2, u2, y2) = a, b
    m = jnp.maximum(m1, m2)
    a1, a2 = jnp.exp(m1 - m), jnp.exp(m2 - m)
    return m, a1 * s1 + a2 * s2, a1 * (u1 + (m1 - m) * s1) + a2 * (u2 + (m2 - m) * s2), y1 + y2


def _forward(h, w, y, inv_t, chunk):
    stats = functools.partial(_chunk_stats, h, w, y, inv_t, chunk=chunk)
    n_chunks = math.ceil(w.shape[1] / chunk)
    (m, s, u, z_y), _ = lax.scan(
        lambda acc, i: (_merge(acc, stats(i)), None), stats(0), jnp.arange(1, n_chunks))
    log_z = m + jnp.log(s)
    return z_y - log_z, jnp.log(s) - u / s, log_z


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked(h, w, y, inv_t, chunk):
    logp, entropy, _ = _forward(h, w, y, inv_t, chunk)
    return logp, entropy


def _chunked_fwd(h, w, y, inv_t, chunk):
    logp, entropy, log_z = _forward(h, w, y, inv_t, chunk)
    return (logp, entropy), (h, w, y, inv_t, log_z, entropy)


def _chunked_bwd(chunk, residuals, cotangents):
    h, w, y, inv_t, log_z, entropy = residuals
    g_logp, g_entropy = cotangents
    # The two gradient matmuls take their operands in the forward matmul's dtype (bf16 inputs: bf16
    # operands, float32 accumulation, as any bf16 matmul's backward pass), not float32: d_logits is
    # rounded to that dtype once per element, and d_h still accumulates over the chunks in float32.
    op_dtype = jnp.promote_types(h.dtype, w.dtype)
    h_op = h.astype(op_dtype)

    def body(carry, i):
        d_h, d_w, d_inv_t = carry
        raw, w_c, cols, fresh = _chunk_logits(h, w, i, chunk)
        logp = raw * inv_t - log_z[:, None]
        p = jnp.where(fresh, jnp.exp(logp), 0.0)
        onehot = (fresh & (cols == y[:, None])).astype(_F32)
        d_z = g_logp[:, None] * (onehot - p) - g_entropy[:, None] * p * (logp + entropy[:, None])
        d_logits = (d_z * inv_t).astype(op_dtype)
        d_h = d_h + jnp.dot(d_logits, w_c.T.astype(op_dtype), preferred_element_type=_F32)
        # Each column gets exactly one non-zero update (overlapping columns get + 0), so accumulating in
        # lm_head's own dtype is exact.
        start = cols[0]
        d_w_c = jnp.dot(h_op.T, d_logits, preferred_element_type=_F32).astype(d_w.dtype)
        d_w = lax.dynamic_update_slice_in_dim(
            d_w, lax.dynamic_slice_in_dim(d_w, start, chunk, axis=1) + d_w_c, start, axis=1)
        return (d_h, d_w, d_inv_t + jnp.sum(d_z * raw)), None

    init = (jnp.zeros(h.shape, _F32), jnp.zeros_like(w), jnp.zeros((), _F32))
    (d_h, d_w, d_inv_t), _ = lax.scan(body, init, jnp.arange(math.ceil(w.shape[1] / chunk)))
    return d_h.astype(h.dtype), d_w, None, d_inv_t.astype(inv_t.dtype)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)

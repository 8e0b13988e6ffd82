"""Next-token sampling for the engine, with the log-prob and entropy AEPO records for every token.

For one slot with float32 logits l [V] and temperature T > 0, the policy distribution is
  p = softmax(z),  z = l / T                      (greedy slots, T = 0, use z = l)
and for the sampled token y the engine records
  log p(y) = z_y - logsumexp(z)
  H        = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v       (full vocabulary)
which is exactly what the trainer recomputes from the same logits (`core.logprobs`, temperature T).
top-k / top-p only restrict where the token is drawn from; they do not change the recorded log p(y) and H,
which always refer to the full-vocabulary distribution softmax(z).

Drawing (per slot, a key per position):
  greedy (T = 0)          y = argmax l
  plain (top_k = 0, top_p = 1)   y = argmax(z + g), g ~ Gumbel(0, 1)^V         (Gumbel-max = exact sampling)
  filtered                the C largest z in order (`block_top_k`, C static: a power of two >= the largest
                          top_k, or the whole vocabulary = a sort); keep rank < top_k, renormalise, keep
                          the smallest prefix whose mass reaches top_p (top-k first, then top-p, as HF's
                          `TopKLogitsWarper` then `TopPLogitsWarper`), then Gumbel-max over the kept ones.
Which branches run is static (`greedy_only`, `candidates`), so the plain path never sorts the vocabulary.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings. temperature 0 = greedy; top_k 0 = off; top_p 1 = off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be an integer >= 0 (0 = off), got {self.top_k}")

    @classmethod
    def greedy(cls) -> "SamplingParams":
        return cls(temperature=0.0)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def is_filtered(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0


def sampling_mode(params: list[SamplingParams], vocab_size: int) -> tuple[bool, int]:
    """The static (greedy_only, candidates) that serve every request in `params` exactly."""
    random = [p for p in params if not p.is_greedy]
    if not random:
        return True, 0
    if not any(p.is_filtered for p in random):
        return False, 0
    if all(p.top_k > 0 for p in random):
        return False, min(vocab_size, 1 << (max(p.top_k for p in random) - 1).bit_length())
    return False, vocab_size


def logprob_stats(z: Array) -> tuple[Array, Array]:
    """(logsumexp(z), entropy of softmax(z)) over the last axis, float32."""
    z = z.astype(_F32)
    m = jnp.max(z, axis=-1, keepdims=True)
    e = jnp.exp(z - m)
    s = jnp.sum(e, axis=-1)
    lse = m[..., 0] + jnp.log(s)
    return lse, lse - jnp.sum(e * z, axis=-1) / s


def sample(logits: Array, temperature: Array, top_k: Array, top_p: Array, keys: Array, *,
           greedy_only: bool, candidates: int) -> tuple[Array, Array, Array]:
    """Draws one token per row of logits [S, V].

    temperature / top_p: [S] float; top_k: [S] int; keys: [S] typed PRNG keys (one per slot and step).
    Returns (tokens [S] int32, log p(token) [S] f32, entropy [S] f32), see the module docstring.
    """
    logits = logits.astype(_F32)
    greedy = temperature <= 0
    inv_t = jnp.where(greedy, 1.0, 1.0 / jnp.where(greedy, 1.0, temperature)).astype(_F32)
    z = logits * inv_t[:, None]
    lse, entropy = logprob_stats(z)
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy_only:
        tokens = argmax
    else:
        if candidates == 0:
            noise = jax.vmap(lambda k: jax.random.gumbel(k, (z.shape[-1],), _F32))(keys)
            drawn = jnp.argmax(z + noise, axis=-1).astype(jnp.int32)
        else:
            drawn = _sample_filtered(z, top_k, top_p, keys, candidates)
        tokens = jnp.where(greedy, argmax, drawn)
    token_z = jnp.take_along_axis(z, tokens[:, None], axis=-1)[:, 0]
    return tokens, token_z - lse, entropy


def block_top_k(x: Array, k: int, block: int = 1024) -> tuple[Array, Array]:
    """`lax.top_k(x, k)` over the last axis of x [S, V], in two stages when V is large and k small.

    The k largest of a row are among the k largest of each block of `block` columns, so stage one takes
    the top k of every block (short rows, cheap) and stage two the top k of those. The same values as
    `lax.top_k`; equal values may come in another order. (Qwen3-1.7B, 64 slots, H100: top-k 20 sampling
    costs 1.2 ms per decode step over plain sampling with a direct `lax.top_k` over the 151,936 columns,
    0.46 ms with the two stages.)
    """
    s, v = x.shape
    if k * 4 > block or v <= 2 * block:
        return lax.top_k(x, k)
    nb = -(-v // block)
    padded = jnp.pad(x, ((0, 0), (0, nb * block - v)), constant_values=-jnp.inf)
    vals, idx = lax.top_k(padded.reshape(s, nb, block), k)               # [S, nb, k]
    idx = idx + (jnp.arange(nb, dtype=idx.dtype) * block)[None, :, None]
    vals, pos = lax.top_k(vals.reshape(s, nb * k), k)
    return vals, jnp.take_along_axis(idx.reshape(s, nb * k), pos, axis=1)


def _sample_filtered(z: Array, top_k: Array, top_p: Array, keys: Array, candidates: int) -> Array:
    vals, idx = block_top_k(z, candidates)                            # [S, C], descending
    rank = jnp.arange(candidates, dtype=jnp.int32)[None, :]
    k_eff = jnp.where(top_k > 0, jnp.minimum(top_k, candidates), candidates)
    in_k = rank < k_eff[:, None]
    probs = jax.nn.softmax(jnp.where(in_k, vals, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_k & ((mass_before < top_p[:, None]) | (rank == 0))
    noise = jax.vmap(lambda k: jax.random.gumbel(k, (candidates,), _F32))(keys)
    choice = jnp.argmax(jnp.where(keep, vals + noise, -jnp.inf), axis=-1)
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

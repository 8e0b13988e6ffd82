"""Masked reductions over the valid tokens of a (possibly sharded, possibly packed) batch.

Every reduction takes an optional `axis_name`: inside `shard_map` / `pmap` it psums the partial sums so the
statistic is the one of the GLOBAL batch, identical on every device. With `axis_name=None` it is the plain
single-device statistic.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def psum(x: jax.Array, axis_name: str | None) -> jax.Array:
    """`lax.psum(x, axis_name)`, or `x` when `axis_name` is None."""
    return x if axis_name is None else lax.psum(x, axis_name)


def masked_sum(x: jax.Array, mask: jax.Array, axis_name: str | None = None) -> jax.Array:
    """sum_{mask} x over the global batch (masked entries may hold NaN / inf: they are never read)."""
    return psum(jnp.sum(jnp.where(mask, x, 0.0)), axis_name)


def masked_mean(x: jax.Array, mask: jax.Array, axis_name: str | None = None) -> jax.Array:
    """sum_{mask} x / max(#mask, 1) over the global batch (0 when no entry is valid)."""
    count = masked_sum(jnp.ones_like(x, jnp.float32), mask, axis_name)
    return masked_sum(x, mask, axis_name) / jnp.maximum(count, 1.0)


def masked_zscore(x: jax.Array, mask: jax.Array, axis_name: str | None = None) -> jax.Array:
    """z = (x - mean) / std over the valid entries of the global batch; 0 where mask is 0.

    std is the unbiased (n - 1) standard deviation, computed in two passes; std = 0 is replaced by 1
    (AEPO_SPEC 4b), so a constant x gives z = 0.
    """
    x = jnp.where(mask, x.astype(jnp.float32), 0.0)
    count = masked_sum(jnp.ones_like(x), mask, axis_name)
    mean = masked_sum(x, mask, axis_name) / jnp.maximum(count, 1.0)
    var = masked_sum((x - mean) ** 2, mask, axis_name) / jnp.maximum(count - 1.0, 1.0)
    std = jnp.sqrt(var)
    return jnp.where(mask, (x - mean) / jnp.where(std > 0, std, 1.0), 0.0)


def _per_sequence(x: jax.Array, segment_ids: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(sum of x over each sequence [S], index of each token's sequence [N, T]) for a [N, T] batch."""
    n, t = x.shape
    rows = jnp.broadcast_to(jnp.arange(n)[:, None], (n, t))
    if segment_ids is None:
        return jnp.sum(x, axis=-1), rows
    index = rows * t + segment_ids
    return jax.ops.segment_sum(x.reshape(-1), index.reshape(-1), num_segments=n * t), index


def sequence_sum(x: jax.Array, mask: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """For every token, the masked sum of `x` over the sequence it belongs to; shape [N, T].

    Unpacked ([N, T], one sequence per row) when `segment_ids` is None. Packed otherwise: tokens of row n
    with the same `segment_ids[n, t]` (an integer in [0, T)) form one sequence. Per-row, so shard-local.
    """
    sums, index = _per_sequence(jnp.where(mask, x, 0.0), segment_ids)
    return sums[index]


def count_sequences(mask: jax.Array, segment_ids: jax.Array | None = None,
                    axis_name: str | None = None) -> jax.Array:
    """Number of sequences with at least one valid token in the global batch (float32)."""
    sums, _ = _per_sequence(mask.astype(jnp.float32), segment_ids)
    return psum(jnp.sum((sums > 0).astype(jnp.float32)), axis_name)

"""Test helpers: run a per-shard function over 8 fake CPU devices with `shard_map`."""
from __future__ import annotations

import jax
import numpy as np

try:  # jax >= 0.7 exports shard_map at the top level; older releases only under experimental.
    from jax import shard_map as _shard_map
except ImportError:  # pragma: no cover
    from jax.experimental.shard_map import shard_map as _shard_map

AXIS = "data"
P = jax.sharding.PartitionSpec


def data_mesh(n: int = 8) -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.array(jax.devices()[:n]).reshape(n), (AXIS,))


def shard_rows(fn, n_args: int, out_specs, n_devices: int = 8):
    """jit(shard_map(fn)) with every positional argument split along its first axis over the devices."""
    return jax.jit(_shard_map(fn, mesh=data_mesh(n_devices), in_specs=(P(AXIS),) * n_args,
                              out_specs=out_specs))

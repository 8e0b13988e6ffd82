"""Partition rules for Qwen3 parameters on a `Mesh(data, fsdp, tp)`, and helpers to shard a model.

Megatron-style tensor parallelism (Shoeybi et al., arXiv 1909.08053) over `tp`: column-parallel q/k/v and
gate/up projections (output features split), row-parallel o/down projections (input features split); the
other dimension of every matrix is split over `fsdp` (ZeRO-3 / FSDP style parameter sharding, gathered by XLA
per layer). Norm weights are replicated. `data` only splits the batch.

A dimension whose size is not divisible by its mesh axis is replicated instead (tiny test models, odd
vocabularies); `partition_specs` reports that choice in the returned specs, so nothing is hidden.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tp")

# (regex over the "/"-joined parameter path, spec). First match wins.
QWEN3_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens/embedding$", P("tp", "fsdp")),
    (r"self_attn/(q|k|v)_proj/kernel$", P("fsdp", "tp")),
    (r"self_attn/o_proj/kernel$", P("tp", "fsdp")),
    (r"mlp/(gate|up)_proj/kernel$", P("fsdp", "tp")),
    (r"mlp/down_proj/kernel$", P("tp", "fsdp")),
    (r"lm_head/kernel$", P("fsdp", "tp")),
    (r".*", P()),
)


def make_mesh(data: int = 1, fsdp: int = -1, tp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tp) over `devices` (default all); one size may be -1 (the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tp]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tp={tp}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices are not divisible by data*fsdp*tp={known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tp={sizes[2]} needs {int(np.prod(sizes))} "
                         f"devices, have {len(devices)}")
    return Mesh(np.array(devices).reshape(sizes), AXES)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops the axes of `spec` that do not divide the matching dimension."""
    fitted = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = axis if isinstance(axis, tuple) else (axis,) if axis else ()
        size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        fitted.append(axis if size > 1 and dim % size == 0 else None)
    return P(*fitted)


def _path_name(path) -> str:
    """`layers/0/self_attn/q_proj/kernel` from a pytree key path (dict keys, indices, attributes)."""
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    return "/".join(parts[:-1] if parts and parts[-1] == "value" else parts)  # nnx.State leaves end in .value


def partition_specs(tree, mesh: Mesh, rules=QWEN3_RULES):
    """A tree of PartitionSpecs for `tree` (parameters as a pure dict or nnx.State, or an optax state).

    Rules match the end of each leaf's path, so optimiser moments (`.../mu/layers/0/.../kernel`) follow
    their parameter.
    """
    def spec_for(path, leaf):
        name = _path_name(path)
        for pattern, spec in rules:
            if re.search(pattern, name):
                return _fit(spec, leaf.shape, mesh)
        raise ValueError(f"no partition rule matches parameter {name!r}")
    return jax.tree_util.tree_map_with_path(spec_for, tree)


def shard_model(model: nnx.Module, mesh: Mesh, rules=QWEN3_RULES) -> nnx.Module:
    """Places every parameter of `model` on `mesh` by `rules` (in place) and returns the model."""
    state = nnx.state(model)
    pure = nnx.to_pure_dict(state)
    specs = partition_specs(pure, mesh, rules)
    placed = jax.device_put(pure, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    nnx.replace_by_pure_dict(state, placed)
    nnx.update(model, state)
    return model


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a [batch, ...] array: the batch split over data and fsdp."""
    return NamedSharding(mesh, P(("data", "fsdp")))

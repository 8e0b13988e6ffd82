"""Input validation shared by the core functions.

Shapes are checked at trace time. Values (a loss mask that must hold only 0 and 1, a tree that must be a
forest) can only be checked when the array is concrete, i.e. outside `jit` / `pmap` / `shard_map`; under a
transform the value checks are skipped and the functions report what they can as metrics instead.
"""
from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np


def concrete_value(x: Any) -> np.ndarray | None:
    """`x` as a NumPy array, or None when `x` is a tracer (its value is unknown at trace time)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_shapes(shape: tuple[int, ...], **arrays: Any) -> None:
    """Raises ValueError naming every array (None = absent, skipped) whose shape is not `shape`."""
    bad = {k: tuple(jnp.shape(v)) for k, v in arrays.items() if v is not None and jnp.shape(v) != shape}
    if bad:
        raise ValueError(f"shape mismatch: expected {tuple(shape)}, got {bad}")


def check_choice(value: str, choices: Iterable[str], what: str) -> None:
    """Raises ValueError listing the known choices when `value` is not one of them."""
    choices = sorted(choices)
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; known: {choices}")


def check_binary_mask(mask: Any, name: str = "loss_mask") -> jax.Array:
    """Returns `mask` as bool after checking (when concrete) that it holds only 0 and 1."""
    value = concrete_value(mask)
    if value is not None and value.dtype != np.bool_ and not np.isin(value, (0, 1)).all():
        bad = np.unique(value[~np.isin(value, (0, 1))])[:5]
        raise ValueError(f"{name} must contain only 0 and 1, found {bad.tolist()}")
    return jnp.asarray(mask).astype(bool)

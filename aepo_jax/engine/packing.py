"""Per-row fields packed into one int32 array, so a call boundary moves one buffer instead of one per field.

Each host <-> device transfer has a fixed cost (on an H100 host ~50-200 us per array, whatever its size): a
prefill used to send 17 small arrays and a decode result came back as 9. Packing makes each one transfer.

A field is an array with leading dimension R (rows): [R] or [R, k], of dtype int32, bool or float32. The
packed array is int32 [R, sum of widths]: ints as they are, bools as 0 / 1, float32 bit-cast (exact).
`layout` describes the columns, is hashable (a static argument of a jitted function) and is derived from the
fields' shapes and dtypes only. `pack` / `unpack` work on numpy arrays (host) and jax arrays (inside jit).
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from jax import lax

_KINDS = {np.dtype(np.int32): "i", np.dtype(np.bool_): "b", np.dtype(np.float32): "f"}


def layout(fields: Mapping[str, object]) -> tuple[tuple[str, str, int, bool], ...]:
    """(name, kind 'i' / 'b' / 'f', width, is_matrix) per field, in order."""
    out = []
    for name, a in fields.items():
        kind = _KINDS.get(np.dtype(a.dtype))
        if kind is None or a.ndim not in (1, 2):
            raise ValueError(f"packing: field {name!r} must be [R] or [R, k] int32 / bool / float32, got "
                             f"{a.dtype}{list(a.shape)}")
        out.append((name, kind, 1 if a.ndim == 1 else int(a.shape[1]), a.ndim == 2))
    return tuple(out)


def pack(fields: Mapping[str, object]):
    """int32 [R, total] of the fields (numpy in, numpy out; jax in, jax out)."""
    cols = []
    for (name, kind, _, matrix), a in zip(layout(fields), fields.values()):
        a = a if matrix else a[:, None]
        if isinstance(a, np.ndarray):
            cols.append(a.view(np.int32) if kind == "f" else a.astype(np.int32))
        else:
            cols.append(lax.bitcast_convert_type(a, jnp.int32) if kind == "f" else a.astype(jnp.int32))
    if all(isinstance(c, np.ndarray) for c in cols):
        return np.concatenate(cols, axis=1)
    return jnp.concatenate(cols, axis=1)


def unpack(packed, spec) -> dict:
    """The fields of `pack`, with their dtypes and shapes, from the packed array and its `layout`."""
    host = isinstance(packed, np.ndarray)
    out, start = {}, 0
    for name, kind, width, matrix in spec:
        col = packed[:, start:start + width]
        start += width
        if kind == "f":
            col = col.view(np.float32) if host else lax.bitcast_convert_type(col, jnp.float32)
        elif kind == "b":
            col = col != 0
        out[name] = col if matrix else col[:, 0]
    if start != packed.shape[1]:
        raise ValueError(f"packing: layout covers {start} columns, the array has {packed.shape[1]}")
    return out

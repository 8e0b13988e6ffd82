"""Orbax checkpoints of the train state with verified restore and fallback to the previous step.

A checkpoint holds an array pytree (params, optimiser state, RNG key data, step counters) and a JSON
metadata dict (data position, flags). Saving is asynchronous; the last `keep` steps are kept. Orbax commits a
step atomically (a temporary directory renamed when complete), so a run killed mid-save leaves the previous
steps intact.

Corruption that Orbax itself does not notice (a flipped byte inside an array file) is caught by a
fingerprint: for every leaf, the wrap-around uint32 sum of its bit patterns, computed on device at save time
and stored in the metadata. Integer addition mod 2^32 is associative, so the fingerprint is exact whatever the
sharding or reduction order. `restore_latest` walks from the newest step to the oldest, reports each
unreadable or mismatching checkpoint by path, and returns the first good one.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

FINGERPRINT_KEY = "_fingerprint"
log = logging.getLogger(__name__)


@jax.jit
def fingerprint(tree) -> list[jax.Array]:
    """Per leaf: sum of the element bit patterns as uint32, mod 2^32."""
    def leaf(x):
        x = jnp.asarray(x)
        if x.dtype == jnp.bool_:
            return jnp.sum(x, dtype=jnp.uint32)
        # 8-byte leaves bitcast to uint32 gain a trailing axis of two words; both are summed.
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        return jnp.sum(jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32), dtype=jnp.uint32)
    return [leaf(x) for x in jax.tree.leaves(tree)]


def _fingerprint_list(tree) -> list[int]:
    return [int(v) for v in jax.device_get(fingerprint(tree))]


class Checkpointer:
    """Saves and restores (state pytree, metadata dict) pairs under `directory/<step>/`."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, metadata: dict[str, Any]) -> None:
        """Starts saving `state` and `metadata` as `step` (returns before the write finishes when async)."""
        metadata = dict(metadata, **{FINGERPRINT_KEY: _fingerprint_list(state)})
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(metadata)))

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, metadata) of the newest checkpoint that reads back intact, or None if none does.

        abstract_state: a pytree of jax.ShapeDtypeStruct (with shardings, to restore sharded).
        """
        self._manager.wait_until_finished()
        self._manager.reload()
        for step in reversed(self.steps()):
            path = os.path.join(self.directory, str(step))
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            except Exception as e:  # any read failure means this step is unusable; try the previous one
                log.warning("checkpoint %s is unreadable (%s: %s); trying the previous step", path,
                            type(e).__name__, str(e)[:300])
                continue
            metadata = dict(restored.meta)
            expected = metadata.pop(FINGERPRINT_KEY, None)
            if expected != _fingerprint_list(restored.state):
                log.warning("checkpoint %s is corrupt (array fingerprint mismatch); trying the previous step",
                            path)
                continue
            return step, restored.state, metadata
        return None

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree) -> Any:
    """ShapeDtypeStructs (with shardings) describing `tree`, the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype,
                                                       sharding=getattr(x, "sharding", None)), tree)

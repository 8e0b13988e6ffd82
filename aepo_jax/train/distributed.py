"""Multi-process start-up (TPU pod slices, GPU clusters, or several CPU processes) and global batches.

Every process runs the same program (SPMD). After `initialize`, `jax.devices()` lists the devices of all
processes and a `Mesh` over them spans hosts; a jitted step's inputs must then be global arrays.
"""

from __future__ import annotations

import jax
import numpy as np


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins the process group (arguments may be None where the platform provides them: TPU, SLURM).

    On CPU, cross-process collectives go through gloo (the setting only affects the CPU backend).
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def global_arrays(tree, shardings):
    """Global arrays from values that every process holds whole (each process supplies its own shards).

    `shardings` is one Sharding for every leaf or a tree of them matching `tree`.
    """
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(
        lambda a, s: jax.make_array_from_callback(np.shape(a), s, lambda index: np.asarray(a)[index]),
        tree, shardings)

"""The native parameter format: an Orbax checkpoint of the model's parameters plus the HF config.json.

Layout of a directory: `config.json` (HF form, so the same config parser serves both formats) and
`params/` (an Orbax StandardCheckpointer tree of the nnx parameter state). Restoring places each array
directly with the requested dtype (and sharding, when the abstract target carries one).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from aepo_jax.models import qwen3


def save_params(model: qwen3.Qwen3, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Writes `model`'s parameters and config to `path` (refuses a non-empty directory unless overwrite)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")
    os.makedirs(path, exist_ok=True)
    dtype = jax.tree.leaves(nnx.state(model, nnx.Param))[0].dtype
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(path, "params"), nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                          force=overwrite)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model.config.to_hf_dict(dtype=jnp.dtype(dtype).name), f, indent=2)


def load_params(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None) -> qwen3.Qwen3:
    """Reads a directory written by `save_params` into a `Qwen3` (compute `dtype`, storage `param_dtype`)."""
    path = os.path.abspath(os.fspath(path))
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file}: missing (not a native aepo_jax parameter directory)")
    with open(config_file) as f:
        config = qwen3.Qwen3Config.from_hf_dict(json.load(f), config_file)
    params_dir = os.path.join(path, "params")
    if not os.path.isdir(params_dir):
        raise FileNotFoundError(f"{params_dir}: missing")
    param_dtype = dtype if param_dtype is None else param_dtype
    abstract = nnx.eval_shape(lambda: qwen3.Qwen3(config, dtype=dtype, param_dtype=param_dtype))
    graphdef, state = nnx.split(abstract)
    target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(params_dir, target)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)

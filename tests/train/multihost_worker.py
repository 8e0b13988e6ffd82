"""One process of the two-process test: `python multihost_worker.py PROCESS_ID PORT [NUM_PROCESSES]`.

With NUM_PROCESSES = 1 it is the single-process reference. Prints one JSON line: the losses of two train
steps and a parameter checksum.
"""

import json
import sys

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from aepo_jax.models import qwen3, sharding
from aepo_jax.train import distributed, step as step_lib

process_id, port = int(sys.argv[1]), int(sys.argv[2])
num_processes = int(sys.argv[3]) if len(sys.argv) > 3 else 2
if num_processes > 1:
    distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
config = qwen3.Qwen3Config(vocab_size=131, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=16)
optimizer = step_lib.make_optimizer(1e-3)
model = qwen3.Qwen3(config, rngs=nnx.Rngs(0))
model.embed_tokens.embedding[...] *= 20.0  # a realistic logit spread: a well-conditioned entropy z-score
model.lm_head.kernel[...] *= 20.0
graphdef, state = step_lib.init_train_state(model, optimizer)
mesh = sharding.make_mesh(data=1, fsdp=-1, tp=1)
specs = sharding.partition_specs(state, mesh)
shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                         is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
state = distributed.global_arrays(state, shardings)
rng = np.random.default_rng(0)
batch = {"tokens": rng.integers(0, 131, (8, 12)).astype(np.int32),
         "attention_mask": np.ones((8, 12), np.int32),
         "loss_mask": (np.arange(12)[None] >= 3).repeat(8, 0).astype(np.float32),
         "old_logprobs": np.full((8, 12), -4.9, np.float32),
         "advantages": rng.normal(size=(8,)).astype(np.float32)}
batch_sharding = sharding.batch_sharding(mesh)
step = step_lib.jit_train_step(graphdef, optimizer, step_lib.LossConfig(), shardings, batch_sharding)
losses = []
for _ in range(2):
    state, metrics = step(state, distributed.global_arrays(batch, batch_sharding))
    losses.append(float(metrics["loss"]))
total = jax.jit(lambda p: sum(x.astype("float32").sum() for x in jax.tree.leaves(p)),
                out_shardings=NamedSharding(mesh, jax.sharding.PartitionSpec()))(state.params)
print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                  "devices": jax.device_count(), "losses": losses, "checksum": float(total)}))

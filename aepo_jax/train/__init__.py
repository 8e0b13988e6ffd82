"""aepo_jax.train: train state, sharded train step, checkpoints, metrics; `python -m aepo_jax.train`."""

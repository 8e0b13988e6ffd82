"""aepo_jax.train."""

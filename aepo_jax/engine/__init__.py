"""aepo_jax.engine."""

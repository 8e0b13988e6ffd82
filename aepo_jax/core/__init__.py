"""aepo_jax.core."""

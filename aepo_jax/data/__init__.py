"""aepo_jax.data."""

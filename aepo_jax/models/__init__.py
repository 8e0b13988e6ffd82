"""aepo_jax.models."""

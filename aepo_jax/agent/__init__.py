"""aepo_jax.agent."""

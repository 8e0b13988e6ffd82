"""Test-session setup: 8 fake CPU devices (for sharding / pmap tests) and a fast hypothesis profile.

XLA_FLAGS must be set before jax initialises its backend, so this runs before any test module imports jax.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from hypothesis import settings  # noqa: E402

settings.register_profile("aepo", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("aepo")

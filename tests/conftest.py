"""Test-session setup: 8 fake CPU devices (for sharding / pmap tests), a fast hypothesis profile, and the
tests marked `slow` first (the README runs the suite on 2 xdist workers with work stealing: a long test that
starts last would leave one worker idle while it runs).

XLA_FLAGS must be set before jax initialises its backend, so this runs before any test module imports jax.

Each test process (an xdist worker) has its own JAX persistent compilation cache, removed when it exits, which
the trainer runs it starts inherit (`--compilation_cache_dir` defaults to JAX's setting): the many runs of the
same tiny shapes load their programs instead of compiling them again.
"""
import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="aepo_jax_xla_cache_")
atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

from hypothesis import settings  # noqa: E402

settings.register_profile("aepo", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("aepo")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: the rest keep their order

"""Test-wide set-up: two fake CPU devices, so every data-parallel path is exercised.

XLA reads the flag once, when jax initialises, so it is set before anything imports jax.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
).strip()
# A tfds download attempt hangs here for minutes; make any accidental one fail fast.
os.environ.setdefault("TFDS_DATA_DIR", "/nonexistent-tfds-data-dir")
os.environ.setdefault("NO_GCE_CHECK", "true")

# Identical programs (the original and the Retrain model share one train step) compile once per
# test session: a persistent compilation cache in a fresh temporary directory.
import tempfile  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="megu-jax-xla-cache-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

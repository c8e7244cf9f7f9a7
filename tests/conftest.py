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

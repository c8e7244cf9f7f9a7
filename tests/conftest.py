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
# test run: a persistent compilation cache in a fresh temporary directory, made by the first
# process that loads this file (pytest-xdist's controller) and shared with its workers through the
# environment, so that a program one worker compiled is not compiled again by the other.
import shutil  # noqa: E402
import tempfile  # noqa: E402

_CACHE_VARIABLE = "MEGU_JAX_TEST_XLA_CACHE"
_OWNS_CACHE = _CACHE_VARIABLE not in os.environ
if _OWNS_CACHE:
  os.environ[_CACHE_VARIABLE] = tempfile.mkdtemp(prefix="megu-jax-xla-cache-")

# The commands apply megu_jax's XLA:CPU settings before JAX starts (megu_jax.xla_cpu); so does the
# test process, so that what a command trains and what a test trains in-process agree bitwise.
from megu_jax import xla_cpu  # noqa: E402

xla_cpu.apply_cpu_defaults()

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_VARIABLE])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
  del config
  if _OWNS_CACHE:
    shutil.rmtree(os.environ.pop(_CACHE_VARIABLE), ignore_errors=True)


# --- the digits task of the baseline tests (test_baselines_*.py) --------------------------------
# Module scope, as when each test module defined them: every module trains its own original. The
# imports sit inside the fixtures so that test modules that use none of them do not pay for them.
import numpy as np  # noqa: E402
import pytest  # noqa: E402

DIGITS_FORGET = "3"  # the class the ``split`` fixture forgets


@pytest.fixture(scope="module")
def digits():
  from megu_jax import datasets
  return datasets.load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits):
  """The 2-epoch digits recipe, trained in memory (no checkpoints: seconds saved).

  A model that knows every class (Dr 93.5, Df 97.3) and, less converged than a long run, shows an
  unstable method's damage.
  """
  from megu_jax.configs import digits as digits_config
  from megu_jax import models
  from megu_jax import train
  config = digits_config.get_config("quick")
  model = models.create_model(config.model, digits.num_classes)
  state, _ = train.fit(config, model, digits.train_images, digits.train_labels,
                       np.arange(len(digits.train_labels)), mean=digits.mean, std=digits.std,
                       key=jax.random.key(config.seed))
  return train.Trained(config=config, model=model, state=state, mean=digits.mean, std=digits.std)


@pytest.fixture(scope="module")
def split(digits):
  from megu_jax import splits
  return splits.make_split(digits, "full_class", forget=(DIGITS_FORGET,))


@pytest.fixture(scope="module")
def data(digits, split):
  """(forget, retain) ``UnlearnData`` of ``split``'s training images."""
  from megu_jax import unlearning
  make = lambda rows: unlearning.UnlearnData.from_positions(digits.train_images,
                                                            digits.train_labels, rows)
  return make(split.forget_train), make(split.retain_train)


@pytest.fixture
def no_compute(monkeypatch):
  """Makes any model evaluation, step compilation or device placement fail loudly: bad input
  must be rejected before any of them."""
  from megu_jax import parallel, train  # pylint: disable=import-outside-toplevel

  def forbidden(*args, **kwargs):
    raise AssertionError("compute started before the input was validated")
  monkeypatch.setattr(train, "predict", forbidden)
  monkeypatch.setattr(parallel.DataParallel, "compile_step", forbidden)
  monkeypatch.setattr(parallel.DataParallel, "put_replicated", forbidden)

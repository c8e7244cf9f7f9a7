r"""scikit-learn's bundled 8x8 digits with a tiny CNN: seconds to train, for tests and smoke runs.

  python -m experiments.train --config=megu_jax/configs/digits.py --workdir=/tmp/digits
"""
import ml_collections

from megu_jax.configs import fashion_mnist
from megu_jax.unlearning import finetune
from megu_jax.unlearning import megu
from megu_jax.unlearning import random_label
from megu_jax.unlearning import salun
from megu_jax.unlearning import scrub
from megu_jax.unlearning import ssd


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = fashion_mnist.get_config()
  config.dataset = "digits"
  config.train_subset = 0  # all 1,437 training images
  config.model = ml_collections.ConfigDict(
      {"name": "small_cnn", "widths": (8, 16, 16), "feature_dim": 32})
  config.batch_size = 32
  config.eval_batch_size = 128
  config.epochs = 6
  config.learning_rate = 0.05
  config.checkpoint_every_steps = 40
  config.log_every_steps = 10
  config.forget = "3"
  config.forget_size = 20
  config.progress = False
  # docs/method.md's baseline settings, not Fashion-MNIST's adjustments (alpha = 100 is tuned for its
  # CNN; its one-epoch caps are relative to its 4-epoch recipe): digits passes cost milliseconds.
  config.ssd = ssd.default_ssd_config()
  config.finetune = finetune.default_finetune_config()
  config.random_label = random_label.default_random_label_config()
  config.salun = salun.default_salun_config()
  config.scrub = scrub.default_scrub_config()
  # The library's random scenario (Fashion-MNIST's unseen-image target needs unseen images of the
  # forgotten samples' classes, and digits trains on all of its images), with SGD, the optimizer
  # its lr 0.01 is for: the class rows' Adam would otherwise carry over.
  config.megu.random_scenario = megu.default_megu_config().random_scenario
  config.megu.random_scenario.optimizer = "sgd"
  config.megu.noise_steps = 30
  config.megu.forget_batch_size = 32
  config.megu.retain_batch_size = 32
  if arg == "quick":
    config.epochs = 2
  return config

r"""CIFAR-10, ResNet-18 (CIFAR form), the SSD benchmark's recipe: for a GPU machine.

Needs CIFAR-10 prepared for tfds in array_record format under DATA_DIR (no download at run time):
  tfds build cifar10 --data_dir=DATA_DIR --file_format=array_record
Train the original model:
  python -m experiments.train --config=megu_jax/configs/cifar10_resnet18.py \
    --workdir=runs/cifar10 --config.data_dir=DATA_DIR
Random forgetting (the SSD protocol's CIFAR-10 scenario):
  python -m experiments.unlearn --config=megu_jax/configs/cifar10_resnet18.py \
    --workdir=runs/cifar10_random --config.data_dir=DATA_DIR

Not run on this project's CPU machines (a full-width ResNet-18 trains at ~27 images/s there); no
result is claimed for it yet. ``:quick`` shrinks it to a narrow net and one epoch for smoke runs.
"""
import ml_collections

from megu_jax.configs import fashion_mnist
from megu_jax.unlearning import megu


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = fashion_mnist.get_config()
  config.dataset = "cifar10"
  config.model = ml_collections.ConfigDict({"name": "resnet18", "width": 1.0})
  # The small CNN's MeGU settings (its conv blocks frozen) name stages a ResNet does not have and
  # were measured on Fashion-MNIST only: the library defaults, which finetune every layer.
  config.megu = megu.default_megu_config()
  # EU-k retrains the ResNet's last stage after layer4: its linear head.
  config.eu_k.freeze_through = "layer4"
  # SSD's recipe: SGD 0.1, momentum 0.9, wd 5e-4, step decay x0.2; crop + flip.
  config.batch_size = 256
  config.eval_batch_size = 1000
  config.train_subset = 0   # the whole training set, as the SSD benchmark trains
  config.epochs = 200
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.schedule = "step"
  config.step_epochs = (60, 120, 160)
  config.step_factor = 0.2
  config.augment = ml_collections.ConfigDict({"crop_padding": 4, "flip": True})
  config.checkpoint_every_steps = 1000
  config.scenario = "random"
  config.forget = ""
  config.forget_size = 100
  if arg == "quick":
    config.model.width = 0.125
    config.epochs = 1
    config.batch_size = 16
    config.eval_batch_size = 16
    config.checkpoint_every_steps = 10
    config.log_every_steps = 5
    config.progress = False
    config.megu.steps = 4
    config.megu.noise_steps = 2
    config.megu.forget_batch_size = 8
    config.megu.retain_batch_size = 8
    config.megu.prototype_samples_per_class = 4
    config.forget_size = 8
  return config

r"""CIFAR-20 (CIFAR-100 images, its 20 superclasses as labels), ResNet-18: the SSD benchmark's
full-class and sub-class forgetting. For a GPU.

Needs CIFAR-100 prepared for tfds in array_record format under DATA_DIR (no download at run time):
  tfds build cifar100 --data_dir=DATA_DIR --file_format=array_record
Full-class (forget the superclass vehicle2 = vehicles_2):
  python -m experiments.unlearn --config=megu_jax/configs/cifar20_resnet18.py \
    --workdir=runs/cifar20 --config.data_dir=DATA_DIR
Sub-class (forget rocket, its superclass vehicles_2 stays):
  python -m experiments.unlearn --config=megu_jax/configs/cifar20_resnet18.py \
    --workdir=runs/cifar20_sub --config.data_dir=DATA_DIR --config.scenario=sub_class \
    --config.forget=rocket
Every protocol cell x 3 seeds, every method:
  python -m experiments.benchmark --config=megu_jax/configs/cifar20_resnet18.py \
    --workdir=runs/cifar20_bench --config.data_dir=DATA_DIR --config.methods=all --config.seeds=3

Not run on this project's CPU machines; no result is claimed for it yet. ``:quick`` shrinks it for
the smoke test on tfds.testing.mock_data.
"""
import ml_collections

from megu_jax.configs import cifar10_resnet18

FULL_CLASS = ("vehicle2", "veg", "people", "electrical_devices", "natural_scenes")
SUB_CLASS = ("rocket", "mushroom", "baby", "lamp", "sea")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = cifar10_resnet18.get_config(arg)
  config.dataset = "cifar20"
  config.scenario = "full_class"
  config.forget = "vehicle2"
  config.benchmark_scenarios = ";".join(
      [f"full_class:{name}" for name in FULL_CLASS] + [f"sub_class:{name}" for name in SUB_CLASS])
  return config

r"""CIFAR-100, ResNet-18 (CIFAR form), full-class forgetting as in the SSD benchmark: for a GPU.

Needs CIFAR-100 prepared for tfds in array_record format under DATA_DIR (no download at run time):
  tfds build cifar100 --data_dir=DATA_DIR --file_format=array_record
One run (forget rocket):
  python -m experiments.unlearn --config=megu_jax/configs/cifar100_resnet18.py \
    --workdir=runs/cifar100 --config.data_dir=DATA_DIR
The protocol's five classes x 3 seeds, every method:
  python -m experiments.benchmark --config=megu_jax/configs/cifar100_resnet18.py \
    --workdir=runs/cifar100_bench --config.data_dir=DATA_DIR --config.methods=all --config.seeds=3

Not run on this project's CPU machines; no result is claimed for it yet. ``:quick`` shrinks it to a
narrow net, one epoch and tiny batches: the smoke test runs it on tfds.testing.mock_data.
"""
import ml_collections

from megu_jax.configs import cifar10_resnet18


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = cifar10_resnet18.get_config(arg)
  config.dataset = "cifar100"
  config.scenario = "full_class"
  config.forget = "rocket"
  config.benchmark_scenarios = ";".join(
      f"full_class:{name}" for name in ("rocket", "mushroom", "baby", "lamp", "sea"))
  return config

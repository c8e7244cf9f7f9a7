"""Smoke tests of the GPU configs of the paper's protocol, end to end on tfds.testing.mock_data.

The mock replaces only the tfds builder's records; our loading code, splits, training, MeGU and
evaluation run for real, with each config's ``:quick`` shrink (narrow ResNet-18, one epoch).
"""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from megu_jax import datasets
from megu_jax.configs import cifar100_resnet18
from megu_jax.configs import cifar10_resnet18
from megu_jax.configs import cifar20_resnet18
from megu_jax.harness import experiment

# A consistent fine -> coarse map (5 fine classes per superclass), as real CIFAR-100 has.
SUPERCLASS_OF = np.array([datasets.CIFAR20_CLASS_NAMES.index(c) for c in (
    datasets.CIFAR20_CLASS_NAMES * 5)])


def _records(self, split, decoders=None, **kwargs):
  """32x32 images, 200 train / 100 test; CIFAR-100 records carry both labels."""
  del decoders, kwargs
  num_classes = 10 if self.name == "cifar10" else 100
  per_class = (200 if split == "train" else 100) // num_classes
  rng = np.random.default_rng(0 if split == "train" else 1)
  labels = np.arange(num_classes * per_class) % num_classes
  records = []
  for i, label in enumerate(labels):
    record = {"id": f"{split}_{i}", "image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
              "label": int(label)}
    if num_classes == 100:
      record["coarse_label"] = int(SUPERCLASS_OF[label])
    records.append(record)
  return records


@pytest.mark.parametrize("config_module,scenario,forget", [
    (cifar100_resnet18, "full_class", "rocket"),
    (cifar20_resnet18, "full_class", "vehicle2"),
    (cifar20_resnet18, "sub_class", "rocket"),
    (cifar10_resnet18, "random", ""),
], ids=["cifar100-full_class", "cifar20-full_class", "cifar20-sub_class", "cifar10-random"])
def test_protocol_config_runs_end_to_end_on_mock_data(tmp_path, config_module, scenario, forget):
  config = config_module.get_config("quick")
  config.data_dir = str(tmp_path / "tfds")
  config.scenario = scenario
  config.forget = forget
  config.methods = "original,megu"
  if scenario == "sub_class":
    # Sub-class protocol names must be real fine classes of the config's data set.
    assert set(cifar20_resnet18.SUB_CLASS) <= set(datasets.CIFAR100_CLASS_NAMES)
  with tfds.testing.mock_data(as_data_source_fn=_records):
    summary = experiment.run_unlearning(config, str(tmp_path / "run"))
  assert summary["scenario"] == scenario
  assert set(summary["methods"]) == {"original", "retrain", "megu"}
  for values in summary["methods"].values():
    assert 0.0 <= values["retain_test_acc"] <= 1.0

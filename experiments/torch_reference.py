"""PyTorch twins of the small CNN and the narrow ResNet-18, for the throughput benchmark only.

``torch`` is an optional, benchmark-only dependency (the ``bench`` extra); nothing else in the
package imports this module. A twin is the same network as its Flax model, layer for layer, and
starts from *the same weights*: :func:`load_flax_params` copies the Flax initialisation (so the
initialisation scheme is identical by construction), and a test checks that one training step of
each gives the same loss and the same updated parameters. The step is the one the JAX step
computes: uint8 -> (x / 255 - mean) / std, forward in training mode (batch statistics),
cross-entropy, backward, SGD with momentum and coupled weight decay, cosine learning rate.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Flax's BatchNorm(momentum=0.9) keeps 0.9 of the old statistics; PyTorch's momentum is the share
# of the new batch, so 0.1. Both use eps=1e-5.
_BN_MOMENTUM = 0.1


class SmallCNN(nn.Module):
  """Twin of :class:`megu_jax.models.SmallCNN`: [conv3x3-BN-ReLU-maxpool2] x 3, dense, head."""

  def __init__(self, in_channels: int, image_size: int, num_classes: int,
               widths=(16, 32, 64), feature_dim: int = 128):
    super().__init__()
    self.convs = nn.ModuleList()
    self.norms = nn.ModuleList()
    channels, size = in_channels, image_size
    for width in widths:
      self.convs.append(nn.Conv2d(channels, width, 3, padding=1, bias=False))
      self.norms.append(nn.BatchNorm2d(width, momentum=_BN_MOMENTUM))
      channels, size = width, size // 2
    self.final_size = size
    self.feature_layer = nn.Linear(channels * size * size, feature_dim)
    self.classifier = nn.Linear(feature_dim, num_classes)

  def forward(self, x):
    for conv, norm in zip(self.convs, self.norms):
      x = F.max_pool2d(F.relu(norm(conv(x))), 2)
    return self.classifier(F.relu(self.feature_layer(torch.flatten(x, 1))))


class BasicBlock(nn.Module):
  def __init__(self, in_channels: int, channels: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(channels, momentum=_BN_MOMENTUM)
    self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(channels, momentum=_BN_MOMENTUM)
    self.shortcut = None
    if stride != 1 or in_channels != channels:
      self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                    nn.BatchNorm2d(channels, momentum=_BN_MOMENTUM))

  def forward(self, x):
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    return F.relu((x if self.shortcut is None else self.shortcut(x)) + y)


class ResNet18(nn.Module):
  """Twin of :class:`megu_jax.models.ResNet18` (CIFAR stem, width multiplier)."""

  def __init__(self, in_channels: int, num_classes: int, width: float = 1.0):
    super().__init__()
    channels = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
    self.stem_conv = nn.Conv2d(in_channels, channels[0], 3, 1, 1, bias=False)
    self.stem_bn = nn.BatchNorm2d(channels[0], momentum=_BN_MOMENTUM)
    blocks, previous = [], channels[0]
    for i, c in enumerate(channels):
      for b in range(2):
        blocks.append(BasicBlock(previous, c, 1 if i == 0 or b > 0 else 2))
        previous = c
    self.blocks = nn.Sequential(*blocks)
    self.classifier = nn.Linear(previous, num_classes)

  def forward(self, x):
    x = self.blocks(F.relu(self.stem_bn(self.stem_conv(x))))
    return self.classifier(x.mean(dim=(2, 3)))


def create_twin(model_config: dict, image_shape, num_classes: int) -> nn.Module:
  height, _, channels = image_shape
  if model_config["name"] == "small_cnn":
    return SmallCNN(channels, height, num_classes, tuple(model_config.get("widths", (16, 32, 64))),
                    model_config.get("feature_dim", 128))
  if model_config["name"] == "resnet18":
    return ResNet18(channels, num_classes, model_config.get("width", 1.0))
  raise ValueError(f"no PyTorch twin of model {model_config['name']!r}")


# --- weights from Flax ---------------------------------------------------------------------------
def _tensor(array) -> torch.Tensor:
  """A PyTorch copy of a (possibly read-only, device-fetched) array."""
  return torch.tensor(np.asarray(array, np.float32))


def _conv(kernel) -> torch.Tensor:
  """Flax HWIO -> PyTorch OIHW."""
  return _tensor(np.asarray(kernel).transpose(3, 2, 0, 1))


def _dense(kernel) -> torch.Tensor:
  return _tensor(np.asarray(kernel).T)


def _set_bn(bn: nn.BatchNorm2d, params: dict, stats: dict) -> None:
  bn.weight.copy_(_tensor(params["scale"]))
  bn.bias.copy_(_tensor(params["bias"]))
  bn.running_mean.copy_(_tensor(stats["mean"]))
  bn.running_var.copy_(_tensor(stats["var"]))


@torch.no_grad()
def load_flax_params(twin: nn.Module, params: dict, batch_stats: dict) -> None:
  """Copies a Flax model's parameters and BatchNorm statistics into its twin, in place."""
  if isinstance(twin, SmallCNN):
    for i, (conv, bn) in enumerate(zip(twin.convs, twin.norms)):
      conv.weight.copy_(_conv(params[f"conv{i + 1}"]["kernel"]))
      _set_bn(bn, params[f"bn{i + 1}"], batch_stats[f"bn{i + 1}"])
    # Flax flattens NHWC as (h, w, c); PyTorch flattens NCHW as (c, h, w): permute the rows.
    kernel = np.asarray(params["feature_layer"]["kernel"])
    size, channels = twin.final_size, twin.convs[-1].out_channels
    kernel = kernel.reshape(size, size, channels, -1).transpose(2, 0, 1, 3).reshape(
        channels * size * size, -1)
    twin.feature_layer.weight.copy_(_dense(kernel))
    twin.feature_layer.bias.copy_(_tensor(params["feature_layer"]["bias"]))
  elif isinstance(twin, ResNet18):
    twin.stem_conv.weight.copy_(_conv(params["stem_conv"]["kernel"]))
    _set_bn(twin.stem_bn, params["stem_bn"], batch_stats["stem_bn"])
    for index, block in enumerate(twin.blocks):
      name = f"layer{index // 2 + 1}_block{index % 2 + 1}"
      p, s = params[name], batch_stats[name]
      block.conv1.weight.copy_(_conv(p["conv1"]["kernel"]))
      block.conv2.weight.copy_(_conv(p["conv2"]["kernel"]))
      _set_bn(block.bn1, p["bn1"], s["bn1"])
      _set_bn(block.bn2, p["bn2"], s["bn2"])
      if block.shortcut is not None:
        block.shortcut[0].weight.copy_(_conv(p["shortcut_conv"]["kernel"]))
        _set_bn(block.shortcut[1], p["shortcut_bn"], s["shortcut_bn"])
  else:
    raise TypeError(f"not a twin: {type(twin).__name__}")
  twin.classifier.weight.copy_(_dense(params["classifier"]["kernel"]))
  twin.classifier.bias.copy_(_tensor(params["classifier"]["bias"]))


# --- the step -------------------------------------------------------------------------------------
class TorchTrainStep:
  """The PyTorch train step of a twin, over pre-built uint8 batches (NHWC, as JAX gets them).

  ``channels_last`` keeps activations in NHWC memory order (PyTorch's faster CPU layout for some
  convolution sizes); the default is PyTorch's usual NCHW.
  """

  def __init__(self, twin: nn.Module, batches: list[dict[str, np.ndarray]], *, mean, std,
               learning_rate: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4,
               total_steps: int = 1000, channels_last: bool = False):
    self.model = twin.train()
    self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
    self.model.to(memory_format=self.memory_format)
    # The batches arrive NHWC; a permuted view is NCHW-shaped, and .contiguous(memory_format=...)
    # inside the step materialises the layout the network runs in, as a data loader would.
    self.batches = [(torch.from_numpy(b["image"]).permute(0, 3, 1, 2),
                     torch.from_numpy(b["label"].astype(np.int64))) for b in batches]
    self.mean = torch.tensor(np.asarray(mean, np.float32)).view(1, -1, 1, 1)
    self.std = torch.tensor(np.asarray(std, np.float32)).view(1, -1, 1, 1)
    self.optimizer = torch.optim.SGD(self.model.parameters(), lr=learning_rate,
                                     momentum=momentum, weight_decay=weight_decay)
    # optax.cosine_decay_schedule(lr, total_steps): lr * (1 + cos(pi * t / T)) / 2.
    self.scheduler = torch.optim.lr_scheduler.LambdaLR(
        self.optimizer, lambda t: 0.5 * (1 + np.cos(np.pi * min(t, total_steps) / total_steps)))
    self.steps_done = 0

  def step(self, images_uint8, labels) -> torch.Tensor:
    images = ((images_uint8.float() / 255.0 - self.mean) / self.std).contiguous(
        memory_format=self.memory_format)
    self.optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(self.model(images), labels)
    loss.backward()
    self.optimizer.step()
    self.scheduler.step()
    return loss.detach()

  def run(self, steps: int) -> Any:
    """``steps`` steps; PyTorch's CPU ops are synchronous, so the work is done on return."""
    loss = None
    for _ in range(steps):
      images, labels = self.batches[self.steps_done % len(self.batches)]
      loss = self.step(images, labels)
      self.steps_done += 1
    return loss


def versions() -> dict[str, Any]:
  return {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}

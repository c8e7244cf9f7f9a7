"""Image classifiers that return their logits *and* their named intermediate activations.

Every model is a sequence of named stages. ``model.apply(variables, images, train=...)`` returns
``(logits, activations)`` where ``activations`` maps each stage name (in order, ``"features"`` being
the penultimate vector) to its output. ``from_activation=NAME`` starts the network *after* stage
NAME, taking that stage's output as input: this is how a train step transforms an activation (the
MeGU noise pair) and runs the rest of the network on the result, without hiding anything inside the
module. ``until=NAME`` stops after stage NAME (logits ``None``): the frozen prefix of a network
whose later stages alone are trained. ``model.apply(variables, features, method="head")`` is the
classifier head alone.

Images are float32 ``[batch, height, width, channels]``, already normalised.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

Array = Any
MODEL_NAMES = ("small_cnn", "resnet18", "vit")


def _run_stages(stages: Sequence[tuple[str, Callable[[Array], Array]]], x: Array,
                from_activation: str | None, until: str | None = None
                ) -> tuple[Array | None, dict[str, Array]]:
  """Runs ``stages`` (the last one must be ``"logits"``) from just after ``from_activation``.

  With ``until``, stops after that stage and returns ``(None, activations)``: a frozen prefix of
  the network computed without running (or differentiating) the rest.
  """
  names = [name for name, _ in stages]
  if until is not None:
    if until not in names[:-1]:
      raise ValueError(f"until={until!r} is not an activation of this model; "
                       f"valid names: {names[:-1]}")
    stages = stages[:names.index(until) + 1]
  if from_activation is None:
    start = 0
  elif from_activation in names[:-1]:
    start = names.index(from_activation) + 1
  else:
    raise ValueError(
        f"from_activation={from_activation!r} is not an activation of this model; "
        f"valid names: {names[:-1]}")
  activations = {}
  for name, stage in stages[start:]:
    x = stage(x)
    activations[name] = x
  logits = activations.pop("logits", None)
  return logits, activations


def max_pool_2x2(x: Array) -> Array:
  """2x2 max-pool, stride 2, VALID (odd sizes drop their last row/column), as a reshape + max.

  The same function as ``nn.max_pool(x, (2, 2), strides=(2, 2))``, but its gradient is a cheap
  comparison instead of XLA's select-and-scatter, which is slow on CPU: the small CNN's training
  step measured ~1.4x faster with it (batch 128, 2 CPU cores).
  """
  batch, height, width, channels = x.shape
  x = x[:, :height // 2 * 2, :width // 2 * 2]
  return x.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))


class SmallCNN(nn.Module):
  """Three conv-BN-ReLU-maxpool blocks, a dense penultimate layer and a linear head.

  The Fashion-MNIST default (16/32/64 channels, 128 features): lean because XLA's CPU convolutions
  are slow, and still ~92% test accuracy.
  """
  num_classes: int
  widths: Sequence[int] = (16, 32, 64)
  feature_dim: int = 128
  bn_axis_name: str | None = None  # set under jax.pmap so BatchNorm statistics span all devices

  activation_names = ("block1", "block2", "block3", "features")

  def setup(self):
    self.convs = [nn.Conv(w, (3, 3), use_bias=False, name=f"conv{i + 1}")
                  for i, w in enumerate(self.widths)]
    self.norms = [nn.BatchNorm(momentum=0.9, axis_name=self.bn_axis_name, name=f"bn{i + 1}")
                  for i in range(len(self.widths))]
    self.feature_layer = nn.Dense(self.feature_dim, name="feature_layer")
    self.classifier = nn.Dense(self.num_classes, name="classifier")

  def _block(self, i: int, x: Array, train: bool) -> Array:
    x = self.convs[i](x)
    x = self.norms[i](x, use_running_average=not train)
    return max_pool_2x2(nn.relu(x))

  def __call__(self, x: Array, train: bool = False, from_activation: str | None = None,
               until: str | None = None):
    stages = [(f"block{i + 1}", lambda x, i=i: self._block(i, x, train))
              for i in range(len(self.widths))]
    stages += [
        ("features", lambda x: nn.relu(self.feature_layer(x.reshape(x.shape[0], -1)))),
        ("logits", self.classifier),
    ]
    return _run_stages(stages, x, from_activation, until)

  def head(self, features: Array) -> Array:
    """``[batch, feature_dim] -> [batch, num_classes]``."""
    return self.classifier(features)


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""
  channels: int
  strides: int = 1
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                     axis_name=self.bn_axis_name, name=name)
    y = nn.Conv(self.channels, (3, 3), strides=self.strides, padding=1, use_bias=False,
                name="conv1")(x)
    y = nn.relu(norm("bn1")(y))
    y = nn.Conv(self.channels, (3, 3), padding=1, use_bias=False, name="conv2")(y)
    y = norm("bn2")(y)
    if x.shape[-1] != self.channels or self.strides != 1:
      x = nn.Conv(self.channels, (1, 1), strides=self.strides, use_bias=False,
                  name="shortcut_conv")(x)
      x = norm("shortcut_bn")(x)
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """ResNet-18 in its CIFAR form: 3x3 stride-1 stem, no max-pool, [2, 2, 2, 2] basic blocks.

  ``width`` multiplies the channel counts (64, 128, 256, 512); 0.25 gives the narrow 16-128 net.
  """
  num_classes: int
  width: float = 1.0
  bn_axis_name: str | None = None

  activation_names = ("stem", "layer1", "layer2", "layer3", "layer4", "features")

  def setup(self):
    channels = [max(1, int(round(c * self.width))) for c in (64, 128, 256, 512)]
    self.stem_conv = nn.Conv(channels[0], (3, 3), padding=1, use_bias=False, name="stem_conv")
    self.stem_bn = nn.BatchNorm(momentum=0.9, axis_name=self.bn_axis_name, name="stem_bn")
    self.layers = [
        [BasicBlock(c, strides=(1 if i == 0 or b > 0 else 2), bn_axis_name=self.bn_axis_name,
                    name=f"layer{i + 1}_block{b + 1}") for b in range(2)]
        for i, c in enumerate(channels)
    ]
    self.classifier = nn.Dense(self.num_classes, name="classifier")

  def _layer(self, i: int, x: Array, train: bool) -> Array:
    for block in self.layers[i]:
      x = block(x, train)
    return x

  def __call__(self, x: Array, train: bool = False, from_activation: str | None = None,
               until: str | None = None):
    stages = [("stem", lambda x: nn.relu(
        self.stem_bn(self.stem_conv(x), use_running_average=not train)))]
    stages += [(f"layer{i + 1}", lambda x, i=i: self._layer(i, x, train)) for i in range(4)]
    stages += [("features", lambda x: jnp.mean(x, axis=(1, 2))), ("logits", self.classifier)]
    return _run_stages(stages, x, from_activation, until)

  def head(self, features: Array) -> Array:
    return self.classifier(features)


class PatchEmbedding(nn.Module):
  """Non-overlapping patches projected to ``hidden_dim``, plus learned position embeddings."""
  patch_size: int
  hidden_dim: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Conv(self.hidden_dim, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                padding="VALID", name="projection")(x)
    batch, height, width, dim = x.shape
    x = x.reshape(batch, height * width, dim)
    positions = self.param("positions", nn.initializers.normal(0.02), (1, height * width, dim))
    return x + positions


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: self-attention and an MLP, each with a residual."""
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    y = nn.LayerNorm(name="ln1")(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attention")(y, y)
    x = x + y
    y = nn.LayerNorm(name="ln2")(x)
    y = nn.Dense(self.mlp_dim, name="mlp_in")(y)
    y = nn.Dense(x.shape[-1], name="mlp_out")(nn.gelu(y))
    return x + y


class ViT(nn.Module):
  """A small Vision Transformer trained from scratch: patch embedding, learned positions, mean pool."""
  num_classes: int
  patch_size: int = 4
  hidden_dim: int = 64
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 128
  bn_axis_name: str | None = None  # unused (no BatchNorm); accepted so every model builds alike

  @property
  def activation_names(self):
    return ("embed",) + tuple(f"block{i + 1}" for i in range(self.depth)) + ("features",)

  def setup(self):
    self.patch_embed = PatchEmbedding(self.patch_size, self.hidden_dim, name="patch_embed")
    self.blocks = [EncoderBlock(self.num_heads, self.mlp_dim, name=f"block{i + 1}")
                   for i in range(self.depth)]
    self.final_norm = nn.LayerNorm(name="final_norm")
    self.classifier = nn.Dense(self.num_classes, name="classifier")

  def __call__(self, x: Array, train: bool = False, from_activation: str | None = None,
               until: str | None = None):
    del train  # no dropout or BatchNorm
    stages = [("embed", self.patch_embed)]
    stages += [(f"block{i + 1}", block) for i, block in enumerate(self.blocks)]
    stages += [("features", lambda x: self.final_norm(jnp.mean(x, axis=1))),
               ("logits", self.classifier)]
    return _run_stages(stages, x, from_activation, until)

  def head(self, features: Array) -> Array:
    return self.classifier(features)


def create_model(model_config: ml_collections.ConfigDict, num_classes: int,
                 bn_axis_name: str | None = None) -> nn.Module:
  """Builds the model named by ``model_config.name`` with the other fields as its arguments."""
  kwargs = dict(model_config)
  name = kwargs.pop("name", None)
  constructors = {"small_cnn": SmallCNN, "resnet18": ResNet18, "vit": ViT}
  if name not in constructors:
    raise ValueError(f"config.model.name={name!r} is not a model; valid names: {MODEL_NAMES}")
  for key, value in kwargs.items():
    if isinstance(value, list):
      kwargs[key] = tuple(value)
  try:
    return constructors[name](num_classes=num_classes, bn_axis_name=bn_axis_name, **kwargs)
  except TypeError as error:
    raise ValueError(f"config.model has a field that {name} does not take: {error}") from None

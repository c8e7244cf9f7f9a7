"""Model output shapes, named activations, and running the rest of the network from an activation."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from megu_jax import models

CASES = [
    ({"name": "small_cnn"}, (28, 28, 1),
     {"block1": (14, 14, 16), "block2": (7, 7, 32), "block3": (3, 3, 64), "features": (128,)}),
    ({"name": "resnet18", "width": 0.25}, (32, 32, 3),
     {"stem": (32, 32, 16), "layer1": (32, 32, 16), "layer2": (16, 16, 32),
      "layer3": (8, 8, 64), "layer4": (4, 4, 128), "features": (128,)}),
    ({"name": "vit", "depth": 2}, (32, 32, 3),
     {"embed": (64, 64), "block1": (64, 64), "block2": (64, 64), "features": (64,)}),
]


@pytest.mark.parametrize("model_config,image_shape,expected", CASES,
                         ids=[c[0]["name"] for c in CASES])
def test_logits_activations_and_partial_application(model_config, image_shape, expected):
  model = models.create_model(ml_collections.ConfigDict(model_config), num_classes=7)
  images = jax.random.normal(jax.random.key(0), (3,) + image_shape)
  variables = model.init(jax.random.key(1), images, train=False)
  logits, activations = model.apply(variables, images, train=False)

  assert logits.shape == (3, 7)
  assert list(activations) == list(model.activation_names)
  assert {k: v.shape[1:] for k, v in activations.items()} == expected

  # The head alone maps the features to the same logits.
  np.testing.assert_allclose(model.apply(variables, activations["features"], method="head"),
                             logits, rtol=1e-5, atol=1e-5)
  # Starting after any activation reproduces the logits and the later activations.
  for name in model.activation_names:
    rest_logits, rest = model.apply(variables, activations[name], train=False,
                                    from_activation=name)
    np.testing.assert_allclose(rest_logits, logits, rtol=1e-5, atol=1e-5)
    later = model.activation_names[model.activation_names.index(name) + 1:]
    assert list(rest) == list(later)
    # Stopping after it computes the prefix alone: its activations, no logits.
    no_logits, prefix = model.apply(variables, images, train=False, until=name)
    earlier = model.activation_names[:model.activation_names.index(name) + 1]
    assert no_logits is None and list(prefix) == list(earlier)
    np.testing.assert_allclose(prefix[name], activations[name], rtol=1e-6, atol=1e-6)


def test_a_transformed_activation_changes_the_output():
  model = models.SmallCNN(num_classes=10)
  images = jnp.ones((2, 28, 28, 1))
  variables = model.init(jax.random.key(0), images)
  _, activations = model.apply(variables, images)
  shifted = activations["block2"] + 1.0
  logits, _ = model.apply(variables, shifted, from_activation="block2")
  assert not np.allclose(logits, model.apply(variables, images)[0])


def test_resnet18_full_width_has_the_cifar_form():
  model = models.ResNet18(num_classes=10)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3))))
  params = variables["params"]
  assert params["stem_conv"]["kernel"].shape == (3, 3, 3, 64)  # 3x3 stride-1 stem
  assert sorted(k for k in params if k.startswith("layer")) == [
      f"layer{i}_block{b}" for i in range(1, 5) for b in (1, 2)]
  n_params = sum(np.prod(x.shape) for x in jax.tree.leaves(params))
  assert 11.1e6 < n_params < 11.3e6  # the CIFAR ResNet-18's 11.17M parameters


def test_bad_model_config_names_the_value():
  with pytest.raises(ValueError, match="'resnet50'.*small_cnn"):
    models.create_model(ml_collections.ConfigDict({"name": "resnet50"}), 10)
  with pytest.raises(ValueError, match="from_activation='nope'"):
    model = models.SmallCNN(num_classes=3)
    variables = model.init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))
    model.apply(variables, jnp.ones((1, 28, 28, 1)), from_activation="nope")
  with pytest.raises(ValueError, match="until='logits'.*'features'"):
    model.apply(variables, jnp.ones((1, 28, 28, 1)), until="logits")


def test_max_pool_2x2_equals_flax_max_pool_including_odd_sizes():
  x = jax.random.normal(jax.random.key(3), (2, 7, 9, 3))
  np.testing.assert_array_equal(models.max_pool_2x2(x),
                                models.nn.max_pool(x, (2, 2), strides=(2, 2)))

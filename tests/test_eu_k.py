"""EU-k on digits: the stages after the frozen prefix retrained on the retain set alone."""
import jax
import numpy as np
import pytest

from megu_jax import datasets
from megu_jax import ensemble_metrics
from megu_jax import metrics
from megu_jax import splits
from megu_jax import train
from megu_jax import unlearning
from megu_jax.configs import digits as digits_config
from megu_jax.unlearning import megu as megu_lib


@pytest.fixture(scope="module")
def digits():
  return datasets.load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("digits_original"))
  config = digits_config.get_config()
  config.epochs = 3
  train.train_and_evaluate(config, workdir, dataset=digits)
  return train.restore_trained(workdir)


@pytest.fixture(scope="module")
def data(digits):
  split = splits.make_split(digits, "full_class", forget=("3",))
  take = lambda rows: unlearning.UnlearnData.from_positions(digits.train_images,
                                                            digits.train_labels, rows)
  return take(split.forget_train), take(split.retain_train)


def margins(model, data):
  return ensemble_metrics.margins(train.predict(model, data.images)["logits"], data.labels)


def test_eu_k_retrains_the_last_stages_and_keeps_the_prefix(trained, data):
  forget, retain = data
  config = digits_config.get_config()
  timings = {}
  unlearned = unlearning.get_method("eu_k")(trained, forget, retain, config, jax.random.key(0),
                                            timings=timings)
  before, after = trained.state.params, unlearned.state.params
  for name in before:
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[name]),
                                                     jax.tree.leaves(after[name])))
    assert same == (name not in ("feature_layer", "classifier")), name
  # The new stages never saw the class: none of its images is called by it; the rest is known.
  assert np.all(margins(unlearned, forget) < 0)
  logits = train.predict(unlearned, retain.images)["logits"]
  assert metrics.accuracy(logits, retain.labels) > 0.95
  assert timings["train_s"] > 0 and timings["compile_s"] > 0


def test_eu_k_is_the_stand_in_megus_margin_target_reads(trained, data):
  forget, retain = data
  config = digits_config.get_config()
  config.megu.update(forget_target="retained_head_margin", freeze_through="block3",
                     prototype_samples_per_class=50, calibration_heads=1)
  guidance = megu_lib.machine_guidance(trained, forget, retain, config, jax.random.key(0))
  # MeGU's heads take the key folded from its guidance key (method.machine_guidance).
  unlearned = unlearning.get_method("eu_k")(trained, forget, retain, config,
                                            jax.random.fold_in(jax.random.key(0), 1))
  np.testing.assert_allclose(margins(unlearned, forget), guidance.forget_target_margins,
                             rtol=1e-4, atol=1e-4)


def test_the_stages_compiled_initialisation_gives_the_op_by_op_bits(trained, digits):
  # base.retrain_stages_after initialises the stages in one compiled program; results committed
  # before it did (MeGU's stand-in, EU-k) stay reproducible only if both give the same bits.
  example = train.prepare_images({"image": digits.train_images[:1]}, None, trained.mean,
                                 trained.std)
  init = lambda key: trained.model.init(key, example, train=False)["params"]
  keys = jax.random.split(jax.random.key(0), 3)
  op_by_op, compiled = jax.vmap(init)(keys), jax.jit(jax.vmap(init))(keys)
  for a, b in zip(jax.tree.leaves(op_by_op), jax.tree.leaves(compiled), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("field, value, message", [
    ("freeze_through", "block9", "config.eu_k.freeze_through='block9' is not one of"),
    ("epochs", -1, "config.eu_k.epochs=-1 must be an integer >= 0"),
])
def test_bad_eu_k_settings_fail_before_any_compute(trained, data, no_compute, field, value,
                                                   message):
  forget, retain = data
  config = digits_config.get_config()
  config.eu_k[field] = value
  with pytest.raises(unlearning.UnlearningInputError, match=message):
    unlearning.get_method("eu_k")(trained, forget, retain, config, jax.random.key(0))

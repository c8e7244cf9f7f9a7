"""The transition matrix: S -> T, validation, save/load, perturbing labels, offline oracles, heatmap."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megu_jax import oracles
from megu_jax import transition
from megu_jax.harness import plotting
from megu_jax.oracles import offline

FASHION_MNIST = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_GROUP_OF = (0, 1, 0, 2, 0, 3, 0, 3, 4, 3)


def _random_scores(num_classes, seed=0):
  return np.random.default_rng(seed).uniform(0.0, 10.0, (num_classes, num_classes))


def _softmax_off_diagonal(row_logits, own):
  logits = np.array(row_logits, dtype=np.float64)
  logits[own] = -np.inf
  weights = np.exp(logits - logits.max())
  return weights / weights.sum()


# --- scores_to_transition -----------------------------------------------------------------------

def test_transition_is_softmax_over_other_classes_with_exact_zero_diagonal():
  scores = _random_scores(6)
  T = transition.scores_to_transition(scores, temperature=2.0)
  assert T.dtype == np.float64 and T.shape == (6, 6)
  assert np.all(np.diag(T) == 0.0)
  np.testing.assert_allclose(T.sum(axis=1), 1.0, atol=1e-12)
  for i in range(6):
    np.testing.assert_allclose(T[i], _softmax_off_diagonal(scores[i] / 2.0, i), rtol=1e-12)


def test_diagonal_scores_are_ignored():
  scores = _random_scores(4)
  changed = scores.copy()
  np.fill_diagonal(changed, [1e6, -1e6, np.nan, np.inf])
  np.testing.assert_array_equal(transition.scores_to_transition(scores),
                                transition.scores_to_transition(changed))


def test_score_scale_convention_matches_tau_0_1_on_raw_cosine():
  # The prototype oracle scores S = 10 * cosine; tau = 1 on that scale is tau = 0.1 on cosine.
  cosine = np.random.default_rng(1).uniform(0.0, 1.0, (5, 5))
  T = transition.scores_to_transition(10.0 * cosine, temperature=1.0)
  for i in range(5):
    np.testing.assert_allclose(T[i], _softmax_off_diagonal(cosine[i] / 0.1, i), rtol=1e-12)


def test_lower_temperature_concentrates_mass_on_the_most_similar_class():
  scores = np.array([[0, 9, 5], [9, 0, 5], [5, 9, 0]], dtype=float)
  sharp = transition.scores_to_transition(scores, temperature=0.5)
  flat = transition.scores_to_transition(scores, temperature=20.0)
  assert sharp[0, 1] > flat[0, 1] > 0.5
  assert flat[0, 2] > sharp[0, 2] > 0.0


def test_tiny_temperature_and_huge_scores_do_not_overflow():
  T = transition.scores_to_transition(np.full((3, 3), 1e4) + np.eye(3), temperature=1e-3)
  assert np.all(np.isfinite(T))
  np.testing.assert_allclose(T.sum(axis=1), 1.0)


def test_top_k_keeps_exactly_the_k_most_similar_other_classes():
  scores = _random_scores(8, seed=3)
  T = transition.scores_to_transition(scores, temperature=1.0, top_k=3)
  for i in range(8):
    others = [j for j in np.argsort(-scores[i]) if j != i]
    assert set(np.flatnonzero(T[i])) == set(others[:3])
    np.testing.assert_allclose(T[i, others[:3]], _softmax_off_diagonal(scores[i], i)[others[:3]]
                               / _softmax_off_diagonal(scores[i], i)[others[:3]].sum())
  np.testing.assert_allclose(T.sum(axis=1), 1.0)


def test_top_k_breaks_ties_towards_the_lower_class_index():
  T = transition.scores_to_transition(np.zeros((4, 4)), top_k=2)
  np.testing.assert_array_equal(T, [[0, .5, .5, 0], [.5, 0, .5, 0], [.5, .5, 0, 0],
                                    [.5, .5, 0, 0]])


@pytest.mark.parametrize("scores, kwargs, message", [
    (np.zeros((3, 4)), {}, "square"),
    (np.zeros(3), {}, "2-D"),
    (np.zeros((1, 1)), {}, "at least 2 classes"),
    (np.array([[0, np.nan], [1, 0]]), {}, "non-finite entry S[0, 1]"),
    (np.zeros((3, 3)), {"temperature": 0.0}, "temperature"),
    (np.zeros((3, 3)), {"temperature": float("inf")}, "temperature"),
    (np.zeros((3, 3)), {"top_k": 0}, "top_k"),
    (np.zeros((3, 3)), {"top_k": 3}, "[1, 2]"),
    (np.zeros((3, 3)), {"top_k": True}, "top_k"),
])
def test_scores_to_transition_rejects_bad_input(scores, kwargs, message):
  with pytest.raises(transition.InvalidTransitionError) as error:
    transition.scores_to_transition(scores, **kwargs)
  assert message in str(error.value)


# --- validate_transition ------------------------------------------------------------------------

def _valid_T(num_classes=4):
  return transition.scores_to_transition(_random_scores(num_classes, seed=5))


def test_a_valid_matrix_passes_in_numpy_jax_and_float32():
  T = _valid_T()
  transition.validate_transition(T, 4)
  transition.validate_transition(jnp.asarray(T, jnp.float32), 4)


def _with(T, i, j, value):
  T = T.copy()
  T[i, j] = value
  return T


def _with_diagonal_mass(T):
  """Row 1 keeps summing to 1, but a tenth of its mass sits on the diagonal."""
  T = T.copy()
  T[1] *= 0.9
  T[1, 1] = 0.1
  return T


@pytest.mark.parametrize("make_bad, message", [
    (lambda T: T[:, :3], "must be square, got shape (4, 3)"),
    (lambda T: T[None], "must be 2-D"),
    (lambda T: _with(T, 2, 1, np.nan), "non-finite entry T[2, 1]"),
    (lambda T: _with(T, 1, 3, np.inf), "non-finite entry T[1, 3]"),
    (lambda T: _with(_with(T, 3, 0, -0.1), 3, 1, T[3, 1] + T[3, 0] + 0.1),
     "negative entry T[3, 0] = -0.1 in row 3 (Dress)"),
    (_with_diagonal_mass, "non-zero diagonal entry T[1, 1] = 0.1 in row 1 (Trouser)"),
    (lambda T: _with(T, 2, 1, T[2, 1] + 1e-4), "row 2 (Pullover) of the transition matrix sums to"),
    (lambda T: T * 0.5, "row 0 (T-shirt/top)"),
])
def test_validation_names_what_is_wrong(make_bad, message):
  bad = make_bad(_valid_T())
  with pytest.raises(transition.InvalidTransitionError) as error:
    transition.validate_transition(bad, class_names=FASHION_MNIST)
  assert message in str(error.value)


def test_validation_rejects_a_size_that_differs_from_the_class_count():
  with pytest.raises(transition.InvalidTransitionError, match="4 x 4 but the data set has 10"):
    transition.validate_transition(_valid_T(), num_classes=10)


def test_validation_rejects_a_negative_entry_even_when_the_row_sums_to_one():
  T = np.array([[0, 1.5, -0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
  with pytest.raises(transition.InvalidTransitionError, match=r"negative entry T\[0, 2\] = -0.5"):
    transition.validate_transition(T)


def test_row_sum_tolerance_is_1e_6():
  T = np.array([[0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
  transition.validate_transition(_with(T, 0, 1, 0.5 + 5e-7))
  with pytest.raises(transition.InvalidTransitionError, match="within 1e-06"):
    transition.validate_transition(_with(T, 0, 1, 0.5 + 2e-6))


def test_validation_rejects_non_numeric_input():
  with pytest.raises(transition.InvalidTransitionError, match="not a numeric array"):
    transition.validate_transition([["a", "b"], ["c", "d"]])


# --- save / load --------------------------------------------------------------------------------

def test_save_and_load_round_trip_with_provenance(tmp_path):
  path = str(tmp_path / "sub" / "t.npy")
  T = _valid_T()
  transition.save_transition(path, T, {"oracle": "uniform", "class_names": FASHION_MNIST[:4],
                                       "temperature": 1.0, "top_k": None, "model": None,
                                       "prompt_sha256": None})
  loaded = transition.load_transition(path, num_classes=4)
  assert isinstance(loaded, jax.Array) and loaded.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(loaded), T, rtol=1e-6)
  record = transition.load_provenance(path)
  assert record["oracle"] == "uniform" and record["class_names"] == list(FASHION_MNIST[:4])
  assert record["num_classes"] == 4 and record["temperature"] == 1.0 and record["top_k"] is None
  assert "date" in record and len(record["transition_sha256"]) == 64
  assert sorted(os.listdir(tmp_path / "sub")) == ["t.json", "t.npy"]  # no temporary files left


def test_a_failed_save_leaves_the_earlier_matrix_and_record_untouched(tmp_path):
  path = str(tmp_path / "t.npy")
  transition.save_transition(path, _valid_T(), {"oracle": "first"})
  before = {name: (tmp_path / name).read_bytes() for name in ("t.npy", "t.json")}
  with pytest.raises(transition.InvalidTransitionError):
    transition.save_transition(path, _valid_T() * 2, {"oracle": "second"})
  with pytest.raises(ValueError, match="not JSON-serialisable"):
    transition.save_transition(path, _valid_T(), {"oracle": object()})
  with pytest.raises(transition.InvalidTransitionError, match="3 class names"):
    transition.save_transition(path, _valid_T(), {"class_names": ["a", "b", "c"]})
  assert {name: (tmp_path / name).read_bytes() for name in before} == before
  assert sorted(os.listdir(tmp_path)) == ["t.json", "t.npy"]


def test_save_requires_an_npy_path(tmp_path):
  with pytest.raises(ValueError, match="must end in .npy"):
    transition.save_transition(str(tmp_path / "t.txt"), _valid_T(), {})


def test_load_names_the_file_when_the_matrix_is_invalid(tmp_path):
  path = str(tmp_path / "bad.npy")
  np.save(path, _valid_T() * 2)
  with pytest.raises(transition.InvalidTransitionError, match=r"bad\.npy: row 0 .* sums to"):
    transition.load_transition(path)
  np.save(path, _valid_T())
  with pytest.raises(transition.InvalidTransitionError, match=r"bad\.npy: .*data set has 10"):
    transition.load_transition(path, num_classes=10)


def test_load_never_unpickles(tmp_path):
  path = str(tmp_path / "pickled.npy")
  np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
  with pytest.raises(transition.InvalidTransitionError, match=r"pickled\.npy"):
    transition.load_transition(path)


def test_load_of_a_missing_file_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothere.npy"):
    transition.load_transition(str(tmp_path / "nothere.npy"))


# --- offline oracles and the registry -----------------------------------------------------------

def test_prototype_scores_are_ten_times_the_clipped_cosine_of_class_means():
  prototypes = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [-1.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
  labels = np.repeat(np.arange(4), 50)
  noise = np.random.default_rng(0).normal(size=(200, 3))
  # Remove each class's noise mean so the class means are exactly the prototypes.
  noise -= np.stack([noise[labels == c].mean(0) for c in range(4)])[labels]
  S = offline.prototype_scores(prototypes[labels] + noise, labels, 4)
  assert S.shape == (4, 4) and np.all(np.diag(S) == 0)
  np.testing.assert_allclose(S, S.T)
  np.testing.assert_allclose(S[0, 1], 10 * np.sqrt(0.5), rtol=1e-10)
  np.testing.assert_allclose(S[1, 3], 10 * 0.5, rtol=1e-10)
  assert S[0, 2] == 0.0 and S[1, 2] == 0.0  # cosines -0.71 and -0.5 are clipped to 0


@pytest.mark.parametrize("features, labels, num_classes, message", [
    (np.ones((4, 2)), np.array([0, 0, 1, 1]), 3, "class 2 has no samples"),
    (np.ones((4, 2)), np.array([0, 0, 1, 5]), 3, "labels must lie in [0, 3)"),
    (np.ones((4, 2)), np.array([0, 1, 2]), 3, "shape [4]"),
    (np.ones(4), np.array([0, 1, 2, 2]), 3, "2-D"),
    (np.full((3, 2), np.nan), np.array([0, 1, 2]), 3, "non-finite"),
    (np.array([[0.0, 0.0], [1.0, 0.0]]), np.array([0, 1]), 2, "class 0 has an all-zero mean"),
    (np.ones((2, 2)), np.array([0, 1]), 1, "num_classes must be an integer >= 2"),
])
def test_prototype_scores_reject_bad_input(features, labels, num_classes, message):
  with pytest.raises(offline.OracleInputError) as error:
    offline.prototype_scores(features, labels, num_classes)
  assert message in str(error.value)


def test_hierarchy_scores_follow_the_superclasses():
  S = offline.hierarchy_scores(np.asarray(FASHION_MNIST_GROUP_OF))
  shirt = FASHION_MNIST.index("Shirt")
  assert {FASHION_MNIST[j] for j in np.flatnonzero(S[shirt] == 10)} == {
      "T-shirt/top", "Pullover", "Coat"}
  assert np.all(np.diag(S) == 0) and set(np.unique(S)) == {0.0, 10.0}
  T = transition.scores_to_transition(S)
  assert T[shirt, FASHION_MNIST.index("Coat")] > 0.33
  np.testing.assert_allclose(T[FASHION_MNIST.index("Bag")], np.where(np.arange(10) == 8, 0, 1 / 9))


@pytest.mark.parametrize("superclass_of, message", [
    (None, "has none"),
    (np.arange(4), "every class in its own group"),
    (np.array([[0, 1]]), "1-D integer array"),
])
def test_hierarchy_scores_raise_without_a_useful_grouping(superclass_of, message):
  with pytest.raises(offline.OracleInputError, match=message):
    offline.hierarchy_scores(superclass_of)


def test_uniform_scores_give_a_uniform_transition():
  T = transition.scores_to_transition(offline.uniform_scores(5))
  np.testing.assert_allclose(T, (1 - np.eye(5)) / 4)
  with pytest.raises(offline.OracleInputError, match="num_classes"):
    offline.uniform_scores(1)


def test_registry_names_and_unknown_oracle_error():
  assert set(oracles.ORACLES) == {"gemini", "prototype", "hierarchy", "uniform"}
  assert oracles.get_oracle("uniform") is offline.uniform_scores
  with pytest.raises(oracles.UnknownOracleError, match="'gpt'.*gemini.*hierarchy.*prototype"):
    oracles.get_oracle("gpt")


# --- heatmap ------------------------------------------------------------------------------------

def test_heatmap_is_a_png_written_without_leftovers(tmp_path):
  path = str(tmp_path / "heat.png")
  assert plotting.plot_transition_heatmap(_valid_T(4), FASHION_MNIST[:4], path, "title") == path
  assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.listdir(tmp_path) == ["heat.png"]
  with pytest.raises(ValueError, match="3 class names for a 4 x 4"):
    plotting.plot_transition_heatmap(_valid_T(4), FASHION_MNIST[:3], path)

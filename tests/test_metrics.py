"""Tests of megu_jax.metrics on hand-made inputs whose answers are known."""
import math

import numpy as np
import pytest

from megu_jax import metrics

NUM_CLASSES = 10


def _logits_with_true_class_logit(true_class_logit, labels, num_classes=NUM_CLASSES):
  """Logits [N, K]: `true_class_logit` at each sample's label, 0 elsewhere.

  The true-class confidence is then e^a / (e^a + K - 1), and the entropy falls as a grows.
  """
  true_class_logit = np.asarray(true_class_logit, np.float64)
  logits = np.zeros((true_class_logit.shape[0], num_classes), np.float32)
  logits[np.arange(true_class_logit.shape[0]), labels] = true_class_logit
  return logits


def _two_class_logits(first_logit):
  """Logits [N, 2] = [a, 0]: entropy falls monotonically as a grows above 0."""
  first_logit = np.asarray(first_logit, np.float32)
  return np.stack([first_logit, np.zeros_like(first_logit)], axis=1)


# ------------------------------------------------------------------ accuracies


def test_accuracy_on_a_tiny_table():
  logits = np.array([[3.0, 1.0, 0.0],   # predicts 0
                     [0.0, 2.0, 1.0],   # predicts 1
                     [0.0, 0.0, 5.0],   # predicts 2
                     [1.0, 4.0, 0.0]],  # predicts 1
                    np.float32)
  labels = np.array([0, 1, 2, 2], np.int32)
  assert metrics.accuracy(logits, labels) == pytest.approx(0.75)
  assert metrics.accuracy(logits, np.array([1, 0, 0, 0], np.int32)) == 0.0


def test_accuracy_breaks_ties_towards_the_lowest_class():
  logits = np.array([[1.0, 1.0, 0.0]], np.float32)
  assert metrics.accuracy(logits, np.array([0])) == 1.0
  assert metrics.accuracy(logits, np.array([1])) == 0.0


def test_class_accuracies_gives_nan_for_an_absent_class():
  # Class 0: 2 of 2 right; class 1: 1 of 3 right; class 2: 0 of 1 right; class 3: no sample.
  predictions = np.array([0, 0, 1, 2, 2, 0])
  labels = np.array([0, 0, 1, 1, 1, 2])
  logits = np.eye(4, dtype=np.float32)[predictions]
  per_class = metrics.class_accuracies(logits, labels, num_classes=4)
  assert per_class.shape == (4,)
  np.testing.assert_allclose(per_class[:3], [1.0, 1 / 3, 0.0])
  assert np.isnan(per_class[3])


def test_related_accuracy_counts_only_related_true_labels():
  predictions = np.array([0, 1, 1, 3, 2, 2])
  labels = np.array([0, 1, 2, 3, 3, 2])
  logits = np.eye(4, dtype=np.float32)[predictions]
  # Samples labelled 2 or 3: indices 2 (wrong), 3 (right), 4 (wrong, predicted 2), 5 (right).
  assert metrics.related_accuracy(logits, labels, (2, 3)) == pytest.approx(0.5)
  assert metrics.related_accuracy(logits, labels, [0]) == 1.0


# ------------------------------------------------------------------ per-sample quantities


@pytest.mark.parametrize("num_classes", [2, 10, 100])
def test_entropy_of_uniform_logits_is_log_num_classes(num_classes):
  logits = np.full((3, num_classes), 7.5, np.float32)
  np.testing.assert_allclose(metrics.prediction_entropy(logits), math.log(num_classes), rtol=1e-6)


def test_entropy_of_a_one_hot_logit_is_near_zero_and_never_nan():
  logits = np.array([[30.0, 0.0, 0.0], [1e4, -1e4, 0.0], [0.0, 0.0, 3e38]], np.float32)
  entropy = metrics.prediction_entropy(logits)
  assert np.all(np.isfinite(entropy))
  assert np.all(entropy >= 0.0)
  np.testing.assert_allclose(entropy, 0.0, atol=1e-10)


def test_entropy_matches_the_textbook_formula_on_moderate_logits():
  logits = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
  probs = np.exp(logits.astype(np.float64))
  probs /= probs.sum(axis=1, keepdims=True)
  np.testing.assert_allclose(metrics.prediction_entropy(logits),
                             -(probs * np.log(probs)).sum(axis=1), rtol=1e-6)


def test_true_class_confidence_is_the_softmax_probability_of_the_label():
  logits = np.log(np.array([[1.0, 3.0], [1.0, 3.0], [2.0, 2.0]], np.float32))
  np.testing.assert_allclose(
      metrics.true_class_confidence(logits, np.array([1, 0, 0])), [0.75, 0.25, 0.5], rtol=1e-6)


# ------------------------------------------------------------------ entropy MIA (SSD)


def _separable_entropy_attack_data(seed=0):
  """Members (confident, low entropy) and non-members (unsure, high entropy), K = 10."""
  rng = np.random.default_rng(seed)
  members = _logits_with_true_class_logit(rng.uniform(8, 12, 400), rng.integers(0, 10, 400))
  nonmembers = _logits_with_true_class_logit(rng.uniform(0, 1, 300), rng.integers(0, 10, 300))
  return members, nonmembers


def test_entropy_mia_calls_member_like_forget_samples_members():
  members, nonmembers = _separable_entropy_attack_data()
  forget = _logits_with_true_class_logit(np.linspace(9, 11, 50), np.zeros(50, int))
  assert metrics.mia_entropy_lr(members, nonmembers, forget) == 1.0


def test_entropy_mia_calls_nonmember_like_forget_samples_nonmembers():
  members, nonmembers = _separable_entropy_attack_data()
  forget = _logits_with_true_class_logit(np.linspace(0, 1, 50), np.zeros(50, int))
  assert metrics.mia_entropy_lr(members, nonmembers, forget) == 0.0


def test_entropy_mia_on_a_half_and_half_forget_set_is_one_half():
  members, nonmembers = _separable_entropy_attack_data()
  forget = np.concatenate([members[:20], nonmembers[:20]])
  assert metrics.mia_entropy_lr(members, nonmembers, forget) == 0.5


def test_entropy_mia_stays_in_range_when_members_and_nonmembers_look_alike():
  rng = np.random.default_rng(1)
  members = rng.normal(size=(300, 10)).astype(np.float32)
  nonmembers = rng.normal(size=(300, 10)).astype(np.float32)
  forget = rng.normal(size=(100, 10)).astype(np.float32)
  score = metrics.mia_entropy_lr(members, nonmembers, forget)
  assert 0.0 <= score <= 1.0


def test_entropy_mia_balances_classes_so_many_members_do_not_bias_the_attack():
  # 5000 members around a = 4 and 50 non-members around a = 2 (a is the first of two logits).
  # An unweighted fit puts the boundary near the non-members (prior 100:1) and calls a = 2.5
  # "member"; with balanced weights the boundary sits between the groups and a = 2.5 is a
  # non-member.
  rng = np.random.default_rng(0)
  members = _two_class_logits(rng.normal(4.0, 0.5, 5000))
  nonmembers = _two_class_logits(rng.normal(2.0, 0.5, 50))
  forget = _two_class_logits(np.full(20, 2.5))
  assert metrics.mia_entropy_lr(members, nonmembers, forget) == 0.0


def test_entropy_mia_subsampling_is_seeded():
  members, nonmembers = _separable_entropy_attack_data()
  forget = _logits_with_true_class_logit(np.linspace(0, 12, 60), np.zeros(60, int))
  first = metrics.mia_entropy_lr(members, nonmembers, forget, seed=3, max_samples=40)
  again = metrics.mia_entropy_lr(members, nonmembers, forget, seed=3, max_samples=40)
  assert first == again
  assert 0.0 <= first <= 1.0


# ------------------------------------------------------------------ confidence SVC MIA (SalUn)


def _separable_confidence_attack_data(seed=0):
  """Members with true-class confidence ~0.9-1 and non-members with ~0.04-0.1, K = 10."""
  rng = np.random.default_rng(seed)
  member_labels = rng.integers(0, 10, 400)
  nonmember_labels = rng.integers(0, 10, 300)
  members = _logits_with_true_class_logit(rng.uniform(6, 10, 400), member_labels)
  nonmembers = _logits_with_true_class_logit(rng.uniform(-1, 0, 300), nonmember_labels)
  return members, member_labels, nonmembers, nonmember_labels


def test_confidence_mia_calls_unconfident_forget_samples_nonmembers():
  attack_data = _separable_confidence_attack_data()
  forget_labels = np.arange(50) % 10
  forget = _logits_with_true_class_logit(np.linspace(-1, 0, 50), forget_labels)
  assert metrics.mia_confidence_svc(*attack_data, forget, forget_labels) == 1.0


def test_confidence_mia_calls_confident_forget_samples_members():
  attack_data = _separable_confidence_attack_data()
  forget_labels = np.arange(50) % 10
  forget = _logits_with_true_class_logit(np.linspace(7, 9, 50), forget_labels)
  assert metrics.mia_confidence_svc(*attack_data, forget, forget_labels) == 0.0


def test_confidence_mia_reads_the_confidence_of_the_true_label():
  # Same logits, but labels pointing to another class: the true-class confidence is then tiny,
  # so the forget samples look unseen. An attack on the max probability would say "member".
  attack_data = _separable_confidence_attack_data()
  predicted = np.arange(50) % 10
  forget = _logits_with_true_class_logit(np.linspace(7, 9, 50), predicted)
  assert metrics.mia_confidence_svc(*attack_data, forget, (predicted + 1) % 10) == 1.0


def test_confidence_mia_on_a_half_and_half_forget_set_is_one_half():
  members, member_labels, nonmembers, nonmember_labels = _separable_confidence_attack_data()
  forget = np.concatenate([members[:20], nonmembers[:20]])
  forget_labels = np.concatenate([member_labels[:20], nonmember_labels[:20]])
  score = metrics.mia_confidence_svc(members, member_labels, nonmembers, nonmember_labels,
                                     forget, forget_labels)
  assert score == 0.5


def test_confidence_mia_trains_on_equally_many_members_and_nonmembers():
  # 3000 members around a = 5, 60 non-members around a = 3. Fit on all of them, the SVC calls
  # a = 3 "member" (0.0); SalUn's equal counts put the boundary between the groups (1.0).
  rng = np.random.default_rng(0)
  member_labels = rng.integers(0, 10, 3000)
  nonmember_labels = rng.integers(0, 10, 60)
  members = _logits_with_true_class_logit(rng.normal(5, 1, 3000), member_labels)
  nonmembers = _logits_with_true_class_logit(rng.normal(3, 1, 60), nonmember_labels)
  forget_labels = np.arange(20) % 10
  forget = _logits_with_true_class_logit(np.full(20, 3.0), forget_labels)
  score = metrics.mia_confidence_svc(members, member_labels, nonmembers, nonmember_labels,
                                     forget, forget_labels, max_samples=None)
  assert score == 1.0


def test_confidence_mia_stays_in_range_and_is_seeded_when_capped():
  rng = np.random.default_rng(2)
  members = rng.normal(size=(500, 10)).astype(np.float32)
  nonmembers = rng.normal(size=(400, 10)).astype(np.float32)
  forget = rng.normal(size=(100, 10)).astype(np.float32)
  labels = lambda n: rng.integers(0, 10, n)
  args = (members, labels(500), nonmembers, labels(400), forget, labels(100))
  first = metrics.mia_confidence_svc(*args, seed=5, max_samples=100)
  assert 0.0 <= first <= 1.0
  assert metrics.mia_confidence_svc(*args, seed=5, max_samples=100) == first


# ------------------------------------------------------------------ linear probe


def _gaussian_blobs(rng, num_per_class, class_means, noise):
  """Features [C * num_per_class, D] scattered around each class mean, and their labels."""
  features = np.concatenate(
      [mean + noise * rng.normal(size=(num_per_class, mean.shape[0])) for mean in class_means])
  labels = np.repeat(np.arange(len(class_means)), num_per_class)
  return features.astype(np.float32), labels


def test_probe_recovers_a_class_from_linearly_separable_features():
  rng = np.random.default_rng(0)
  class_means = 4.0 * np.eye(4, 16)
  train_features, train_labels = _gaussian_blobs(rng, 200, class_means, noise=0.5)
  eval_features, eval_labels = _gaussian_blobs(rng, 100, class_means, noise=0.5)
  assert metrics.linear_probe_accuracy(
      train_features, train_labels, eval_features, eval_labels) >= 0.99
  # probe_forget_acc's use: evaluated only on one (the "forgotten") class.
  only_class_2 = eval_labels == 2
  assert metrics.linear_probe_accuracy(
      train_features, train_labels, eval_features[only_class_2], eval_labels[only_class_2]
  ) >= 0.99


def test_probe_is_near_chance_on_pure_noise_features():
  rng = np.random.default_rng(0)
  train_features = rng.normal(size=(800, 16)).astype(np.float32)
  eval_features = rng.normal(size=(4000, 16)).astype(np.float32)
  accuracy = metrics.linear_probe_accuracy(
      train_features, np.arange(800) % 4, eval_features, np.arange(4000) % 4)
  assert abs(accuracy - 0.25) < 0.05


def test_probe_fits_on_a_class_balanced_subset():
  # Noise features with 10000 samples of class 0 and 50 of class 1: a probe fit on all of them
  # learns the prior and calls (almost) everything class 0, so its accuracy on class-1 samples
  # is ~0. Capped at 50 per class, it is a coin flip.
  rng = np.random.default_rng(0)
  train_features = rng.normal(size=(10050, 2)).astype(np.float32)
  train_labels = np.concatenate([np.zeros(10000, int), np.ones(50, int)])
  eval_features = rng.normal(size=(2000, 2)).astype(np.float32)
  accuracy = metrics.linear_probe_accuracy(
      train_features, train_labels, eval_features, np.ones(2000, int), max_per_class=50)
  assert accuracy > 0.2


# ------------------------------------------------------------------ related classes


def test_most_similar_classes_on_the_shirt_row_of_the_calibration_run():
  # Fashion-MNIST, target Shirt (6): Coat .41, Pullover .29, T-shirt/top .23, Dress .04.
  transition_row = np.zeros(10)
  transition_row[[4, 2, 0, 3]] = [0.41, 0.29, 0.23, 0.04]
  transition_row[[1, 5, 7, 8, 9]] = 0.006
  assert metrics.most_similar_classes(transition_row, target=6, k=3) == (4, 2, 0)


def test_most_similar_classes_excludes_the_target_and_breaks_ties_by_index():
  scores = np.array([0.1, 0.4, 9.0, 0.4, 0.1])
  assert metrics.most_similar_classes(scores, target=2, k=3) == (1, 3, 0)
  assert metrics.most_similar_classes(scores, target=2, k=4) == (1, 3, 0, 4)
  result = metrics.most_similar_classes(scores, target=1, k=1)
  assert result == (2,) and isinstance(result[0], int)


# ------------------------------------------------------------------ summaries


def test_avg_gap_on_known_numbers():
  method = {"retain_test_acc": 0.90, "forget_test_acc": 0.10, "mia_entropy_lr": 0.30, "x": "y"}
  retrain = {"retain_test_acc": 0.95, "forget_test_acc": 0.00, "mia_entropy_lr": 0.33}
  assert metrics.avg_gap(method, retrain) == pytest.approx((0.05 + 0.10 + 0.03) / 3)
  assert metrics.avg_gap(method, retrain, keys=("forget_test_acc",)) == pytest.approx(0.10)
  assert metrics.avg_gap(retrain, retrain) == 0.0


def test_avg_gap_rejects_percentages_and_missing_keys():
  retrain = {"retain_test_acc": 0.95, "forget_test_acc": 0.0, "mia_entropy_lr": 0.33}
  in_percent = {"retain_test_acc": 95.8, "forget_test_acc": 0.0, "mia_entropy_lr": 0.33}
  with pytest.raises(ValueError, match=r"metrics\['retain_test_acc'\].*fraction"):
    metrics.avg_gap(in_percent, retrain)
  with pytest.raises(ValueError, match="retrain_metrics has no key 'mia_entropy_lr'"):
    metrics.avg_gap(retrain, {"retain_test_acc": 0.9, "forget_test_acc": 0.0})
  with pytest.raises(ValueError, match="keys"):
    metrics.avg_gap(retrain, retrain, keys=())


def test_aggregate_mean_and_sample_std_on_known_numbers():
  runs = [
      {"retain_test_acc": 0.90, "method": "megu", "converged": True, "time_s": 10},
      {"retain_test_acc": 0.92, "method": "megu", "converged": False, "time_s": np.float32(20)},
      {"retain_test_acc": 0.94, "method": "megu", "per_class": [0.1, 0.2]},
  ]
  summary = metrics.aggregate(runs)
  assert list(summary) == ["retain_test_acc", "time_s"]  # strings, bools, lists ignored
  assert summary["retain_test_acc"]["mean"] == pytest.approx(0.92)
  assert summary["retain_test_acc"]["std"] == pytest.approx(0.02)  # ddof=1; population: 0.0163
  assert summary["retain_test_acc"]["n"] == 3
  assert summary["time_s"] == {"mean": 15.0, "std": pytest.approx(math.sqrt(50.0)), "n": 2}


def test_aggregate_of_a_single_run_has_no_spread():
  summary = metrics.aggregate([{"test_acc": 0.5}])
  assert summary["test_acc"]["mean"] == 0.5 and summary["test_acc"]["n"] == 1
  assert math.isnan(summary["test_acc"]["std"])


# ------------------------------------------------------------------ bad inputs

_LOGITS = np.zeros((4, 3), np.float32)
_LABELS = np.array([0, 1, 2, 0])
_FEATURES = np.arange(24, dtype=np.float32).reshape(6, 4)
_FEATURE_LABELS = np.array([0, 1, 0, 1, 0, 1])

_BAD_CALLS = {
    "accuracy: labels of another length":
        (lambda: metrics.accuracy(_LOGITS, _LABELS[:3]), r"labels has 3 entries.*logits has 4"),
    "accuracy: empty logits":
        (lambda: metrics.accuracy(np.zeros((0, 3)), np.zeros(0, int)), "logits is empty"),
    "accuracy: 1-D logits":
        (lambda: metrics.accuracy(np.zeros(3), _LABELS), "logits must be a 2-D array"),
    "accuracy: 2-D labels":
        (lambda: metrics.accuracy(_LOGITS, _LABELS[:, None]), "labels must be a 1-D array"),
    "accuracy: float labels":
        (lambda: metrics.accuracy(_LOGITS, _LABELS.astype(float)), "labels must have an integer"),
    "accuracy: label out of range":
        (lambda: metrics.accuracy(_LOGITS, np.array([0, 1, 2, 3])), r"labels must lie in \[0, 3\)"),
    "accuracy: NaN logits":
        (lambda: metrics.accuracy(np.full((4, 3), np.nan), _LABELS),
         "logits contains 12 non-finite"),
    "entropy: 3-D logits":
        (lambda: metrics.prediction_entropy(np.zeros((2, 3, 4))), "logits must be a 2-D array"),
    "entropy: one class":
        (lambda: metrics.prediction_entropy(np.zeros((4, 1))), "logits has 1 columns"),
    "confidence: labels of another length":
        (lambda: metrics.true_class_confidence(_LOGITS, _LABELS[:2]), "labels has 2 entries"),
    "entropy MIA: empty forget set":
        (lambda: metrics.mia_entropy_lr(_LOGITS, _LOGITS, np.zeros((0, 3))),
         "forget_logits is empty"),
    "entropy MIA: test logits of another model":
        (lambda: metrics.mia_entropy_lr(_LOGITS, np.zeros((4, 5)), _LOGITS),
         "test_logits has 5 classes but retain_train_logits has 3"),
    "entropy MIA: max_samples 0":
        (lambda: metrics.mia_entropy_lr(_LOGITS, _LOGITS, _LOGITS, max_samples=0),
         "max_samples must be a positive integer or None; got 0"),
    "SVC MIA: forget labels of another length":
        (lambda: metrics.mia_confidence_svc(_LOGITS, _LABELS, _LOGITS, _LABELS, _LOGITS,
                                            _LABELS[:1]), "forget_labels has 1 entries"),
    "SVC MIA: 1-D retain logits":
        (lambda: metrics.mia_confidence_svc(np.zeros(4), _LABELS, _LOGITS, _LABELS, _LOGITS,
                                            _LABELS), "retain_train_logits must be a 2-D array"),
    "SVC MIA: empty test labels":
        (lambda: metrics.mia_confidence_svc(_LOGITS, _LABELS, _LOGITS, np.zeros(0, int), _LOGITS,
                                            _LABELS), "test_labels is empty"),
    "probe: feature widths differ":
        (lambda: metrics.linear_probe_accuracy(_FEATURES, _FEATURE_LABELS, _FEATURES[:, :3],
                                               _FEATURE_LABELS),
         "eval_features has 3 feature columns but train_features has 4"),
    "probe: train labels of another length":
        (lambda: metrics.linear_probe_accuracy(_FEATURES, _FEATURE_LABELS[:5], _FEATURES,
                                               _FEATURE_LABELS), "train_labels has 5 entries"),
    "probe: empty eval features":
        (lambda: metrics.linear_probe_accuracy(_FEATURES, _FEATURE_LABELS, np.zeros((0, 4)),
                                               np.zeros(0, int)), "eval_features is empty"),
    "probe: one training class":
        (lambda: metrics.linear_probe_accuracy(_FEATURES, np.zeros(6, int), _FEATURES,
                                               np.zeros(6, int)), "at least two classes"),
    "probe: eval class never trained on":
        (lambda: metrics.linear_probe_accuracy(_FEATURES, _FEATURE_LABELS, _FEATURES,
                                               np.full(6, 7)),
         r"eval_labels contain classes \[7\]"),
    "probe: negative train label":
        (lambda: metrics.linear_probe_accuracy(_FEATURES, _FEATURE_LABELS - 1, _FEATURES,
                                               _FEATURE_LABELS), "train_labels must be non-neg"),
    "probe: max_per_class 0":
        (lambda: metrics.linear_probe_accuracy(_FEATURES, _FEATURE_LABELS, _FEATURES,
                                               _FEATURE_LABELS, max_per_class=0), "max_per_class"),
    "class accuracies: wrong num_classes":
        (lambda: metrics.class_accuracies(_LOGITS, _LABELS, num_classes=4),
         "logits has 3 columns but num_classes=4"),
    "related: class out of range":
        (lambda: metrics.related_accuracy(_LOGITS, _LABELS, (1, 5)), r"related_classes must lie"),
    "related: empty":
        (lambda: metrics.related_accuracy(_LOGITS, _LABELS, ()), "related_classes must be a non"),
    "related: no sample of those classes":
        (lambda: metrics.related_accuracy(_LOGITS, np.array([0, 0, 0, 0]), (1, 2)),
         r"no sample in labels belongs to related_classes \[1, 2\]"),
    "similar: 2-D scores":
        (lambda: metrics.most_similar_classes(np.zeros((3, 3)), 0, 1),
         "transition_row_or_scores must be a 1-D array"),
    "similar: target out of range":
        (lambda: metrics.most_similar_classes(np.zeros(3), 3, 1), r"target must be .* \[0, 3\)"),
    "similar: k too large":
        (lambda: metrics.most_similar_classes(np.zeros(3), 0, 3), r"k must be .* \[1, 2\]; got 3"),
    "similar: NaN score":
        (lambda: metrics.most_similar_classes(np.array([0.0, np.nan, 1.0]), 0, 1), "NaN"),
    "aggregate: empty":
        (lambda: metrics.aggregate([]), "list_of_metric_dicts is empty"),
    "aggregate: a single dict":
        (lambda: metrics.aggregate({"a": 1.0}), "list_of_metric_dicts must be a sequence"),
    "aggregate: not a dict inside":
        (lambda: metrics.aggregate([{"a": 1.0}, 0.5]), r"list_of_metric_dicts\[1\] must be a dict"),
}


@pytest.mark.parametrize("call, message", list(_BAD_CALLS.values()), ids=list(_BAD_CALLS))
def test_bad_input_raises_a_value_error_naming_the_argument(call, message):
  with pytest.raises(metrics.MetricInputError, match=message):
    call()
  assert issubclass(metrics.MetricInputError, ValueError)

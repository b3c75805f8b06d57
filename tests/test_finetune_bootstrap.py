"""The test interval resamples patients where the dataset has them (results.json's `ci95_unit`),
the rank-form AUC the bootstrap uses, and the train positives per class."""

import types

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from spcl_jax import auc
from spcl_jax.finetune import results


def test_rank_aucs_equal_scikit_learn_with_ties_and_nan_for_one_valued_classes():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, (50, 3))
  scores = np.round(labels + rng.normal(0, 1, (50, 3)), 1)  # many ties
  labels[:, 2] = 1
  got = auc.rank_aucs(labels, scores)
  for k in range(2):
    assert got[k] == pytest.approx(roc_auc_score(labels[:, k], scores[:, k]), abs=1e-12)
  assert np.isnan(got[2])


def test_groups_of_one_image_resample_exactly_as_an_image_bootstrap():
  n = 30
  drawn = results.resample_groups(np.arange(n), np.random.default_rng(5))
  assert (drawn == np.random.default_rng(5).integers(0, n, n)).all()


def test_a_patient_resample_brings_all_images_of_each_drawn_patient():
  patients = np.array(["p3", "p1", "p3", "p2", "p1", "p3"])
  rng = np.random.default_rng(1)
  for _ in range(20):
    idx = results.resample_groups(patients, rng)
    drawn = patients[idx]
    for patient in set(drawn):
      members = np.flatnonzero(patients == patient)
      # each draw of a patient adds all its images, in order
      assert (drawn == patient).sum() % len(members) == 0
    counts = {p: (drawn == p).sum() // (patients == p).sum() for p in set(drawn)}
    assert sum(counts.values()) == 3  # as many patient draws as there are patients


def _clustered(num_patients=40, per_patient=5, seed=0):
  """Labels and scores shared by a patient's images: the case an image bootstrap gets wrong."""
  rng = np.random.default_rng(seed)
  label = rng.integers(0, 2, num_patients)
  score = label + rng.normal(0, 1.2, num_patients)
  labels = np.repeat(label, per_patient)[:, None]
  scores = (np.repeat(score, per_patient) + rng.normal(0, 0.05, num_patients * per_patient)
            )[:, None]
  return labels, scores, np.repeat(np.arange(num_patients), per_patient).astype(str)


def test_patient_interval_matches_a_loop_reference_and_is_wider_on_clustered_images():
  labels, scores, patients = _clustered()
  lo, hi = results.bootstrap_ci(labels, scores, ["a"], samples=300, seed=2, groups=patients)
  # Independent reference: draw patients, gather their images one patient at a time.
  unique = np.unique(patients)
  members = {p: np.flatnonzero(patients == p) for p in unique}
  rng = np.random.default_rng(2)
  values = []
  while len(values) < 300:
    drawn = rng.integers(0, len(unique), len(unique))
    idx = np.concatenate([members[unique[i]] for i in drawn])
    y, s = labels[idx, 0], scores[idx, 0]
    if len(set(y)) == 2:
      values.append(roc_auc_score(y, s))
  assert (lo, hi) == pytest.approx(tuple(np.percentile(values, [2.5, 97.5])), abs=1e-12)
  image_lo, image_hi = results.bootstrap_ci(labels, scores, ["a"], samples=300, seed=2)
  assert (hi - lo) > 1.5 * (image_hi - image_lo)


def _source(patient_split: bool):
  module = types.SimpleNamespace(PATIENT_SPLIT=patient_split)
  folder = types.SimpleNamespace(module=module, patients=["7", "8", "9", "7"])
  return types.SimpleNamespace(folder=folder, indices=np.array([3, 1, 0]))


def test_results_say_which_unit_the_interval_resampled():
  unit, ids = results.bootstrap_groups(_source(True))
  assert unit == "patient" and list(ids) == ["7", "8", "7"]
  assert results.bootstrap_groups(_source(False)) == ("image", None)
  labels, scores, patients = _clustered(10, 2)
  entry = results.scored_with_ci(1, 4, labels, scores, ["a"], samples=20, seed=0,
                                 groups=("patient", patients))
  assert entry["ci95_unit"] == "patient"
  assert results.scored_with_ci(1, 4, labels, scores, ["a"], samples=20,
                                seed=0)["ci95_unit"] == "image"


def test_train_positives_per_class_and_one_warning_line_naming_the_empty_classes():
  targets = np.array([[1, 0, 0], [1, 0, 1], [0, 0, 1]], np.float32)
  positives = results.positives_per_class(targets, ["A", "Hernia", "C"])
  assert positives == {"A": 2, "Hernia": 0, "C": 2}
  line = results.missing_positives_warning(positives, 1)
  assert line.startswith("warning:") and "Hernia" in line and "A," not in line
  assert "\n" not in line and "label_fraction=1" in line
  assert results.missing_positives_warning({"A": 1}, 100) is None

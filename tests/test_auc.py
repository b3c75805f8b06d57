"""AUC: a fixture counted by hand (ties count one half) and the single-valued-class error."""

import numpy as np
import pytest

from spcl_jax import auc


def test_auc_matches_a_hand_counted_fixture_with_ties():
  # Class a: positives score 0.9, 0.5; negatives 0.5, 0.1, 0.3.
  # Pairs (pos, neg): (0.9, *) 3 wins; (0.5, 0.5) a tie = 1/2; (0.5, 0.1), (0.5, 0.3) wins.
  # AUC = (3 + 0.5 + 2) / (2 * 3) = 5.5 / 6.
  # Class b: positives 0.2; negatives 0.8, 0.2, 0.4, 0.6 -> 0 wins, 1 tie: 0.5 / 4.
  labels = np.array([[1, 0], [1, 0], [0, 0], [0, 1], [0, 0]])
  scores = np.array([[0.9, 0.8], [0.5, 0.2], [0.5, 0.4], [0.1, 0.2], [0.3, 0.6]])
  mean, per_class = auc.macro_auc(labels, scores, ["a", "b"])
  assert per_class["a"] == pytest.approx(5.5 / 6)
  assert per_class["b"] == pytest.approx(0.5 / 4)
  assert mean == pytest.approx((5.5 / 6 + 0.5 / 4) / 2)


@pytest.mark.parametrize("column", [[0, 0, 0, 0], [1, 1, 1, 1]])
def test_single_valued_class_is_an_error_naming_it(column):
  labels = np.array([[1, c] for c in column])
  labels[0, 0] = 0
  scores = np.random.default_rng(0).random((4, 2))
  with pytest.raises(auc.SingleClassError, match="'Hernia'.*val"):
    auc.macro_auc(labels, scores, ["Mass", "Hernia"], split="val")


def test_shape_and_value_errors():
  with pytest.raises(ValueError, match="do not agree"):
    auc.macro_auc(np.zeros((3, 2)), np.zeros((3, 2)), ["only_one"])
  with pytest.raises(ValueError, match="0 or 1"):
    auc.macro_auc(np.array([[2], [0]]), np.zeros((2, 1)), ["a"])
  with pytest.raises(ValueError, match="NaN"):
    auc.macro_auc(np.array([[1], [0]]), np.array([[np.nan], [0.0]]), ["a"])


def test_macro_auc_is_the_mean_of_three_distinct_per_class_aucs():
  # Per class: a ranks every positive first (1.0), b one pair wrong of four (0.75), c all
  # pairs wrong (0.0): the mean 0.5833 is neither the median (0.75) nor any one class.
  labels = np.array([[1, 1, 1], [1, 0, 1], [0, 1, 0], [0, 0, 0]])
  scores = np.array([[0.9, 0.9, 0.1], [0.8, 0.7, 0.2], [0.2, 0.6, 0.8], [0.1, 0.1, 0.9]])
  mean, per_class = auc.macro_auc(labels, scores, ["a", "b", "c"])
  assert per_class == pytest.approx({"a": 1.0, "b": 0.75, "c": 0.0})
  assert mean == pytest.approx(1.75 / 3)

"""Linear probe: one logistic regression per class from frozen train-split features, scored by
ROC-AUC on the val split (macro and per class).

  evals.NAME = dict(type="linear_probe", every_steps=1000, data="sample", C=1.0, max_iter=1000,
                    ...)   # the shared fields: see frozen_features.py

Features are standardised with the train split's mean and std (so one C suits any width and
scale); scikit-learn's LogisticRegression (L-BFGS, L2 penalty of strength 1/C) is the solver.
The score of a val image is the decision function (the logit), which is all AUC needs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from spcl_jax import steps
from spcl_jax.evaluators import EvalConfigError, field
from spcl_jax.evaluators.frozen_features import FrozenFeatureEvaluator


def probe_scores(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, *,
                 C: float = 1.0, max_iter: int = 1000) -> np.ndarray:  # pylint: disable=invalid-name
  """(M_val, K) logits of K independent binary probes fitted on (train_x, train_y (M, K))."""
  train_y = np.asarray(train_y).reshape(len(train_x), -1)
  columns = []
  for k in range(train_y.shape[1]):
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    probe.fit(train_x, train_y[:, k])
    columns.append(probe.decision_function(val_x))
  return np.stack(columns, axis=1)


class Evaluator(FrozenFeatureEvaluator):
  FIELDS = (*FrozenFeatureEvaluator.FIELDS, "C", "max_iter")

  def __init__(self, name: str, eval_config: Any, training: steps.Training):
    super().__init__(name, eval_config, training)
    self.C = float(field(eval_config, "C", 1.0))  # pylint: disable=invalid-name
    self.max_iter = int(field(eval_config, "max_iter", 1000))
    if self.C <= 0 or self.max_iter < 1:
      raise EvalConfigError(f"config.evals.{name}: C={self.C} must be > 0 and "
                            f"max_iter={self.max_iter} >= 1")
    self.description = f"logistic regression (C={self.C}) on {self.description}"

  def scores(self, train_x, train_y, val_x):
    return probe_scores(train_x, train_y, val_x, C=self.C, max_iter=self.max_iter)

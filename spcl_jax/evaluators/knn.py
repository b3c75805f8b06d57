"""Weighted kNN on frozen features (DINO's protocol), scored by ROC-AUC on the val split.

  evals.NAME = dict(type="knn", every_steps=1000, data="sample", k=20, temperature=0.07, ...)
               # the shared fields: see frozen_features.py

Cosine similarity (on L2-normalised features), the k = min(k, train size) most similar train
images, each voting with weight exp(similarity / temperature). A val image's score for a class
is the weighted share of its neighbours that have the class (scikit-learn's
KNeighborsClassifier.predict_proba with these weights), one binary vote per class.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.neighbors import KNeighborsClassifier

from spcl_jax import steps
from spcl_jax.evaluators import EvalConfigError, field
from spcl_jax.evaluators.frozen_features import FrozenFeatureEvaluator


def knn_scores(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, *, k: int = 20,
               temperature: float = 0.07) -> np.ndarray:
  """(M_val, K) weighted-vote shares of the positive label, for (train_y (M, K)) 0/1 labels."""
  train_y = np.asarray(train_y).reshape(len(train_x), -1)
  neighbours = min(k, len(train_x))

  def vote_weights(cosine_distance: np.ndarray) -> np.ndarray:
    return np.exp((1.0 - cosine_distance) / temperature)  # distance = 1 - cosine similarity

  knn = KNeighborsClassifier(n_neighbors=neighbours, metric="cosine", algorithm="brute",
                             weights=vote_weights)
  single = train_y.shape[1] == 1  # scikit-learn wants a 1-D y for one output
  knn.fit(train_x, train_y[:, 0] if single else train_y)
  probabilities = knn.predict_proba(val_x)
  if single:
    probabilities = [probabilities]
  # Column 1 is label 1: every class has both values on the train split (checked at start).
  return np.stack([p[:, list(c).index(1)] for p, c in zip(probabilities, _classes(knn))], axis=1)


def _classes(knn: KNeighborsClassifier) -> list[np.ndarray]:
  return knn.classes_ if isinstance(knn.classes_, list) else [knn.classes_]


class Evaluator(FrozenFeatureEvaluator):
  FIELDS = (*FrozenFeatureEvaluator.FIELDS, "k", "temperature")

  def __init__(self, name: str, eval_config: Any, training: steps.Training):
    super().__init__(name, eval_config, training)
    self.k = int(field(eval_config, "k", 20))
    self.temperature = float(field(eval_config, "temperature", 0.07))
    if self.k < 1 or self.temperature <= 0:
      raise EvalConfigError(f"config.evals.{name}: k={self.k} must be >= 1 and "
                            f"temperature={self.temperature} > 0")
    k = min(self.k, len(self.train.source))
    self.description = f"{k}-NN (T={self.temperature}) on {self.description}"

  def scores(self, train_x, train_y, val_x):
    return knn_scores(train_x, train_y, val_x, k=self.k, temperature=self.temperature)

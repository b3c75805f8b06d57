"""ROC-AUC per class and its macro mean: the score of every classification evaluator.

scikit-learn's `roc_auc_score` does the counting (ties count one half). What this module adds is
the rule the reference codebases break: a class that has only one label value on the scored
split has no AUC, and that is an error naming the class, never a silently dropped or zero column.
`rank_aucs` is the same number from ranks (Mann-Whitney), all classes at once: what a bootstrap
of a thousand resamples can afford.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score


class SingleClassError(ValueError):
  """A class has only positives or only negatives on the split being scored."""


def per_class_auc(labels: np.ndarray, scores: np.ndarray, class_names: Sequence[str],
                  *, split: str = "the scored split") -> dict[str, float]:
  """{class name: ROC-AUC} for (M, K) binary labels and (M, K) real-valued scores."""
  labels = np.asarray(labels)
  scores = np.asarray(scores, dtype=np.float64)
  if labels.ndim == 1:
    labels = labels[:, None]
  if scores.ndim == 1:
    scores = scores[:, None]
  if labels.shape != scores.shape or labels.shape[1] != len(class_names):
    raise ValueError(f"labels {labels.shape}, scores {scores.shape} and {len(class_names)} class "
                     "names do not agree")
  if not np.isin(labels, (0, 1)).all():
    raise ValueError("labels must be 0 or 1")
  if not np.isfinite(scores).all():
    raise ValueError("scores contain NaN or Inf")
  require_both_values(labels, class_names, split=split)
  return {name: float(roc_auc_score(labels[:, k], scores[:, k]))
          for k, name in enumerate(class_names)}


def require_both_values(labels: np.ndarray, class_names: Sequence[str], *,
                        split: str = "the scored split",
                        advice: str = "use a larger split or drop the class explicitly") -> None:
  """Raises SingleClassError naming the first class whose (M, K) labels are all 0 or all 1.

  A probe cannot be fitted on such a class either, so evaluators check their train split too.
  """
  labels = np.asarray(labels)
  if labels.ndim == 1:
    labels = labels[:, None]
  for k, name in enumerate(class_names):
    column = labels[:, k]
    positives = int(column.sum())
    if positives in (0, len(column)):
      value = "positive" if positives else "negative"
      raise SingleClassError(
          f"class {name!r} has only {value} labels on {split} ({len(column)} images): its AUC is "
          f"undefined; {advice}")


def macro_auc(labels: np.ndarray, scores: np.ndarray, class_names: Sequence[str],
              *, split: str = "the scored split") -> tuple[float, dict[str, float]]:
  """(mean of the per-class AUCs over every class, the per-class AUCs)."""
  per_class = per_class_auc(labels, scores, class_names, split=split)
  return float(np.mean(list(per_class.values()))), per_class


def rank_aucs(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """(K,) ROC-AUCs of (M, K) 0/1 labels and scores: (rank sum of the positives - P(P+1)/2) /
  (P N), ties at their average rank (= counting one half); NaN for a class with one value."""
  labels = np.asarray(labels, dtype=bool)
  ranks = rankdata(np.asarray(scores, dtype=np.float64), axis=0)
  positives = labels.sum(axis=0)
  negatives = len(labels) - positives
  with np.errstate(invalid="ignore", divide="ignore"):
    u = (ranks * labels).sum(axis=0) - positives * (positives + 1) / 2
    return np.where((positives > 0) & (negatives > 0), u / (positives * negatives), np.nan)

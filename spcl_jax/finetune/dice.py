"""Dice scores of binary segmentations, pure NumPy, from per-image pixel counts.

An eval pass keeps three integers per image (|truth & pred|, |truth|, |pred|), not the masks:
every Dice below is a function of them, so a 512 x 512 test split costs kilobytes.

  dice_per_image  mean over all images of 2|T&P| / (|T| + |P|); an image with an empty truth
                  scores 1 if the prediction is empty too and 0 otherwise (Kaggle's SIIM rule).
                  The number GLoRIA, MGCA and MedKLIP report, and Table 4's default
                  (`python -m spcl_jax.report --dice`). About 78% of SIIM images are empty, so
                  predicting nothing scores ~0.78 here: read it beside the trivial scores.
  dice_positive   the same mean over the images whose truth is not empty: empty predictions
                  cannot score here, so fine-tuning selects its checkpoint on it (val).
  dice_global     2 sum|T&P| / (sum|T| + sum|P|), every pixel of the split pooled.
`trivial_scores` is the all-empty prediction's three scores on the same truths: the floor a
model has to beat, reported beside every result.
"""

from __future__ import annotations

import numpy as np

THRESHOLD = 0.5  # fixed, on the sigmoid probability; never tuned (least of all on test)
METRICS = ("dice_per_image", "dice_positive", "dice_global")


def binarize(probabilities: np.ndarray) -> np.ndarray:
  return np.asarray(probabilities) >= THRESHOLD


def image_counts(truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
  """(N, H, W) binary truth and prediction -> int64 (N, 3): |T&P|, |T|, |P| per image."""
  truth, prediction = np.asarray(truth).astype(bool), np.asarray(prediction).astype(bool)
  if truth.shape != prediction.shape or truth.ndim != 3:
    raise ValueError(f"truth {truth.shape} and prediction {prediction.shape} must both be "
                     "(N, H, W)")
  axes = (1, 2)
  return np.stack([(truth & prediction).sum(axes), truth.sum(axes), prediction.sum(axes)],
                  axis=1).astype(np.int64)


def dice_scores(counts: np.ndarray) -> dict[str, float]:
  """The three Dice scores of per-image counts (N, 3); dice_positive is NaN with no positive."""
  counts = np.asarray(counts, np.int64)
  if counts.ndim != 2 or counts.shape[1] != 3 or len(counts) == 0:
    raise ValueError(f"counts must be (N >= 1, 3) rows of |T&P|, |T|, |P|; got {counts.shape}")
  both, truth, pred = counts[:, 0], counts[:, 1], counts[:, 2]
  denominator = truth + pred
  per_image = np.where(denominator == 0, 1.0,
                       2.0 * both / np.maximum(denominator, 1))
  positive = truth > 0
  total = denominator.sum()
  return {
      "dice_per_image": float(per_image.mean()),
      "dice_positive": float(per_image[positive].mean()) if positive.any() else float("nan"),
      "dice_global": float(2.0 * both.sum() / total) if total else 1.0,
  }


def trivial_scores(counts: np.ndarray) -> dict[str, float]:
  """The all-empty prediction's scores on the same truths (|T&P| = |P| = 0)."""
  counts = np.asarray(counts, np.int64)
  empty = np.zeros_like(counts)
  empty[:, 1] = counts[:, 1]
  return dice_scores(empty)

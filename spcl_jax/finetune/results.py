"""WORKDIR/results.json of a fine-tuning run (format `downstream.RESULTS_FORMAT`).

Scores are the logits (AUC depends on their order only, which sigmoid keeps). The test
interval is a percentile bootstrap over test images: resample the images with replacement,
recompute the macro AUC, take the 2.5th and 97.5th percentiles. A resample in which a class has
one label value has no macro AUC; it is redrawn, and if more than half of the draws are such
the test split is too small for an interval and that is an error.
"""

from __future__ import annotations

import importlib.metadata
import json
import pathlib
import subprocess
from collections.abc import Sequence
from typing import Any

import numpy as np
import sklearn

from spcl_jax import auc
from spcl_jax.workdir_path import rewrite_text

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy",
             "scikit-learn", "ml-collections")


def score(labels: np.ndarray, scores: np.ndarray, classes: Sequence[str], split: str
          ) -> dict[str, Any]:
  macro, per_class = auc.macro_auc(labels, scores, classes, split=split)
  return {"macro_auc": macro, "per_class": per_class}


def bootstrap_ci(labels: np.ndarray, scores: np.ndarray, classes: Sequence[str], *,
                 samples: int, seed: int, level: float = 0.95) -> list[float]:
  """[lo, hi] percentile interval of the macro AUC over image resamples."""
  rng = np.random.default_rng(seed)
  n = len(labels)
  values: list[float] = []
  redrawn = 0
  while len(values) < samples:
    idx = rng.integers(0, n, n)
    try:
      # scikit-learn re-validates its arguments on every call (most of the time of a small
      # call); the inputs were validated once above, in `score`.
      with sklearn.config_context(skip_parameter_validation=True):
        values.append(auc.macro_auc(labels[idx], scores[idx], classes)[0])
    except auc.SingleClassError:
      redrawn += 1
      if redrawn > samples:
        raise auc.SingleClassError(
            f"bootstrap over the {n} test images: more than half of the resamples miss a "
            "label value of some class; the test split is too small for an interval") from None
  tail = (1.0 - level) / 2 * 100
  lo, hi = np.percentile(values, [tail, 100 - tail])
  return [float(lo), float(hi)]


def scored_with_ci(epoch: int, step: int, labels: np.ndarray, scores: np.ndarray,
               classes: Sequence[str], *, samples: int, seed: int) -> dict[str, Any]:
  return {"epoch": epoch, "step": step, **score(labels, scores, classes, "the test split"),
          "ci95": bootstrap_ci(labels, scores, classes, samples=samples, seed=seed),
          "num_images": int(len(labels))}


def git_commit() -> str | None:
  """The commit of the spcl_jax checkout that ran, or None outside a git checkout."""
  root = pathlib.Path(__file__).resolve().parents[2]
  try:
    out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                         text=True, timeout=10, check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() or None


def versions() -> dict[str, str]:
  found = {}
  for name in _PACKAGES:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return found


def write_json(path: pathlib.Path, data: dict[str, Any]) -> None:
  """Whole or not at all: tmp + rename on a disk, one object write on a bucket (gs://)."""
  rewrite_text(path, json.dumps(data, indent=2) + "\n")


def _std(values: list[float]) -> float:
  return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _mean_entry(entries: list[dict[str, Any]]) -> dict[str, Any]:
  """Mean of each number over seeds; std beside macro_auc and per class (segmentation: beside
  each Dice; the trivial baseline's mean only, it does not depend on the seed)."""
  out: dict[str, Any] = {}
  for key in ("epoch", "step", "num_images"):
    if key in entries[0]:
      out[key] = float(np.mean([e[key] for e in entries]))
  if "macro_auc" not in entries[0]:  # segmentation
    for key in ("dice_per_image", "dice_positive", "dice_global"):
      values = [e[key] for e in entries]
      out[key], out[f"{key}_std"] = float(np.mean(values)), _std(values)
    if "trivial" in entries[0]:
      out["trivial"] = {k: float(np.mean([e["trivial"][k] for e in entries]))
                        for k in entries[0]["trivial"]}
    return out
  macro = [e["macro_auc"] for e in entries]
  out["macro_auc"] = float(np.mean(macro))
  out["macro_auc_std"] = float(np.std(macro, ddof=1)) if len(macro) > 1 else 0.0
  names = list(entries[0]["per_class"])
  out["per_class"] = {n: float(np.mean([e["per_class"][n] for e in entries])) for n in names}
  out["per_class_std"] = {
      n: float(np.std([e["per_class"][n] for e in entries], ddof=1)) if len(entries) > 1
      else 0.0 for n in names}
  if "ci95" in entries[0]:
    out["ci95"] = [float(np.mean([e["ci95"][i] for e in entries])) for i in range(2)]
  return out


def aggregate(per_seed: list[dict[str, Any]], relative_paths: list[str]) -> dict[str, Any]:
  """F/results.json over seeds: the first seed's descriptive fields, mean/std numbers."""
  first = per_seed[0]
  out = {k: v for k, v in first.items()
         if k not in ("val_best", "test_at_best_val", "test_at_last_epoch", "seeds",
                      "accelerator_seconds")}
  for key in ("val_best", "test_at_best_val", "test_at_last_epoch"):
    out[key] = _mean_entry([r[key] for r in per_seed])
  out["seeds"] = [s for r in per_seed for s in r["seeds"]]
  out["accelerator_seconds"] = float(sum(r["accelerator_seconds"] for r in per_seed))
  out["per_seed"] = relative_paths
  return out

"""WORKDIR/results.json of a fine-tuning run (format `downstream.RESULTS_FORMAT`).

Scores are the logits (AUC depends on their order only, which sigmoid keeps). The test
interval is a percentile bootstrap: resample the units with replacement (patients where the
dataset has patient ids, taking all their images; else images), recompute the macro AUC, take
the 2.5th and 97.5th percentiles; `ci95_unit` says which. Images of one patient are correlated,
so resampling images would give a too narrow interval. A resample in which a class has one
label value has no macro AUC; it is redrawn, and if more than half of the draws are such the
test split is too small for an interval and that is an error.
"""

from __future__ import annotations

import importlib.metadata
import json
import pathlib
import subprocess
from collections.abc import Sequence
from typing import Any

import numpy as np

from spcl_jax import auc
from spcl_jax.workdir_path import rewrite_text

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy",
             "scikit-learn", "ml-collections")


def score(labels: np.ndarray, scores: np.ndarray, classes: Sequence[str], split: str
          ) -> dict[str, Any]:
  macro, per_class = auc.macro_auc(labels, scores, classes, split=split)
  return {"macro_auc": macro, "per_class": per_class}


def resample_groups(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Indices of one cluster bootstrap: as many groups as there are, drawn with replacement,
  each bringing all its members (in order). Groups of one member each: an image resample."""
  unique, inverse = np.unique(np.asarray(groups), return_inverse=True)
  order = np.argsort(inverse, kind="stable")
  counts = np.bincount(inverse, minlength=len(unique))
  starts = np.cumsum(counts) - counts
  drawn = rng.integers(0, len(unique), len(unique))
  sizes = counts[drawn]
  offsets = np.repeat(starts[drawn] - (np.cumsum(sizes) - sizes), sizes) + np.arange(sizes.sum())
  return order[offsets]


def bootstrap_ci(labels: np.ndarray, scores: np.ndarray, classes: Sequence[str], *,
                 samples: int, seed: int, level: float = 0.95,
                 groups: np.ndarray | None = None) -> list[float]:
  """[lo, hi] percentile interval of the macro AUC over resamples of `groups` (e.g. patient
  ids, one per image), or of images when None. `classes`: unused (the rank form needs none)."""
  del classes
  rng = np.random.default_rng(seed)
  n = len(labels)
  groups = np.arange(n) if groups is None else np.asarray(groups)
  if len(groups) != n:
    raise ValueError(f"bootstrap: {len(groups)} group ids for {n} images")
  values: list[float] = []
  redrawn = 0
  while len(values) < samples:
    idx = resample_groups(groups, rng)
    # The rank form of the AUC (auc.rank_aucs): scikit-learn's, per class and resample, took
    # ~10 ms a call, minutes for a test split; the inputs were validated once, in `score`.
    per_class = auc.rank_aucs(labels[idx], scores[idx])
    if not np.isnan(per_class).any():
      values.append(float(per_class.mean()))
    else:
      redrawn += 1
      if redrawn > samples:
        raise auc.SingleClassError(
            f"bootstrap over the {n} test images: more than half of the resamples miss a "
            "label value of some class; the test split is too small for an interval") from None
  tail = (1.0 - level) / 2 * 100
  lo, hi = np.percentile(values, [tail, 100 - tail])
  return [float(lo), float(hi)]


def scored_with_ci(epoch: int, step: int, labels: np.ndarray, scores: np.ndarray,
                   classes: Sequence[str], *, samples: int, seed: int,
                   groups: tuple[str, np.ndarray | None] = ("image", None)) -> dict[str, Any]:
  """groups: (unit name, ids per image or None): what the bootstrap resamples."""
  unit, ids = groups
  return {"epoch": epoch, "step": step, **score(labels, scores, classes, "the test split"),
          "ci95": bootstrap_ci(labels, scores, classes, samples=samples, seed=seed, groups=ids),
          "ci95_unit": unit, "num_images": int(len(labels))}


def bootstrap_groups(source) -> tuple[str, np.ndarray | None]:
  """('patient', patient id per image) where the dataset records patients, else ('image',
  None). `source`: a LabelledSource."""
  if not source.folder.module.PATIENT_SPLIT:
    return "image", None
  return "patient", np.asarray(source.folder.patients, dtype=object)[source.indices].astype(str)


def positives_per_class(targets: np.ndarray, classes: Sequence[str]) -> dict[str, int]:
  """Images with a positive target, per class (a policy-mapped uncertain label counts)."""
  return {name: int(count) for name, count in zip(classes, (np.asarray(targets) > 0).sum(0))}


def missing_positives_warning(positives: dict[str, int], label_fraction: int) -> str | None:
  """One line naming the classes without a positive training image (NIH 1%: Hernia), or None.
  Such a class still has an AUC on test, but its head only ever saw negatives."""
  missing = [name for name, count in positives.items() if count == 0]
  if not missing:
    return None
  return (f"warning: the train split at label_fraction={label_fraction} has no positive image "
          f"of {', '.join(missing)}: its head learns from negatives only")


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
    if "ci95_unit" in entries[0]:
      out["ci95_unit"] = entries[0]["ci95_unit"]
  return out


def aggregate(per_seed: list[dict[str, Any]], relative_paths: list[str]) -> dict[str, Any]:
  """F/results.json over seeds: the first seed's descriptive fields, mean/std numbers."""
  first = per_seed[0]
  out = {k: v for k, v in first.items()
         if k not in ("val_best", "test_at_best_val", "test_at_last_epoch", "seeds",
                      "accelerator_seconds", "predictions")}  # predictions: per seed_<s>/
  for key in ("val_best", "test_at_best_val", "test_at_last_epoch"):
    out[key] = _mean_entry([r[key] for r in per_seed])
  out["seeds"] = [s for r in per_seed for s in r["seeds"]]
  out["accelerator_seconds"] = float(sum(r["accelerator_seconds"] for r in per_seed))
  out["per_seed"] = relative_paths
  return out

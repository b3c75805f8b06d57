"""What the frozen-feature evaluators (linear probe, kNN) share: a labelled train and val split,
their features under the current parameters, and the macro AUC of the val scores.

Fields of their `config.evals.NAME` entry:
  data         'sample' (default; the bundled CXRs, normal vs pneumonia, split by patient) or
               'prepared:OUT_DIR[,views=...]' (the dataset's task labels)
  train_split  'train';  val_split 'val' (the split that is scored)
  classes      () = every task label; a subset drops the others explicitly
  pooling      'cls' (the S-PCL embedding) or 'mean_patch'
  batch_size   64 (rounded up to a multiple of the devices; all devices and processes work)
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from spcl_jax import auc, features, sharding, steps
from spcl_jax.data.eval_splits import LabelledSplit, open_labelled
from spcl_jax.evaluators import EvalConfigError, field

log = logging.getLogger("spcl_jax")


class FrozenFeatureEvaluator:
  """Base class: subclasses implement `scores(train_x, train_y, val_x) -> (M_val, K)`."""

  FIELDS = ("data", "train_split", "val_split", "classes", "pooling", "batch_size")

  def __init__(self, name: str, eval_config: Any, training: steps.Training):
    config = training.config
    self.name = name
    pooling = field(eval_config, "pooling", "cls")
    if pooling not in features.POOLINGS:
      raise EvalConfigError(f"config.evals.{name}.pooling={pooling!r} must be one of "
                            f"{features.POOLINGS}")
    self.pooling = pooling
    self.batch_size = int(field(eval_config, "batch_size", 64))
    data = field(eval_config, "data", "sample")
    classes = tuple(field(eval_config, "classes", ()))
    try:
      self.train = open_labelled(data, field(eval_config, "train_split", "train"), classes)
      self.val = open_labelled(data, field(eval_config, "val_split", "val"), classes)
    except ValueError as e:
      raise EvalConfigError(f"config.evals.{name}: {e}") from None
    # A class with one label value can be neither fitted nor scored: fail at start, not later.
    auc.require_both_values(self.train.labels, self.train.class_names,
                            split=f"{self.train.description} (config.evals.{name})")
    auc.require_both_values(self.val.labels, self.val.class_names,
                            split=f"{self.val.description} (config.evals.{name})")
    self.batch_sharding = sharding.batch_sharding(training.mesh, config, 3)
    self.encode = features.make_encode_fn(
        training.model, config.data.mean, config.data.std, (pooling,), self.batch_sharding,
        training.shardings.params["encoder"])
    self.image_size, self.resize_filter = config.model.image_size, config.data.resize_filter
    self.read_threads = int(config.data.get("read_threads", 4))
    classes_text = ", ".join(self.train.class_names)
    self.description = (f"{pooling} features; fit on {self.train.description}, scored on "
                        f"{self.val.description}; classes: {classes_text}")

  def images(self) -> dict[str, list[str]]:
    return {"train": features.record_names(self.train.source),
            "val": features.record_names(self.val.source)}

  def _features(self, params: Any, split: LabelledSplit) -> np.ndarray:
    return features.extract(
        self.encode, params["encoder"], split.source, batch_sharding=self.batch_sharding,
        image_size=self.image_size, resize_filter=self.resize_filter,
        batch_size=self.batch_size, read_threads=self.read_threads)[self.pooling]

  def scores(self, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray) -> np.ndarray:
    raise NotImplementedError

  def run(self, params: Any) -> dict[str, float]:
    """{'auc': macro AUC on the val split, 'auc/CLASS': each class's AUC}."""
    train_x = self._features(params, self.train)
    val_x = self._features(params, self.val)
    if not (np.isfinite(train_x).all() and np.isfinite(val_x).all()):
      # Diverged parameters: report no score (null in metrics.jsonl); stopping the run is the
      # trainer's job (its loss check names the step), not an evaluator's.
      log.warning("config.evals.%s: the features contain NaN or Inf; no AUC", self.name)
      return {"auc": float("nan"), **{f"auc/{c}": float("nan") for c in self.val.class_names}}
    scores = self.scores(train_x, self.train.labels, val_x)
    macro, per_class = auc.macro_auc(self.val.labels, scores, self.val.class_names,
                                     split=self.val.description)
    return {"auc": macro, **{f"auc/{c}": v for c, v in per_class.items()}}

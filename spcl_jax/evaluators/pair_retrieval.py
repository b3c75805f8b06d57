"""Pair retrieval: the S-PCL loss and the share of views whose nearest other view is their
partner, on fixed images with fixed partitions, no gradients.

  evals.NAME = dict(type="pair_retrieval", every_steps=1000, batches=4[, data=SPEC])

Images: `data` if given, else the split that pre-training does not read (`prepared:OUT,split=train`
-> `val`), else the first training images. Batches are the training batch size (retrieval among
B images depends on B); the first `batches` whole batches in source order are used. Partitions
come from a key of their own (never one trained on), the same at every evaluation, so the numbers
are comparable across steps. Metrics: `loss`, `retrieval_top1` (chance 1 / (2B - 1)).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from clu import metrics as clu_metrics

from spcl_jax import steps
from spcl_jax.data import pipeline
from spcl_jax.data.eval_splits import held_out_source_spec
from spcl_jax.data.sources import open_source
from spcl_jax.evaluators import EvalConfigError, field
from spcl_jax.features import record_names

# Means over equal-sized batches (clu.metrics; clu's writers would import TensorFlow).
# Built with create(): postponed annotations would hide field types from clu.
PairMetrics = clu_metrics.Collection.create(
    loss=clu_metrics.Average.from_output("loss"),
    retrieval_top1=clu_metrics.Average.from_output("retrieval"))

# The run's keys are fold_in(key(seed), i): 0 initialises, 1 drives training; this is neither.
_EVAL_KEY_INDEX = 2


class Evaluator:
  FIELDS = ("batches", "data")

  def __init__(self, name: str, eval_config: Any, training: steps.Training):
    self.config, self.mesh, self.eval_step = training.config, training.mesh, training.eval_step
    batches = field(eval_config, "batches", 4)
    if not isinstance(batches, int) or batches < 1:
      raise EvalConfigError(f"config.evals.{name}.batches={batches!r} must be a positive integer")
    data = field(eval_config, "data", "")
    held_out = held_out_source_spec(self.config.data.source)
    if data:
      spec, why = data, f"config.evals.{name}.data"
    elif held_out:
      spec, why = held_out, "the split pre-training does not read"
    else:
      spec, why = self.config.data.source, ("the training images: the source has no split "
                                            "that pre-training does not read")
    try:
      source = open_source(spec)
      self.dataset = pipeline.eval_dataset(
          self.config, source, max_batches=batches, process_index=jax.process_index(),
          process_count=jax.process_count())
    except ValueError as e:
      raise EvalConfigError(f"config.evals.{name} ({why}): {e}") from None
    count = len(self.dataset) * self.config.batch_size
    self.names = record_names(source)[:count]
    self.description = f"{count} images of {spec} ({why})"
    self.key = jax.random.fold_in(jax.random.key(self.config.seed), _EVAL_KEY_INDEX)

  def images(self) -> dict[str, list[str]]:
    return {"eval": self.names}

  def run(self, params: Any) -> dict[str, float]:
    totals = None
    for i in range(len(self.dataset)):
      images = steps.global_batch(pipeline.as_numpy_batch(self.dataset[i]), self.mesh,
                                  self.config)
      loss, retrieval = self.eval_step(params, images, jax.random.fold_in(self.key, i))
      batch = PairMetrics.single_from_model_output(loss=loss, retrieval=retrieval)
      totals = batch if totals is None else totals.merge(batch)
    return {k: float(np.asarray(v)) for k, v in totals.compute().items()}

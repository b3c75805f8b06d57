"""The recipe's values that depend on the run, resolved once at start and written to config.json.

  pool       config.model.pool = 'auto' -> AUTO_POOL for a pre-training workdir (S-PCL trains
             the CLS output) and for random init; 'avg' for an imported file (MAE-style
             checkpoints: their CLS output is untrained). The choice and its numbers:
             docs/method.md, measured with `python -m spcl_jax.bench transfer`.
  protocol   'linear' (linear evaluation) freezes the encoder (config.optim.freeze_encoder),
             turns drop path off and shows the frozen encoder whole images, as pre-training did
             (no RandAugment, no random crop, eval on the whole image; flips stay): S-PCL
             learns no invariance to the fine-tuning augmentation, and under it a linear head
             on its frozen features fell below chance (docs/method.md); 'classification' is
             full fine-tuning with the whole recipe.
  low-label  config.low_label, so that every label fraction runs with the shipped config:
             batch      the largest power of two <= train images / min_steps_per_epoch, between
                        min_batch_size and config.batch_size (a multiple of the devices)
             epochs     raised until the run has min_total_steps optimiser steps
             val        scored every k epochs (and after the last), k the smallest with
                        val images x (1 / k) <= val_images_per_train_image x train images per
                        epoch: at most that multiple of the train images seen, plus one pass
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from spcl_jax.downstream import CLASSIFICATION_PROTOCOLS
from spcl_jax.finetune.model import POOLS

# docs/method.md, "Fine-tuning pooling": `python -m spcl_jax.bench transfer` measures a tie for
# S-PCL inits and cls ahead by 1.3-2.2 points for random init, the baseline of every row.
AUTO_POOL = "cls"
POOL_CHOICES = ("auto", *POOLS)
IMPORTED_KINDS = ("timm", "medical_mae", "big_vision")  # initialization.FILE_KINDS' values


def resolve_pool(pool: str, init_kind: str) -> str:
  """'auto' -> 'avg' for an imported checkpoint file, AUTO_POOL otherwise; others unchanged."""
  if pool != "auto":
    return pool
  return "avg" if init_kind in IMPORTED_KINDS else AUTO_POOL


def is_classification(protocol: str) -> bool:
  return protocol in CLASSIFICATION_PROTOCOLS


@dataclasses.dataclass(frozen=True)
class Schedule:
  batch_size: int
  epochs: int
  val_every_epochs: int
  steps_per_epoch: int

  @property
  def total_steps(self) -> int:
    return self.epochs * self.steps_per_epoch

  def val_passes(self) -> int:
    """Val scorings in the run: every val_every_epochs epochs, and after the last epoch."""
    return self.epochs // self.val_every_epochs + (self.epochs % self.val_every_epochs != 0)


def _largest_power_of_two_at_most(n: int) -> int:
  return 1 << (n.bit_length() - 1) if n >= 1 else 0


def low_label_schedule(num_train: int, num_val: int, *, batch_size: int, epochs: int,
                       rule: ml_collections.ConfigDict, batch_multiple: int = 1) -> Schedule:
  """The batch, epochs and val interval of a run on `num_train` / `num_val` images (pure)."""
  if rule.enabled:
    fit = _largest_power_of_two_at_most(num_train // rule.min_steps_per_epoch)
    batch = min(batch_size, max(rule.min_batch_size, fit))
    batch = max(batch_multiple, batch // batch_multiple * batch_multiple)
  else:
    batch = batch_size
  steps_per_epoch = num_train // batch
  if steps_per_epoch < 1:
    raise ValueError(f"config.batch_size={batch} is larger than the {num_train} training "
                     "images: lower config.batch_size (and config.low_label.min_batch_size)")
  if not rule.enabled:
    return Schedule(batch, epochs, 1, steps_per_epoch)
  epochs = max(epochs, math.ceil(rule.min_total_steps / steps_per_epoch))
  seen_per_epoch = steps_per_epoch * batch
  val_every = max(1, math.ceil(num_val / (rule.val_images_per_train_image * seen_per_epoch)))
  return Schedule(batch, epochs, min(val_every, epochs), steps_per_epoch)


def whole_images(data: ml_collections.ConfigDict) -> list[str]:
  """Linear evaluation's input: the whole image, resized, in training and evaluation."""
  changed = []
  for field, value in (("randaugment", False), ("crop_scale", (1.0, 1.0)),
                       ("eval_crop_fraction", 1.0)):
    current = data[field]
    if (tuple(current) if isinstance(current, (list, tuple)) else current) != value:
      changed.append(f"config.data.{field}: {current} -> {value} (protocol linear: "
                     "the frozen encoder sees whole images, as in pre-training)")
      data[field] = value
  return changed


def resolve(config: ml_collections.ConfigDict, *, init_kind: str, num_train: int,
            num_val: int, batch_multiple: int) -> tuple[Schedule, list[str]]:
  """Writes the resolved pool, protocol settings and schedule into `config`; returns the
  schedule and one line per value that changed (for the start of the log)."""
  changed = []
  if is_classification(config.protocol):
    pool = resolve_pool(config.model.pool, init_kind)
    if pool != config.model.pool:
      changed.append(f"config.model.pool: {config.model.pool} -> {pool} (init {init_kind})")
      config.model.pool = pool
  if config.protocol == "linear":
    config.optim.freeze_encoder = True
    config.model.drop_path_rate = 0.0  # frozen: stochastic depth would only add noise
    changed += whole_images(config.data)
  schedule = low_label_schedule(num_train, num_val, batch_size=config.batch_size,
                                epochs=config.epochs, rule=config.low_label,
                                batch_multiple=batch_multiple)
  for field in ("batch_size", "epochs", "val_every_epochs"):
    value = getattr(schedule, field)
    if config[field] != value:
      changed.append(f"config.{field}: {config[field]} -> {value} (config.low_label, "
                     f"{num_train} train / {num_val} val images)")
      config[field] = value
  return schedule, changed

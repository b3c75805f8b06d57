"""What differs between the fine-tuning workloads, behind one interface the trainer and steps
call ("task" is the benchmark, config.task: nih14, chexpert, rsna, siim).

  classification  Classifier (pool + linear head); BCE with logits; eval keeps the logits;
                  scored by macro AUC (with a bootstrap interval on test, over patients where
                  the dataset has them); selects on val AUC. Protocols 'classification' (full
                  fine-tuning) and 'linear' (frozen encoder): one task, two table rows.
  segmentation    Segmenter (ViT + decoder, `decoders`); Dice + BCE per pixel; eval keeps per
                  image |T&P|, |T|, |P| at threshold 0.5 (`dice`); selects on val dice_positive.
Everything else (data pipeline, LLRD AdamW, selection, results.json) is fine-tuning's, and
checkpoints, resume and every run-safety protection are the engine's (`spcl_jax.engine`).

Segmentation loss: loss_weights.bce * mean pixel BCE + loss_weights.dice * (1 - soft Dice),
the soft Dice pooled over the batch (sum p t over all pixels of the batch), weights 1 and 1.
Why both: ~78% of SIIM images are empty and lesions are a few % of a positive image, so pixel
BCE alone is dominated by background and learns to predict nothing; soft Dice is invariant to
the lesion's size and rewards overlap directly, but alone gives noisy gradients on a batch
with little foreground. Pooling over the batch keeps the Dice term defined on empty images
(a batch of empty truths still penalises foreground predictions through the denominator), and
equal weights are the common default (e.g. MONAI's DiceCELoss).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from spcl_jax.downstream import SEGMENTATION_TASKS
from spcl_jax.finetune import dice, results
from spcl_jax.finetune.decoders import DECODERS, build_segmenter
from spcl_jax.finetune.model import build_classifier
from spcl_jax.finetune.recipe import is_classification

SOFT_DICE_SMOOTH = 1.0  # keeps 1 - Dice finite (and = 0) on a batch with no foreground at all


def bce_with_logits(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean binary cross-entropy over every element, from logits (stable form)."""
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))


def soft_dice_loss(logits: jax.Array, masks: jax.Array) -> jax.Array:
  """1 - (2 sum p t + s) / (sum p + sum t + s), p = sigmoid(logits), pooled over the batch."""
  p = jax.nn.sigmoid(logits)
  both = jnp.sum(p * masks)
  return 1.0 - (2.0 * both + SOFT_DICE_SMOOTH) / (jnp.sum(p) + jnp.sum(masks) + SOFT_DICE_SMOOTH)


@dataclasses.dataclass(frozen=True)
class Classification:
  protocol: str = "classification"  # or "linear" (recipe.CLASSIFICATION_PROTOCOLS)
  metric = "macro_auc"
  target = "label"  # the batch field the loss compares with

  def build_model(self, config: ml_collections.ConfigDict, num_classes: int):
    return build_classifier(config, num_classes)

  def loss(self, logits: jax.Array, targets: jax.Array) -> jax.Array:
    return bce_with_logits(logits, targets)

  def eval_outputs(self, logits: jax.Array) -> jax.Array:
    return logits

  def host_outputs(self, batch: dict[str, np.ndarray], outputs: np.ndarray) -> np.ndarray:
    return outputs  # logits (b, K); the labels are the source's own targets

  def score(self, source, outputs: np.ndarray, classes, where: str) -> dict[str, Any]:
    return results.score(source.targets, outputs, classes, where)

  def test_entry(self, epoch: int, step: int, source, outputs: np.ndarray, classes,
                 config: ml_collections.ConfigDict) -> dict[str, Any]:
    return results.scored_with_ci(epoch, step, source.targets, outputs, classes,
                                  samples=config.bootstrap_samples, seed=config.seed,
                                  groups=results.bootstrap_groups(source))

  def val_keys(self) -> tuple[str, ...]:
    return ("macro_auc", "per_class")

  def scalars(self, scored: dict[str, Any]) -> dict[str, float]:
    return {"val_macro_auc": scored["macro_auc"],
            **{f"val_auc/{k}": v for k, v in scored["per_class"].items()}}

  def summary(self, scored: dict[str, Any]) -> str:
    return f"macro AUC {scored['macro_auc']:.4f}"


@dataclasses.dataclass(frozen=True)
class Segmentation:
  protocol: str
  bce_weight: float = 1.0
  dice_weight: float = 1.0
  metric = "dice_positive"
  target = "mask"

  def build_model(self, config: ml_collections.ConfigDict, num_classes: int):
    del num_classes  # one foreground class, one logit per pixel
    return build_segmenter(config)

  def loss(self, logits: jax.Array, targets: jax.Array) -> jax.Array:
    masks = targets.astype(jnp.float32)
    return (self.bce_weight * bce_with_logits(logits, masks)
            + self.dice_weight * soft_dice_loss(logits, masks))

  def eval_outputs(self, logits: jax.Array) -> jax.Array:
    return jax.nn.sigmoid(logits)  # thresholded on the host, by `dice.binarize` (one place)

  def host_outputs(self, batch: dict[str, np.ndarray], outputs: np.ndarray) -> np.ndarray:
    return dice.image_counts(batch["mask"], dice.binarize(outputs))

  def score(self, source, outputs: np.ndarray, classes, where: str) -> dict[str, Any]:
    """Dice scores of per-image counts; the masks came with the batches, not from `source`."""
    del source, classes
    scored = dice.dice_scores(outputs)
    if np.isnan(scored["dice_positive"]):
      raise ValueError(f"{where} has no image with a pneumothorax: dice_positive (the "
                       "selection metric) is undefined; use a larger split")
    return {**scored, "trivial": dice.trivial_scores(outputs)}

  def test_entry(self, epoch: int, step: int, source, outputs: np.ndarray, classes,
                 config: ml_collections.ConfigDict) -> dict[str, Any]:
    del config
    return {"epoch": epoch, "step": step, **self.score(source, outputs, classes, "the test split"),
            "num_images": int(len(outputs))}

  def val_keys(self) -> tuple[str, ...]:
    return (*dice.METRICS, "trivial")

  def scalars(self, scored: dict[str, Any]) -> dict[str, float]:
    return {f"val_{k}": scored[k] for k in dice.METRICS}

  def summary(self, scored: dict[str, Any]) -> str:
    return (f"Dice positive {scored['dice_positive']:.4f}, per image "
            f"{scored['dice_per_image']:.4f} (all-empty {scored['trivial']['dice_per_image']:.4f}"
            f"), global {scored['dice_global']:.4f}")


def workload_for(config: ml_collections.ConfigDict):
  """config.task / config.protocol -> Classification() or Segmentation(protocol)."""
  if config.task in SEGMENTATION_TASKS:
    if config.protocol not in DECODERS:
      raise ValueError(f"config.protocol={config.protocol!r}: {config.task} is segmentation, "
                       f"one of {tuple(DECODERS)}")
    return Segmentation(config.protocol, float(config.loss.bce_weight),
                        float(config.loss.dice_weight))
  if not is_classification(config.protocol):
    raise ValueError(f"config.protocol={config.protocol!r}: {config.task} is classification")
  return Classification(config.protocol)

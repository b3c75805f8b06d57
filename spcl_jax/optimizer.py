"""AdamW with linear warmup + cosine decay, weight-decay mask and optional clipping (docs/method.md §6)."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  """lr = base_lr * global_batch / 256 (MAE's scaling rule) unless set directly."""
  if config.optim.learning_rate > 0:
    return float(config.optim.learning_rate)
  return float(config.optim.base_learning_rate) * config.batch_size / 256


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  total = int(config.total_steps)
  warmup = int(round(config.optim.warmup_fraction * total))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_learning_rate(config), warmup_steps=warmup,
      decay_steps=max(total, warmup + 1), end_value=0.0)


def weight_decay_mask(params: Any) -> Any:
  """Decay matrices and the patch-embedding kernel only.

  Biases, LayerNorm scales, the CLS token and log_scale are left alone: decaying a bias or a
  scale towards 0 changes what the layer computes, not just how large its weights are.
  """
  def decays(path, _):
    return getattr(path[-1], "key", None) == "kernel"
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  adamw = optax.adamw(
      learning_rate=learning_rate_schedule(config), b1=config.optim.b1, b2=config.optim.b2,
      weight_decay=config.optim.weight_decay, mask=weight_decay_mask)
  if config.optim.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(config.optim.grad_clip_norm), adamw)
  return adamw

"""Fine-tuning optimiser: AdamW with layer-wise lr decay and a half-cycle cosine, per step.

Medical MAE (`util/lr_decay.py`, BEiT's rule; `util/lr_sched.py`; `main_finetune_chestxray.py`):
  - layer ids: patch embedding, positions and CLS = 0; block i = i + 1; everything after the
    blocks (final norm, fc_norm, head) = depth + 1.
  - a parameter of layer l learns at lr * decay ** (depth + 1 - l): the head at 1.0, the first
    block at decay ** depth, the embedding at decay ** (depth + 1).
  - no weight decay on 1-D parameters (biases, LayerNorm) nor on CLS / positions. In our tree
    the attention biases are 2-D (heads, head_dim) and CLS is 3-D, yet they are 1-D (or listed)
    in timm's: the rule is therefore "decay kernels only", which is the same set.
  - the multiplier scales the whole AdamW update, weight decay included (torch param groups
    carry lr * lr_scale for both).
  - lr: linear warmup from 0 over the warmup epochs, then half a cosine down to min_lr, per
    step (Medical MAE adjusts it every iteration).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from spcl_jax import optimizer as pretrain_optimizer


def layer_id(path: tuple[str, ...], depth: int) -> int:
  """The BEiT layer of one parameter, from its path in the classifier tree."""
  if path[0] == "encoder":
    if path[1] in ("embedding", "cls"):
      return 0
    if path[1] == "Transformer" and path[2].startswith("encoderblock_"):
      return int(path[2].removeprefix("encoderblock_")) + 1
  return depth + 1  # encoder_norm, fc_norm, head


def _path_names(path) -> tuple[str, ...]:
  return tuple(getattr(k, "key", str(k)) for k in path)


def lr_multipliers(params: Any, depth: int, decay: float) -> Any:
  """A tree like `params` of decay ** (depth + 1 - layer_id)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: float(decay ** (depth + 1 - layer_id(_path_names(path), depth))), params)


def weight_decay_mask(params: Any) -> Any:
  """True for the kernels (matrices, patch kernel, head); False for biases, norms and CLS."""
  return pretrain_optimizer.weight_decay_mask(params)


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  """lr = blr * batch / 256 (Medical MAE `main_finetune_chestxray.py`), unless set directly."""
  return pretrain_optimizer.peak_learning_rate(config)


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int
                           ) -> optax.Schedule:
  total = int(config.epochs) * steps_per_epoch
  warmup = int(config.optim.warmup_epochs) * steps_per_epoch
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_learning_rate(config), warmup_steps=warmup,
      decay_steps=max(total, warmup + 1), end_value=float(config.optim.min_learning_rate))


def _scale_by_tree(multipliers: Any) -> optax.GradientTransformation:
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m, updates, multipliers), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config: ml_collections.ConfigDict, params: Any, depth: int,
                   steps_per_epoch: int) -> optax.GradientTransformation:
  adamw = optax.adamw(
      learning_rate=learning_rate_schedule(config, steps_per_epoch), b1=config.optim.b1,
      b2=config.optim.b2, eps=config.optim.eps, weight_decay=config.optim.weight_decay,
      mask=weight_decay_mask)
  multipliers = lr_multipliers(params, depth, float(config.optim.layer_decay))
  return optax.chain(adamw, _scale_by_tree(multipliers))

"""The fine-tuning classifier: the S-PCL ViT, a pooling, and one linear head (Medical MAE's).

Pooling (`config.model.pool`):
  avg  mean of the patch tokens (CLS excluded) through a new LayerNorm `fc_norm`; the encoder's
       final norm is not applied (and not a parameter). timm `global_pool='avg', fc_norm=True`,
       what Medical MAE fine-tunes (`models_vit.py`, `global_pool=True`).
  cls  the CLS token through the encoder's final norm: the token S-PCL trained. timm
       `global_pool='token'`.
The config's default 'auto' is resolved before the model is built (`recipe.resolve_pool`).
Parameters: {'encoder': ViT params (big_vision names), ['fc_norm'], 'head': {kernel, bias}}.
The head starts at trunc_normal(std=2e-5) and zero bias (Medical MAE `main_finetune_chestxray.py`
`trunc_normal_(model.head.weight, std=2e-5)`): near-zero logits, so the pre-trained features
are not disturbed by a random head in the first steps.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from spcl_jax.models.vit import VisionTransformer, build_encoder, patchify

POOLS = ("avg", "cls")
HEAD_INIT_STD = 2e-5


def _head_kernel_init(key, shape, dtype=jnp.float32):
  # timm's trunc_normal_ cuts at +-2 (absolute), i.e. +-1e5 std here: a plain normal.
  return jax.random.truncated_normal(key, -2.0 / HEAD_INIT_STD, 2.0 / HEAD_INIT_STD, shape,
                                     dtype) * HEAD_INIT_STD


class Classifier(nn.Module):
  """Normalised images (B, H, W[, C]) -> logits (B, num_classes), float32."""

  encoder: VisionTransformer
  num_classes: int
  pool: str = "avg"

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    if self.pool not in POOLS:
      raise ValueError(f"config.model.pool={self.pool!r} must be one of {POOLS}")
    patches = patchify(images, self.encoder.patch_size)
    positions = jnp.broadcast_to(jnp.arange(patches.shape[1]), patches.shape[:2])
    tokens = self.encoder(patches, positions, deterministic=not train)
    if self.pool == "avg":
      features = nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, name="fc_norm")(
          tokens[:, 1:].mean(axis=1))
    else:
      features = tokens[:, 0]
    return nn.Dense(self.num_classes, kernel_init=_head_kernel_init, name="head")(
        features.astype(jnp.float32))


def build_classifier(config: ml_collections.ConfigDict, num_classes: int) -> Classifier:
  """`config.model` (variant, image_size, dtype, pool, drop_path_rate, ...) -> the classifier."""
  pool = config.model.pool
  if pool not in POOLS:
    raise ValueError(f"config.model.pool={pool!r} must be one of {POOLS}")
  encoder = build_encoder(config.model).clone(
      drop_path_rate=float(config.model.drop_path_rate), final_norm=pool == "cls")
  return Classifier(encoder=encoder, num_classes=num_classes, pool=pool)


def init_params(model: Classifier, key: jax.Array) -> dict[str, Any]:
  """Fresh parameters (unboxed), float32; the encoder part is replaced by `config.init`."""
  e = model.encoder
  dummy = jnp.zeros((1, e.image_size, e.image_size, e.channels), jnp.float32)
  return nn.unbox(model.init(key, dummy)["params"])

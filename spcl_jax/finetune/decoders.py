"""Segmentation models: the fine-tuning ViT with a dense decoder, one logit per pixel.

Two decoders, one per protocol (`config.protocol`):
  mgca        `ProgressiveUpsampling` (SETR-PUP, what MGCA/GLoRIA's SIIM numbers use): the last
              block's patch tokens as a (S/16)^2 grid, four stages of 3x3 conv - norm - ReLU -
              2x bilinear upsampling (16x in all), a 1x1 conv to one logit at full resolution.
  upernet512  `UperNet` (MRM, EVA-X; BEiT/MAE's ADE20K head): the patch tokens of the blocks
              `config.model.pyramid_blocks` (ViT-B: 4/6/8/12, i.e. indices 3, 5, 7, 11) resampled
              to strides 4, 8, 16, 32 (two 2x2 transposed convs; one; identity; 2x2 max pool),
              then a pyramid pooling module on stride 32 (scales 1, 2, 3, 6) and an FPN top-down
              path, all levels upsampled to stride 4, fused, a 1x1 conv to one logit, bilinear
              upsampling to the input size.
Norm: GroupNorm (32 groups) where SETR and mmseg use (Sync)BatchNorm: no running statistics to
carry in the train state, and the same behaviour at any per-device batch.
Parameters: {'encoder': ViT (big_vision names, as the classifier's), 'decoder': {...}}.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from spcl_jax.models.vit import VisionTransformer, build_encoder, patchify

DECODERS = {"mgca": "progressive", "upernet512": "upernet"}
GROUPS = 32
PPM_SCALES = (1, 2, 3, 6)


def _resize(x: jax.Array, height: int, width: int) -> jax.Array:
  """Bilinear (half-pixel centres: torch's align_corners=False)."""
  return jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), "bilinear")


class ConvNormReLU(nn.Module):
  features: int
  kernel: int = 3

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(self.features, (self.kernel, self.kernel), padding="SAME", use_bias=False)(x)
    return nn.relu(nn.GroupNorm(num_groups=GROUPS)(x))


def tokens_to_grid(tokens: jax.Array, grid: int) -> jax.Array:
  """(B, 1 + grid^2, D) with CLS first -> (B, grid, grid, D) of the patch tokens."""
  return tokens[:, 1:].reshape(tokens.shape[0], grid, grid, tokens.shape[-1])


class ProgressiveUpsampling(nn.Module):
  """(B, g, g, D) -> (B, 16g, 16g) logits: four conv-norm-ReLU + 2x upsampling stages."""

  channels: int = 256
  stages: int = 4

  @nn.compact
  def __call__(self, grid: jax.Array) -> jax.Array:
    x = grid
    for _ in range(self.stages):
      x = ConvNormReLU(self.channels)(x)
      x = _resize(x, 2 * x.shape[1], 2 * x.shape[2])
    return nn.Conv(1, (1, 1), name="logits")(x)[..., 0]


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
  """torch's AdaptiveAvgPool2d(size) on NHWC: bin i spans [floor(iH/s), ceil((i+1)H/s))."""
  h, w = x.shape[1], x.shape[2]
  rows = []
  for i in range(size):
    r0, r1 = (i * h) // size, -(-((i + 1) * h) // size)
    cols = [x[:, r0:r1, (j * w) // size:-(-((j + 1) * w) // size)].mean(axis=(1, 2))
            for j in range(size)]
    rows.append(jnp.stack(cols, axis=1))
  return jnp.stack(rows, axis=1)


class FeaturePyramid(nn.Module):
  """Four (B, g, g, D) block outputs -> strides 4, 8, 16, 32 (BEiT/MAE's fpn1-4)."""

  @nn.compact
  def __call__(self, grids: Sequence[jax.Array]) -> list[jax.Array]:
    d = grids[0].shape[-1]
    up4 = nn.ConvTranspose(d, (2, 2), strides=(2, 2), name="fpn1_0")(grids[0])
    up4 = nn.gelu(nn.GroupNorm(num_groups=GROUPS, name="fpn1_norm")(up4), approximate=False)
    up4 = nn.ConvTranspose(d, (2, 2), strides=(2, 2), name="fpn1_1")(up4)
    up8 = nn.ConvTranspose(d, (2, 2), strides=(2, 2), name="fpn2")(grids[1])
    down32 = nn.max_pool(grids[3], (2, 2), strides=(2, 2))
    return [up4, up8, grids[2], down32]


class UperNet(nn.Module):
  """Four levels (strides 4..32) -> (B, H4, W4) logits at stride 4 (mmseg's UPerHead)."""

  channels: int = 512

  @nn.compact
  def __call__(self, levels: Sequence[jax.Array]) -> jax.Array:
    top = levels[-1]
    pooled = [top]
    for scale in PPM_SCALES:
      branch = ConvNormReLU(self.channels, 1, name=f"ppm_{scale}")(adaptive_avg_pool(top, scale))
      pooled.append(_resize(branch, top.shape[1], top.shape[2]))
    laterals = [ConvNormReLU(self.channels, 1, name=f"lateral_{i}")(x)
                for i, x in enumerate(levels[:-1])]
    laterals.append(ConvNormReLU(self.channels, name="ppm_bottleneck")(
        jnp.concatenate(pooled, axis=-1)))
    for i in range(len(laterals) - 1, 0, -1):  # top-down: add the coarser level, upsampled
      below = laterals[i - 1]
      laterals[i - 1] = below + _resize(laterals[i], below.shape[1], below.shape[2])
    outs = [ConvNormReLU(self.channels, name=f"fpn_{i}")(x) for i, x in enumerate(laterals[:-1])]
    outs.append(laterals[-1])
    h, w = outs[0].shape[1], outs[0].shape[2]
    fused = jnp.concatenate([outs[0]] + [_resize(x, h, w) for x in outs[1:]], axis=-1)
    fused = ConvNormReLU(self.channels, name="fpn_bottleneck")(fused)
    return nn.Conv(1, (1, 1), name="logits")(fused)[..., 0]


class Segmenter(nn.Module):
  """Normalised images (B, S, S[, C]) -> per-pixel logits (B, S, S), float32."""

  encoder: VisionTransformer
  decoder: str
  channels: int
  pyramid_blocks: tuple[int, ...] = ()

  def encoder_blocks(self) -> tuple[int, ...]:
    """The block outputs the decoder reads: the last one (mgca) or the pyramid's four."""
    return (self.encoder.depth - 1,) if self.decoder == "progressive" else self.pyramid_blocks

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    if images.ndim == 3:
      images = images[..., None]
    size = images.shape[1]
    patches = patchify(images, self.encoder.patch_size)
    positions = jnp.broadcast_to(jnp.arange(patches.shape[1]), patches.shape[:2])
    blocks = self.encoder(patches, positions, deterministic=not train)
    grid = self.encoder.grid_size
    grids = [tokens_to_grid(b, grid).astype(jnp.float32) for b in blocks]
    if self.decoder == "progressive":
      logits = ProgressiveUpsampling(self.channels, name="decoder")(grids[0])
    else:
      levels = FeaturePyramid(name="pyramid")(grids)
      logits = UperNet(self.channels, name="decoder")(levels)
    if logits.shape[1] != size:
      logits = _resize(logits[..., None], size, size)[..., 0]
    return logits.astype(jnp.float32)


def build_segmenter(config: ml_collections.ConfigDict) -> Segmenter:
  """`config.model` + `config.protocol` -> the segmenter; the encoder returns its block outputs."""
  protocol = config.protocol
  if protocol not in DECODERS:
    raise ValueError(f"config.protocol={protocol!r} must be one of {tuple(DECODERS)}")
  decoder = DECODERS[protocol]
  encoder = build_encoder(config.model)
  blocks = tuple(int(b) for b in config.model.pyramid_blocks)
  if decoder == "upernet" and (len(blocks) != 4 or
                               not all(0 <= b < encoder.depth for b in blocks)):
    raise ValueError(f"config.model.pyramid_blocks={blocks} must be 4 block indices in "
                     f"[0, {encoder.depth}) for variant {config.model.variant}")
  if int(config.model.decoder_channels) % GROUPS:
    raise ValueError(f"config.model.decoder_channels={config.model.decoder_channels} must be "
                     f"a multiple of {GROUPS} (GroupNorm groups)")
  model = Segmenter(encoder=encoder, decoder=decoder, channels=int(config.model.decoder_channels),
                    pyramid_blocks=blocks)
  # The mgca decoder reads the last block after the final norm (what a frozen encoder was
  # trained to output); the pyramid reads raw block outputs, as BEiT/MAE's segmentation does.
  return model.clone(encoder=encoder.clone(
      drop_path_rate=float(config.model.drop_path_rate),
      final_norm=decoder == "progressive", return_blocks=model.encoder_blocks()))


def init_segmenter(model: Segmenter, key: jax.Array) -> dict[str, Any]:
  e = model.encoder
  dummy = jnp.zeros((1, e.image_size, e.image_size, e.channels), jnp.float32)
  return model.init(key, dummy)

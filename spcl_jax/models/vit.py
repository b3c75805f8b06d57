"""The S-PCL encoder: a pre-LN Vision Transformer in Flax linen with big_vision's parameter names.

The encoder takes patches that were already gathered (only the visible ones of a view, or all of
them for a whole image) together with their grid positions, so the masked patches cost nothing.
Parameter tree (big_vision `models/vit.py`, blocks unrolled):

  embedding/{kernel (P, P, C, D), bias}        a stride-P conv, applied as a matmul on patches
  cls (1, 1, D)                                 one learnable CLS token shared by both views
  Transformer/encoderblock_{i}/LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,value,out},
                              LayerNorm_1, MlpBlock_0/{Dense_0, Dense_1}
  Transformer/encoder_norm

Positions are a fixed 2-D sin-cos table (not a parameter). Every parameter carries logical axis
names; the config maps them to mesh axes (see `spcl_jax/sharding.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spcl_jax.models.attention import (
    DEFAULT_SEQ_MULTIPLE, dot_product_attention, resolve_attention_impl, token_counts_of)

Dtype = Any

# name: (width D, depth, heads, mlp dim)
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "pico": (64, 2, 2, 256),  # ours, test-sized: fast on CPU, same code paths as the real ones
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
}


def variant_dims(variant: str) -> dict[str, int]:
  """'B/16' -> width, depth, num_heads, mlp_dim, patch_size."""
  name, _, patch = variant.partition("/")
  if name not in VARIANTS or not patch.isdigit():
    raise ValueError(f"config.model.variant={variant!r}: expected NAME/PATCH with NAME in "
                     f"{', '.join(VARIANTS)} (e.g. 'B/16')")
  width, depth, heads, mlp_dim = VARIANTS[name]
  return dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim, patch_size=int(patch))


def sincos_2d_posemb(grid_size: int, width: int) -> np.ndarray:
  """Fixed (grid_size**2, width) table, MAE formula: x then y halves, each [sin | cos].

  Row k is patch k in row-major order (k = row * grid_size + col).
  """
  if width % 4:
    raise ValueError(f"sin-cos position embedding needs width divisible by 4, got {width}")
  quarter = width // 4
  omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
  out_x = cols.reshape(-1)[:, None] * omega[None, :]
  out_y = rows.reshape(-1)[:, None] * omega[None, :]
  table = np.concatenate([np.sin(out_x), np.cos(out_x), np.sin(out_y), np.cos(out_y)], axis=1)
  return table.astype(np.float32)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """(B, H, W[, C]) -> (B, N, P*P*C), patches row-major, pixels in (py, px, c) order.

  The (py, px, c) order makes `embedding/kernel` (P, P, C, D) a plain reshape of the matmul
  weight, exactly big_vision's / timm's conv kernel.
  """
  if images.ndim == 3:
    images = images[..., None]
  b, h, w, c = images.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def _dense_init(names: tuple[str | None, ...]) -> Callable[..., jax.Array]:
  return nn.with_logical_partitioning(nn.initializers.xavier_uniform(), names)


def _zeros(names: tuple[str | None, ...]) -> Callable[..., jax.Array]:
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
  # eps 1e-6 and the two-pass variance: what PyTorch/timm compute, so exported weights agree.
  return nn.LayerNorm(
      epsilon=1e-6, use_fast_variance=False, dtype=dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
      bias_init=_zeros(("embed",)))


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention with big_vision's query/key/value/out DenseGeneral parameters."""

  num_heads: int
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"  # resolved: 'xla' or 'cudnn' (resolve_attention_impl)
  seq_multiple: int = 1  # the kernel's sequence is padded to a multiple of this

  @nn.compact
  def __call__(self, x: jax.Array, token_counts: jax.Array | None = None) -> jax.Array:
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    project_in = functools.partial(
        nn.DenseGeneral, features=(self.num_heads, head_dim), dtype=self.dtype,
        kernel_init=_dense_init(("embed", "heads", "kv")), bias_init=_zeros(("heads", "kv")))
    q = project_in(name="query")(x)
    k = project_in(name="key")(x)
    v = project_in(name="value")(x)
    y = dot_product_attention(q, k, v, self.attention_impl, token_counts, self.seq_multiple)
    return nn.DenseGeneral(
        features=width, axis=(-2, -1), dtype=self.dtype, name="out",
        kernel_init=_dense_init(("heads", "kv", "embed")), bias_init=_zeros(("embed",)))(y)


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=_dense_init(("embed", "mlp")),
                 bias_init=_zeros(("mlp",)))(x)
    x = nn.gelu(x, approximate=False)  # exact erf GELU, as in timm (Flax defaults to tanh)
    return nn.Dense(width, dtype=self.dtype, kernel_init=_dense_init(("mlp", "embed")),
                    bias_init=_zeros(("embed",)))(x)


class DropPath(nn.Module):
  """Stochastic depth: in training, zero a residual branch for a random subset of the examples.

  Each example keeps the whole branch with probability 1 - rate, scaled by 1 / (1 - rate) so its
  expectation is unchanged (timm's `drop_path`); at eval the branch passes unchanged. The draw
  uses the 'dropout' rng stream.
  """

  rate: float = 0.0

  @nn.compact
  def __call__(self, branch: jax.Array, deterministic: bool = True) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return branch
    keep = 1.0 - self.rate
    shape = (branch.shape[0],) + (1,) * (branch.ndim - 1)  # one draw per example
    kept = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return branch * kept.astype(branch.dtype) / jnp.asarray(keep, branch.dtype)


class Encoder1DBlock(nn.Module):
  """Pre-LN block: x + MHA(LN(x)), then x + MLP(LN(x)), each branch under stochastic depth.

  S-PCL pre-training uses no dropout and no drop path (drop_path=0); fine-tuning does.
  """

  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"
  seq_multiple: int = 1
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True,
               token_counts: jax.Array | None = None) -> jax.Array:
    y = _layer_norm("LayerNorm_0", self.dtype)(x)
    y = MultiHeadDotProductAttention(self.num_heads, self.dtype, self.attention_impl,
                                     self.seq_multiple,
                                     name="MultiHeadDotProductAttention_0")(y, token_counts)
    x = x + DropPath(self.drop_path)(y, deterministic)
    y = _layer_norm("LayerNorm_1", self.dtype)(x)
    y = MlpBlock(self.mlp_dim, self.dtype, name="MlpBlock_0")(y)
    return x + DropPath(self.drop_path)(y, deterministic)


# Rematerialisation: what each block keeps for the backward pass and what it recomputes.
# 'full' keeps only the block's input (the memory of one block instead of all, ~1/3 more
# compute); 'save_dots' keeps the outputs of the weight matmuls (projections, MLP) and
# recomputes the rest: the layer norms, GELU and the attention itself, whose (L, L)
# logits are what costs memory.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy_name(remat: str) -> str:
  if remat not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat={remat!r} must be one of {', '.join(REMAT_POLICIES)}")
  return remat


def remat_block(remat: str) -> type[nn.Module]:
  name = remat_policy_name(remat)
  if name == "none":
    return Encoder1DBlock
  # static_argnums counts self: argument 2 is `deterministic`, a Python bool.
  return nn.remat(Encoder1DBlock, static_argnums=(2,), policy=REMAT_POLICIES[name])


def drop_path_rates(depth: int, max_rate: float) -> list[float]:
  """Block i drops with rate max_rate * i / (depth - 1): 0 at the first block (timm's linspace)."""
  if depth == 1:
    return [0.0]
  return [max_rate * i / (depth - 1) for i in range(depth)]


class Transformer(nn.Module):
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"
  seq_multiple: int = 1
  remat: str = "none"  # a name in REMAT_POLICIES
  drop_path_rate: float = 0.0
  final_norm: bool = True  # False: tokens before encoder_norm (fine-tuning's avg pool + fc_norm)
  # Non-empty: return the outputs of these blocks (a list; segmentation's feature pyramid), the
  # final norm applied to the last block's output only.
  return_blocks: tuple[int, ...] = ()

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True,
               token_counts: jax.Array | None = None) -> jax.Array | list[jax.Array]:
    block_cls = remat_block(self.remat)
    rates = drop_path_rates(self.depth, self.drop_path_rate)
    outputs = {}
    for i in range(self.depth):  # unrolled: parameter names match big_vision's checkpoints
      x = block_cls(self.num_heads, self.mlp_dim, self.dtype, self.attention_impl,
                    self.seq_multiple, rates[i], name=f"encoderblock_{i}")(
                        x, deterministic, token_counts)
      outputs[i] = x
    if self.return_blocks:
      last = self.depth - 1
      if self.final_norm and last in self.return_blocks:
        outputs[last] = _layer_norm("encoder_norm", jnp.float32)(x)
      return [outputs[b].astype(jnp.float32) for b in self.return_blocks]
    if not self.final_norm:
      return x.astype(jnp.float32)
    return _layer_norm("encoder_norm", jnp.float32)(x)


class VisionTransformer(nn.Module):
  """Patches + their grid indices -> final-LayerNorm tokens, CLS first.

  Call with `patches` (B, n, P*P*C) (pixels already normalised) and `positions` (B, n) int:
  the patch indices in the full grid. Returns (B, 1 + n, D) in float32; [:, 0] is z.
  """

  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  image_size: int
  channels: int = 1
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"  # resolved ('xla' or 'cudnn'): build_encoder resolves 'auto'
  seq_multiple: int = 1  # attention pads its sequence to a multiple of this
  remat: bool | str = "none"  # a name in REMAT_POLICIES
  drop_path_rate: float = 0.0  # stochastic depth of the last block (fine-tuning; 0 pre-training)
  final_norm: bool = True
  return_blocks: tuple[int, ...] = ()  # see Transformer: segmentation's block outputs

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size ** 2

  @nn.compact
  def __call__(self, patches: jax.Array, positions: jax.Array,
               deterministic: bool = True) -> jax.Array:
    d = self.width
    tokens = PatchEmbedding(self.patch_size, self.channels, d, self.dtype, name="embedding")(
        patches)
    posemb = jnp.asarray(sincos_2d_posemb(self.grid_size, d))
    tokens = tokens + posemb[positions].astype(tokens.dtype)
    cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                         (None, None, "embed")), (1, 1, d))
    cls = jnp.broadcast_to(cls.astype(tokens.dtype), (tokens.shape[0], 1, d))
    x = jnp.concatenate([cls, tokens], axis=1)
    return Transformer(self.depth, self.num_heads, self.mlp_dim, self.dtype,
                       self.attention_impl, self.seq_multiple, self.remat,
                       self.drop_path_rate, self.final_norm, tuple(self.return_blocks),
                       name="Transformer")(x, deterministic, token_counts_of(positions))


class PatchEmbedding(nn.Module):
  """big_vision's stride-P conv, stored as its (P, P, C, D) kernel, applied to gathered patches.

  Gathering first and embedding second means the masked patches are never embedded.
  """

  patch_size: int
  channels: int
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, patches: jax.Array) -> jax.Array:
    p, c, d = self.patch_size, self.channels, self.width
    if patches.shape[-1] != p * p * c:
      raise ValueError(f"patches have {patches.shape[-1]} values, expected {p}*{p}*{c}")
    kernel = self.param("kernel", nn.with_logical_partitioning(
        _conv_lecun_init(p * p * c), (None, None, None, "embed")), (p, p, c, d))
    bias = self.param("bias", _zeros(("embed",)), (d,))
    kernel = jnp.asarray(kernel, self.dtype).reshape(p * p * c, d)
    return jnp.dot(patches.astype(self.dtype), kernel) + jnp.asarray(bias, self.dtype)


def _conv_lecun_init(fan_in: int) -> Callable[..., jax.Array]:
  """LeCun-normal over the conv's fan-in (P*P*C), as for big_vision's embedding conv."""
  def init(key, shape, dtype=jnp.float32):
    std = (1.0 / fan_in) ** 0.5
    return jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype) * (std / 0.87962566103423978)
  return init


def build_encoder(model_config: Any, dtype: Dtype | None = None) -> VisionTransformer:
  """`config.model` (variant, image_size, channels, dtype, attention_impl,
  attention_seq_multiple, remat) -> module, with the attention kernel chosen for this device."""
  dims = variant_dims(model_config.variant)
  if model_config.image_size % dims["patch_size"]:
    raise ValueError(f"config.model.image_size={model_config.image_size} is not a multiple of "
                     f"the patch size {dims['patch_size']}")
  dtype = jnp.dtype(dtype or model_config.dtype)
  implementation = resolve_attention_impl(model_config.get("attention_impl", "auto"), dtype,
                                          dims["width"] // dims["num_heads"])
  seq_multiple = (model_config.get("attention_seq_multiple", 0)
                  or DEFAULT_SEQ_MULTIPLE[implementation])
  return VisionTransformer(
      **dims,
      image_size=model_config.image_size,
      channels=model_config.get("channels", 1),
      dtype=dtype,
      attention_impl=implementation,
      seq_multiple=seq_multiple,
      remat=remat_policy_name(model_config.get("remat", "none")))


def encode_images(model: VisionTransformer, params: Any, images: jax.Array) -> jax.Array:
  """Whole normalised images (B, H, W[, C]) -> final-LN tokens (B, 1 + N, D), all patches.

  What fine-tuning and feature extraction see: every patch, no partition.
  """
  patches = patchify(images, model.patch_size)
  positions = jnp.broadcast_to(jnp.arange(patches.shape[1]), patches.shape[:2])
  return model.apply({"params": params}, patches, positions)

"""Attention for the encoder: the kernel chosen per device, and padding the kernels need.

Pre-training's views have 1 + n//2 tokens (206 for ViT-B/16 at 512 with mask 0.6), a count
cuDNN's fused flash attention rejects. The padding lives inside the attention call only: the
tokens are padded for the kernel, the padded keys are masked, and the padded rows are cut
before anything else sees them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Dtype = Any

ATTENTION_IMPLS = ("auto", "xla", "cudnn")
# The sequence multiple each kernel is padded to when config.model.attention_seq_multiple is 0:
# cuDNN's fused kernel rejects odd token counts such as pre-training's 1 + 205; XLA takes any.
DEFAULT_SEQ_MULTIPLE = {"xla": 1, "cudnn": 8}
# cuDNN's flash kernel takes bf16/fp16 with head dims that are multiples of 8 up to 128 (256 on
# Hopper and later; 128 is the bound 'auto' trusts on every NVIDIA GPU).
CUDNN_DTYPES = ("bfloat16", "float16")
_CUDNN_MAX_HEAD_DIM = 128


def is_nvidia_gpu(device: jax.Device) -> bool:
  if device.platform != "gpu":
    return False
  version = str(getattr(device.client, "platform_version", "")).lower()
  return "cuda" in version or "nvidia" in device.device_kind.lower()


def resolve_attention_impl(name: str, dtype: Dtype, head_dim: int,
                           device: jax.Device | None = None) -> str:
  """config.model.attention_impl -> the kernel that runs: 'xla' or 'cudnn'.

  'auto' picks cuDNN's fused flash attention on NVIDIA GPUs when the
  kernel takes the shapes (bf16/fp16, head dim a multiple of 8 and at most 128), else XLA's
  einsums: on CPU, and on TPU, where no fused kernel has been measured faster yet.
  """
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"config.model.attention_impl={name!r} must be one of "
                     f"{', '.join(ATTENTION_IMPLS)}")
  if name in ("xla", "cudnn"):
    return name
  device = device or jax.devices()[0]
  fits_cudnn = (jnp.dtype(dtype).name in CUDNN_DTYPES and head_dim % 8 == 0
                and head_dim <= _CUDNN_MAX_HEAD_DIM)
  return "cudnn" if is_nvidia_gpu(device) and fits_cudnn else "xla"


def padded_length(length: int, multiple: int) -> int:
  return -(-length // multiple) * multiple


def token_counts_of(positions: jax.Array) -> jax.Array:
  """(B, n) patch positions -> (B,) int32 token counts, 1 + n (the CLS token and the patches).

  Computed from `positions` rather than as a constant on purpose: under the vmap over the two
  views, cuDNN's batching rule folds the view axis into the batch and reshapes the sequence
  lengths with it, which a constant (unbatched) array of B entries cannot follow.
  """
  return 1 + jnp.sum(positions >= 0, axis=-1, dtype=jnp.int32)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "xla",
                          token_counts: jax.Array | None = None, seq_multiple: int = 1
                          ) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v over (B, L, heads, head_dim): the one place to swap kernels.

  When L is not a multiple of `seq_multiple`, q, k and v are padded with zero tokens up to the
  next multiple for the kernel only, the padded keys are masked out (their logits never enter a
  softmax) and the padded rows are cut from the output, so each real token sees exactly what it
  saw unpadded and nothing outside this function ever sees a pad token. `token_counts` (B,) are
  the real lengths (all L; see token_counts_of for why they come in as an array).
  """
  length = q.shape[1]
  padded = padded_length(length, seq_multiple)
  if padded == length:
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  if token_counts is None:
    token_counts = jnp.full((q.shape[0],), length, jnp.int32)
  widths = ((0, 0), (0, padded - length), (0, 0), (0, 0))
  q, k, v = (jnp.pad(t, widths) for t in (q, k, v))
  out = jax.nn.dot_product_attention(q, k, v, query_seq_lengths=token_counts,
                                     key_value_seq_lengths=token_counts,
                                     implementation=implementation)
  return out[:, :length]

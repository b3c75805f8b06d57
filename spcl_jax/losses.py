"""The S-PCL InfoNCE loss with a similarity from a table (T-SP by default; METHOD 4), on one
device or across a mesh.

All math in float32. Under `jax.shard_map` pass `axis_name` (a mesh axis name or a tuple of
them): each device keeps its local rows, gathers every z along those axes as columns, computes
local rows x global columns, and the partial sums are psum-med, so every device returns the
loss of the GLOBAL batch, and gradients flow back through the all-gather to each device's z.
Row layout, for a (local) batch of b images: rows [z1_0..z1_{b-1}, z2_0..z2_{b-1}]; columns the
same for the global batch of B images: [Z1_0..Z1_{B-1}, Z2_0..Z2_{B-1}].
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

AxisName = str | Sequence[str] | None
NEGATIVES = ("all", "cross")
# cosine of two L2-normalised embeddings -> similarity; the logits are similarity x scale.
Similarity = Callable[[jax.Array], jax.Array]


def tsp_similarity(cos: jax.Array, kappa: float) -> jax.Array:
  """T-SP: 0.5 (1 + c) / (1 + (1 - c) kappa), in [0, 1]; 1 for identical directions."""
  return 0.5 * (1.0 + cos) / (1.0 + (1.0 - cos) * kappa)


def cosine_similarity(cos: jax.Array) -> jax.Array:
  """The cosine itself: plain InfoNCE (SimCLR/CLIP logits), the baseline T-SP is compared to."""
  return cos


# name -> (function of the cosine, the config.spcl fields it takes as keyword arguments). A new
# similarity is a function and a row here (and its default in configs/default.py).
SIMILARITIES: dict[str, tuple[Callable[..., jax.Array], tuple[str, ...]]] = {
    "tsp": (tsp_similarity, ("kappa",)),
    "cosine": (cosine_similarity, ()),
}


def make_similarity(name: str, params: Mapping[str, Any]) -> Similarity:
  """The similarity `name` with its parameters (read from `params`, e.g. config.spcl) bound."""
  if name not in SIMILARITIES:
    raise ValueError(f"similarity must be one of {tuple(SIMILARITIES)}, got {name!r}")
  function, fields = SIMILARITIES[name]
  return functools.partial(function, **{field: params[field] for field in fields})


def similarity_from_config(spcl_config: Any) -> Similarity:
  """`config.spcl.similarity` with its parameters bound from the same section."""
  return make_similarity(spcl_config.similarity, spcl_config)


def logit_scale(log_scale: jax.Array, max_scale: float = 100.0) -> jax.Array:
  """s = exp(min(log_s, log max_scale)): clamped in the forward pass, no gradient above it."""
  return jnp.exp(jnp.minimum(jnp.asarray(log_scale, jnp.float32), jnp.log(max_scale)))


def clamp_log_scale(log_scale: jax.Array, max_scale: float = 100.0) -> jax.Array:
  """The parameter itself back into [0, log max_scale], applied after every optimiser update.

  The forward clamp alone is a trap (open_clip clamps the parameter for this reason): above the
  cap the gradient is 0, Adam's momentum keeps pushing log_s up, and it never comes back.
  """
  return jnp.clip(log_scale, 0.0, jnp.log(max_scale)).astype(jnp.asarray(log_scale).dtype)


def l2_normalize(z: jax.Array, eps: float = 1e-12) -> jax.Array:
  z = z.astype(jnp.float32)
  return z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), eps * eps))


def _as_axes(axis_name: AxisName) -> tuple[str, ...] | str | None:
  if axis_name is None or isinstance(axis_name, str):
    return axis_name
  return tuple(axis_name)


def _gather_batch(z: jax.Array, axis_name: AxisName) -> jax.Array:
  if axis_name is None:
    return z
  return jax.lax.all_gather(z, _as_axes(axis_name), axis=0, tiled=True)


def _first_global_row(local_batch: int, axis_name: AxisName) -> jax.Array:
  """Global index of this device's first example (matches all_gather's tiled order)."""
  if axis_name is None:
    return jnp.int32(0)
  return jax.lax.axis_index(_as_axes(axis_name)) * local_batch


def _sum_over_devices(x: jax.Array, axis_name: AxisName) -> jax.Array:
  return x if axis_name is None else jax.lax.psum(x, _as_axes(axis_name))


class PairLogits(NamedTuple):
  logits: jax.Array        # (2b, 2B) local rows x global columns, self entries = -inf
  positive: jax.Array      # (2b,) column of each row's partner view
  global_batch: int        # B


def spcl_logits(z1: jax.Array, z2: jax.Array, log_scale: jax.Array, *, similarity: Similarity,
                max_scale: float = 100.0, axis_name: AxisName = None) -> PairLogits:
  """Similarity logits of this device's 2b rows against all 2B embeddings, self-pairs masked out."""
  b = z1.shape[0]
  rows = l2_normalize(jnp.concatenate([z1, z2], axis=0))                        # (2b, D)
  g1 = _gather_batch(l2_normalize(z1), axis_name)                               # (B, D)
  g2 = _gather_batch(l2_normalize(z2), axis_name)
  big_b = g1.shape[0]
  columns = jnp.concatenate([g1, g2], axis=0)                                   # (2B, D)
  # Full float32 precision: the accelerators' default (TF32 on GPU, one bf16 pass on TPU) puts
  # self-cosines above 1, where the clip zeroes their gradient.
  cos = jnp.clip(jnp.matmul(rows, columns.T, precision=jax.lax.Precision.HIGHEST), -1.0, 1.0)
  logits = similarity(cos) * logit_scale(log_scale, max_scale)
  example = _first_global_row(b, axis_name) + jnp.arange(b)                     # global ids
  self_col = jnp.concatenate([example, big_b + example])
  positive = jnp.concatenate([big_b + example, example])
  is_self = jnp.arange(2 * big_b)[None, :] == self_col[:, None]
  return PairLogits(jnp.where(is_self, -jnp.inf, logits), positive, big_b)


def _cross_entropy_sum(logits: jax.Array, target: jax.Array) -> jax.Array:
  picked = jnp.take_along_axis(logits, target[:, None], axis=1)[:, 0]
  return jnp.sum(jax.nn.logsumexp(logits, axis=1) - picked)


def _loss_from_logits(pl: PairLogits, negatives: str, axis_name: AxisName) -> jax.Array:
  big_b = pl.global_batch
  if negatives == "all":
    # Every other embedding of the global batch is a negative: 2(B - 1) per row.
    local_sum = _cross_entropy_sum(pl.logits, pl.positive)
  elif negatives == "cross":
    # OCL: view-1 rows against view-2 columns and back, B x B each; the mean of the two CEs.
    b = pl.logits.shape[0] // 2
    z1_rows = pl.logits[:b, big_b:]
    z2_rows = pl.logits[b:, :big_b]
    target = pl.positive[b:]  # the example's own index, in either half
    local_sum = _cross_entropy_sum(z1_rows, target) + _cross_entropy_sum(z2_rows, target)
  else:
    raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
  return _sum_over_devices(local_sum, axis_name) / (2 * big_b)


def _retrieval_from_logits(pl: PairLogits, axis_name: AxisName) -> jax.Array:
  hits = jnp.sum((jnp.argmax(pl.logits, axis=1) == pl.positive).astype(jnp.float32))
  return _sum_over_devices(hits, axis_name) / (2 * pl.global_batch)


def spcl_loss(z1: jax.Array, z2: jax.Array, log_scale: jax.Array, *, similarity: Similarity,
              negatives: str = "all", axis_name: AxisName = None,
              max_scale: float = 100.0) -> jax.Array:
  """InfoNCE over the global batch; z1, z2: (local batch, D), unnormalised."""
  return spcl_loss_and_retrieval(z1, z2, log_scale, similarity=similarity, negatives=negatives,
                                 axis_name=axis_name, max_scale=max_scale)[0]


def pair_retrieval_top1(z1: jax.Array, z2: jax.Array, *, similarity: Similarity,
                        axis_name: AxisName = None) -> jax.Array:
  """Share of the 2B rows whose best match (self excluded) is their partner; chance 1/(2B-1)."""
  pl = spcl_logits(z1, z2, jnp.float32(0.0), similarity=similarity, axis_name=axis_name)
  return _retrieval_from_logits(pl, axis_name)


def spcl_loss_and_retrieval(z1: jax.Array, z2: jax.Array, log_scale: jax.Array, *,
                            similarity: Similarity, negatives: str = "all",
                            axis_name: AxisName = None,
                            max_scale: float = 100.0) -> tuple[jax.Array, jax.Array]:
  """The loss and the pair-retrieval top-1 from one logits matrix (what the train step uses)."""
  pl = spcl_logits(z1, z2, log_scale, similarity=similarity, max_scale=max_scale,
                   axis_name=axis_name)
  retrieval = jax.lax.stop_gradient(_retrieval_from_logits(pl, axis_name))
  return _loss_from_logits(pl, negatives, axis_name), retrieval

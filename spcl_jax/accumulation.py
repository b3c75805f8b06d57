"""Gradient accumulation over k micro-batches that keeps every negative (docs/method.md §5).

A contrastive loss is not a sum over examples: each row's softmax runs over the whole batch.
Plain accumulation therefore changes the objective (each micro-batch sees only its own
negatives). Cached-embedding accumulation computes the exact full-batch gradient in three
passes inside the one jitted step:

  1. forward every micro-batch, keeping only its embeddings z (no activations for a backward);
  2. the loss and dL/dz over the whole global batch (every device's negatives);
  3. per micro-batch, re-run the forward under `jax.vjp`, feed it its slice of dL/dz, and sum
     the parameter gradients.

Peak activation memory is one micro-batch's; the cost is one extra forward pass.

Layout: every device splits ITS OWN block of the global batch into k slices; micro-batch j is
the j-th slice of every device. The reshapes below only regroup rows a device already holds,
so no image moves between devices. Partitions are drawn once for the global batch from the
global example indices (docs/method.md §2) and laid out the same way, so they do not depend on k.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Embed = Callable[[Any, jax.Array, jax.Array], jax.Array]      # (enc params, images, pos) -> z
Loss = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]  # (z, log_s) -> loss, top1


def to_microbatches(x: jax.Array, num_shards: int, k: int, axis: int = 0) -> jax.Array:
  """Batch axis `axis` of size B -> a leading axis of k micro-batches of B / k rows each.

  With B = num_shards * k * m and device d holding rows [d k m, (d + 1) k m), micro-batch j
  is rows {d k m + j m + r : every d, r < m}, in device order: the j-th slice of each device.
  """
  x = jnp.moveaxis(x, axis, 0)
  batch, rest = x.shape[0], x.shape[1:]
  if batch % (num_shards * k):
    raise ValueError(f"a batch of {batch} does not split into {num_shards} devices x {k} "
                     "micro-batches")
  m = batch // (num_shards * k)
  x = x.reshape(num_shards, k, m, *rest).swapaxes(0, 1).reshape(k, num_shards * m, *rest)
  return jnp.moveaxis(x, 1, axis + 1)


def from_microbatches(x: jax.Array, num_shards: int, axis: int = 0) -> jax.Array:
  """The inverse of `to_microbatches`: (k, ..., B / k at axis + 1, ...) -> (..., B, ...)."""
  x = jnp.moveaxis(x, axis + 1, 1)
  k, rows, rest = x.shape[0], x.shape[1], x.shape[2:]
  m = rows // num_shards
  x = x.reshape(k, num_shards, m, *rest).swapaxes(0, 1).reshape(num_shards * k * m, *rest)
  return jnp.moveaxis(x, 0, axis)


def _add(a: Any, b: Any) -> Any:
  return jax.tree.map(jnp.add, a, b)


def embed_in_microbatches(encoder_params: Any, images: jax.Array, positions: jax.Array, *,
                          embed: Embed, num_shards: int, k: int) -> jax.Array:
  """z (2, B, D) of the whole batch, computed one micro-batch at a time (forward only).

  Nothing here is differentiated, so no activation outlives its micro-batch.
  """
  def embed_one(_, mb):
    return None, embed(encoder_params, *mb)
  _, z_mbs = jax.lax.scan(embed_one, None, (to_microbatches(images, num_shards, k),
                                            to_microbatches(positions, num_shards, k, 1)))
  return from_microbatches(z_mbs, num_shards, 1)


def cached_gradients(params: Any, images: jax.Array, positions: jax.Array, *, embed: Embed,
                     embed_on_device: Embed, loss: Loss, num_shards: int, k: int,
                     batch_axes: Any) -> tuple[tuple[jax.Array, jax.Array], Any]:
  """((whole-batch loss, retrieval), gradients of it): exact, at one micro-batch's memory.

  images: (B, H, W) uint8; positions: (2, B, h) view patch indices of the global batch.
  `embed_on_device` is `embed` without sharding constraints: pass 3 maps it over a leading
  device axis (vmap with spmd_axis_name), so each device's parameter gradients stay its own
  and are summed over devices ONCE after the k micro-batches, not once per micro-batch. The
  price: each device holds a full-size float32 gradient accumulator, also under FSDP.
  """
  encoder = params["encoder"]
  z = embed_in_microbatches(encoder, images, positions, embed=embed, num_shards=num_shards,
                            k=k)                                # pass 1: (2, B, D)

  # Pass 2: the loss over the whole batch, and its gradient w.r.t. every embedding.
  (value, retrieval), (dz, dlog_scale) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      z, params["log_scale"])

  # Pass 3: each micro-batch's forward again (same images, same partitions), its VJP fed its
  # slice of dL/dz. dL/dz already carries the 1/(2B) of the mean, so the gradients just add.
  def per_device(mb_images, mb_positions, mb_dz):
    _, vjp = jax.vjp(lambda p: embed_on_device(p, mb_images, mb_positions), encoder)
    return vjp(mb_dz.astype(z.dtype))[0]
  per_device = jax.vmap(per_device, in_axes=(0, 1, 1), spmd_axis_name=batch_axes)

  def by_device(x, axis):  # (..., n m at axis, ...) -> (..., n, m, ...)
    return x.reshape(*x.shape[:axis], num_shards, x.shape[axis] // num_shards,
                     *x.shape[axis + 1:])

  def backprop_one(total, mb):
    mb_images, mb_positions, mb_dz = mb
    grads = per_device(by_device(mb_images, 0), by_device(mb_positions, 1), by_device(mb_dz, 1))
    return _add(total, grads), None
  zeros = jax.tree.map(lambda p: jnp.zeros((num_shards, *p.shape), p.dtype), encoder)
  device_grads, _ = jax.lax.scan(backprop_one, zeros, (
      to_microbatches(images, num_shards, k), to_microbatches(positions, num_shards, k, 1),
      to_microbatches(dz, num_shards, k, 1)))
  encoder_grads = jax.tree.map(lambda g: jnp.sum(g, axis=0), device_grads)  # one all-reduce
  return (value, retrieval), {"encoder": encoder_grads, "log_scale": dlog_scale}


def plain_gradients(params: Any, images: jax.Array, positions: jax.Array, *, embed: Embed,
                    loss: Loss, num_shards: int, k: int
                    ) -> tuple[tuple[jax.Array, jax.Array, jax.Array], Any]:
  """Each micro-batch contrasts only within itself; gradients averaged over the k of them.

  A weaker objective (B/k - 1 negatives per image instead of B - 1), kept because it is what
  naive accumulation in the paper's PyTorch code most likely did. Its gradients are reduced
  over devices once per micro-batch (k times per step), as in naive data-parallel code.
  Returns the whole batch's loss and retrieval (comparable with 'cached'), the mean
  micro-batch loss that was optimised, and the gradients.
  """
  image_mbs = to_microbatches(images, num_shards, k)
  position_mbs = to_microbatches(positions, num_shards, k, 1)

  def microbatch_objective(p, mb_images, mb_positions):
    z = embed(p["encoder"], mb_images, mb_positions)
    value, _ = loss(z, p["log_scale"])
    return value, z

  def step_one(total, mb):
    (value, z), grads = jax.value_and_grad(microbatch_objective, has_aux=True)(params, *mb)
    return _add(total, grads), (value, z)
  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, (mb_losses, z_mbs) = jax.lax.scan(step_one, zeros, (image_mbs, position_mbs))
  grads = jax.tree.map(lambda g: g / k, grads)
  z = jax.lax.stop_gradient(from_microbatches(z_mbs, num_shards, 1))
  value, retrieval = loss(z, params["log_scale"])
  return (value, retrieval, jnp.mean(mb_losses)), grads

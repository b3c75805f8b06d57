"""Random masking and the disjoint partition of the visible patches into two views.

See docs/method.md §2. Pure functions of a key: example e of a step draws from `fold_in(key,
e)`, with e its index in the GLOBAL batch. The masks then do not depend on how the batch is laid
out over devices, processes or micro-batches, so every layout and a resumed run see the same
partitions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def visible_count(num_patches: int, mask_ratio: float) -> int:
  """n = floor((1 - r) N), the patches that survive masking."""
  if not 0.0 < mask_ratio < 1.0:
    raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
  # The small epsilon keeps e.g. (1 - 0.6) * 1024 = 409.6 from flooring wrongly on round-off.
  return int((1.0 - mask_ratio) * num_patches + 1e-9)


def view_size(num_patches: int, mask_ratio: float) -> int:
  """h = n // 2 patches per view (an odd n drops one visible patch)."""
  h = visible_count(num_patches, mask_ratio) // 2
  if h < 1:
    raise ValueError(f"mask_ratio {mask_ratio} leaves fewer than 2 of {num_patches} patches "
                     "visible: each view needs at least one")
  return h


def partition_one(key: jax.Array, num_patches: int, h: int) -> tuple[jax.Array, jax.Array]:
  """One example: a uniform permutation of the patch indices; view 1 = first h, view 2 = next h."""
  order = jax.random.permutation(key, num_patches)
  return order[:h].astype(jnp.int32), order[h:2 * h].astype(jnp.int32)


def partition(key: jax.Array, batch_size: int, num_patches: int, mask_ratio: float,
              *, first_example: int | jax.Array = 0) -> tuple[jax.Array, jax.Array]:
  """Patch indices of the two views: int32 arrays (batch_size, h) each, disjoint per row.

  Row i is example `first_example + i` of the global batch (a micro-batch or a process's slice
  passes its offset), keyed by `fold_in(key, first_example + i)`.
  """
  h = view_size(num_patches, mask_ratio)
  example_ids = first_example + jnp.arange(batch_size, dtype=jnp.int32)
  keys = jax.vmap(lambda e: jax.random.fold_in(key, e))(example_ids)
  return jax.vmap(lambda k: partition_one(k, num_patches, h))(keys)

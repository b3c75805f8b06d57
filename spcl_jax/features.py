"""Frozen features of whole images on every device of the mesh: what the evaluators and
`python -m spcl_jax.extract` both use.

  source -> global batches of B rows (B a multiple of the batch shards); process p decodes rows
  [p*b, (p+1)*b) of each, rows past the end of the source are zero images -> one global uint8
  array sharded over the batch axes -> jitted encoder on all N patches (no partition, as
  fine-tuning sees an image) -> CLS and/or mean-patch features, replicated -> host, padding rows
  masked out, so every example is counted exactly once and in source order.

The features are the CLS token after the final LayerNorm (the S-PCL embedding z) or the mean of
the final-norm patch tokens. Preprocessing is pre-training's: decode at the run's image size and
resize filter, then (u8 / 255 - mean) / std on the device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from spcl_jax.data.decode import decode_image
from spcl_jax.data.normalize import normalize_uint8
from spcl_jax.data.sources import ImageSource
from spcl_jax.models.vit import VisionTransformer, encode_images

POOLINGS = ("cls", "mean_patch")


def check_poolings(poolings: Sequence[str], where: str = "pooling") -> tuple[str, ...]:
  poolings = tuple(poolings)
  unknown = [p for p in poolings if p not in POOLINGS]
  if unknown or not poolings:
    raise ValueError(f"{where}={poolings!r}: choose from {POOLINGS}")
  return poolings


def data_parallel_mesh(devices: Sequence[jax.Device] | None = None
                       ) -> tuple[Mesh, NamedSharding]:
  """A 1-D mesh over `devices` (default: all) and its batch sharding, for standalone extraction."""
  devices = np.asarray(jax.devices() if devices is None else list(devices))
  mesh = Mesh(devices, ("batch",))
  return mesh, NamedSharding(mesh, P("batch", None, None))


def global_batch_size(requested: int, batch_sharding: NamedSharding) -> int:
  """`requested` rounded up to a multiple of the batch shards, so every device gets rows."""
  if requested < 1:
    raise ValueError(f"batch size {requested}: must be at least 1")
  shards = math.prod(batch_sharding.mesh.shape[a] for a in _batch_axes(batch_sharding))
  return -(-requested // shards) * shards


def _batch_axes(batch_sharding: NamedSharding) -> tuple[str, ...]:
  axes = batch_sharding.spec[0]
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def process_rows(batch_index: int, global_batch: int, process_index: int,
                 process_count: int) -> range:
  """Source indices of this process's rows of one global batch (some may be padding)."""
  local = global_batch // process_count
  start = batch_index * global_batch + process_index * local
  return range(start, start + local)


@dataclasses.dataclass(frozen=True)
class _DecodeRow:
  """Global row index -> uint8 (S, S); rows past the end of the source are zeros (padding)."""

  source: ImageSource
  image_size: int
  resize_filter: str

  def __call__(self, row: int) -> np.ndarray:
    if row >= len(self.source):
      return np.zeros((self.image_size, self.image_size), np.uint8)
    return decode_image(self.source[row], self.image_size, self.resize_filter)


def _local_batches(source: ImageSource, global_batch: int, image_size: int, resize_filter: str,
                   process_index: int, process_count: int, read_threads: int):
  """This process's uint8 blocks of every global batch, decoded ahead by grain's threads."""
  num_batches = -(-len(source) // global_batch)
  local = global_batch // process_count
  rows = [row for t in range(num_batches)
          for row in process_rows(t, global_batch, process_index, process_count)]
  ds = grain.MapDataset.source(rows).map(_DecodeRow(source, image_size, resize_filter))
  ds = ds.batch(local, drop_remainder=True)
  threads = max(1, read_threads)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                              prefetch_buffer_size=max(2, threads)))


def make_encode_fn(model: VisionTransformer, mean: float, std: float,
                   poolings: Sequence[str], batch_sharding: NamedSharding,
                   param_shardings: Any = None):
  """jit(encoder params, uint8 (B, S, S) sharded over the batch) -> {pooling: (B, D) f32}.

  The parameters keep the layout they are given (`param_shardings`; None: replicated), so the
  trainer's sharded parameters are used in place, without a copy. Equal arguments give the same
  jitted function, so evaluators that extract alike (a probe and a kNN) compile it once.
  """
  leaves, treedef = jax.tree.flatten(param_shardings)
  return _encode_fn(model, float(mean), float(std), check_poolings(poolings), batch_sharding,
                    tuple(leaves), treedef)


@functools.lru_cache(maxsize=16)
def _encode_fn(model: VisionTransformer, mean: float, std: float, poolings: tuple[str, ...],
               batch_sharding: NamedSharding, sharding_leaves: tuple[Any, ...], treedef: Any):
  replicated = NamedSharding(batch_sharding.mesh, P())
  param_shardings = (jax.tree.unflatten(treedef, sharding_leaves) if sharding_leaves
                     else replicated)

  def encode(params: Any, images_u8: jax.Array) -> dict[str, jax.Array]:
    x = normalize_uint8(images_u8, mean, std)
    if model.channels > 1:  # a model trained on C channels sees the grayscale copied to each
      x = jnp.repeat(x[..., None], model.channels, axis=-1)
    tokens = encode_images(model, params, x).astype(jnp.float32)
    pooled = {"cls": lambda: tokens[:, 0], "mean_patch": lambda: tokens[:, 1:].mean(axis=1)}
    return {name: pooled[name]() for name in poolings}

  return jax.jit(encode, in_shardings=(param_shardings, batch_sharding),
                 out_shardings=replicated)


def extract(encode_fn, params: Any, source: ImageSource, *, batch_sharding: NamedSharding,
            image_size: int, resize_filter: str, batch_size: int = 32, read_threads: int = 4,
            progress: bool = False, desc: str = "extract") -> dict[str, np.ndarray]:
  """{pooling: (M, D) float32} for the M images of `source`, in source order, on every process.

  `batch_size` is rounded up to a multiple of the batch shards (and capped near M), so every
  device and process works on every batch; the last batch's padding rows are masked out.
  """
  if len(source) == 0:
    raise ValueError(f"{source!r} has no images")
  shards = global_batch_size(1, batch_sharding)
  global_batch = global_batch_size(min(batch_size, len(source)), batch_sharding)
  process_count = jax.process_count()
  if global_batch % process_count:
    raise ValueError(f"the {shards} batch shards are not divisible by {process_count} processes")
  shape = (global_batch, image_size, image_size)
  columns: dict[str, list[np.ndarray]] = {}
  pending = None  # the previous batch, still computing on the device while we decode
  bar = tqdm.tqdm(total=len(source), unit="img", desc=desc,
                  disable=not progress or jax.process_index() != 0)
  with bar:
    batches = _local_batches(source, global_batch, image_size, resize_filter,
                             jax.process_index(), process_count, read_threads)
    for t, local in enumerate(batches):
      images = jax.make_array_from_process_local_data(batch_sharding, np.asarray(local), shape)
      outputs = encode_fn(params, images)  # dispatched asynchronously
      if pending is not None:
        _collect(*pending, columns, bar)
      # Rows t*B .. t*B+B-1 of the source; those past its end are padding: masked out.
      valid = np.arange(t * global_batch, (t + 1) * global_batch) < len(source)
      pending = (outputs, valid)
    if pending is not None:
      _collect(*pending, columns, bar)
  return {name: np.concatenate(parts) for name, parts in columns.items()}


def _collect(outputs: dict[str, jax.Array], valid: np.ndarray,
             columns: dict[str, list[np.ndarray]], bar: tqdm.tqdm) -> None:
  for name, value in outputs.items():
    columns.setdefault(name, []).append(np.asarray(value)[valid])
  bar.update(int(valid.sum()))


def record_names(source: ImageSource) -> list[str]:
  """Names in source order, without reading the images where the source lists them."""
  if hasattr(source, "name"):
    return [source.name(i) for i in range(len(source))]
  return [source[i]["name"] for i in range(len(source))]

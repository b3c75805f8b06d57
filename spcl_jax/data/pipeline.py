"""The grain input pipeline: source -> shuffle per epoch -> this process's slice -> decode,
grayscale, resize, 8-bit -> batch -> (worker processes) -> numpy uint8 (local_batch, S, S).

Order is a pure function of (seed, position), so the iterator state grain saves with each
checkpoint (a position) resumes the exact stream. Every process sees the same global stream and
takes a contiguous block of each global batch: global batch t = stream[t*B, (t+1)*B), process p
holds [t*B + p*b, t*B + (p+1)*b). The global array assembled from the processes is then the same
whatever the process count, and so are the masks keyed by global position.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import grain
from absl import flags
import ml_collections
import numpy as np

from spcl_jax.data import worker_lifetime
from spcl_jax.data.decode import decode_image
from spcl_jax.data.sources import ImageSource, open_source


class ProcessBlockDataset(grain.MapDataset):
  """Element k of process p's stream is element (k // b) * B + p * b + k % b of the parent."""

  def __init__(self, parent: grain.MapDataset, global_batch: int, local_batch: int,
               process_index: int):
    super().__init__(parent)
    self._global_batch = global_batch
    self._local_batch = local_batch
    self._offset = process_index * local_batch

  def __len__(self) -> int:
    parent_len = len(self._parent)
    if parent_len >= sys.maxsize:
      return sys.maxsize
    return (parent_len // self._global_batch) * self._local_batch

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    step, k = divmod(index, self._local_batch)
    return self._parent[step * self._global_batch + self._offset + k]

  def __str__(self) -> str:
    return (f"ProcessBlockDataset(global_batch={self._global_batch}, "
            f"local_batch={self._local_batch}, offset={self._offset})")


@dataclasses.dataclass(frozen=True)
class DecodeImage(grain.transforms.Map):
  """Record -> uint8 (S, S); picklable, so it runs in grain's worker processes."""

  image_size: int
  resize_filter: str = "bilinear"

  def map(self, record: dict[str, Any]) -> Any:
    return decode_image(record, self.image_size, self.resize_filter)


def local_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f"config.batch_size={global_batch} is not divisible by the "
                     f"{process_count} processes")
  return global_batch // process_count


def _read_options(config: ml_collections.ConfigDict) -> grain.ReadOptions:
  threads = int(config.data.read_threads)
  # grain can keep only as many threads busy as the buffer (in batches) has room for.
  buffer = max(threads, int(config.data.prefetch_buffer_size), 1)
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)


def _with_workers(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
  if num_workers <= 0:
    return ds
  # grain's workers read absl flags; called as a library (tests, notebooks) nobody parsed them,
  # so take the defaults rather than fail.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                        worker_init_fn=worker_lifetime.worker_init_fn())


def shuffle_seed(config: ml_collections.ConfigDict) -> int:
  seed = int(config.data.shuffle_seed)
  return int(config.seed) if seed < 0 else seed


def train_dataset(config: ml_collections.ConfigDict, *, process_index: int = 0,
                  process_count: int = 1, source: ImageSource | None = None
                  ) -> grain.IterDataset:
  """Endless stream of this process's uint8 batches, reshuffled every epoch from the seed."""
  source = open_source(config.data.source) if source is None else source
  b = local_batch_size(config.batch_size, process_count)
  ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed(config)).repeat()
  ds = ProcessBlockDataset(ds, config.batch_size, b, process_index)
  ds = ds.map(DecodeImage(config.model.image_size, config.data.resize_filter))
  ds = ds.batch(b, drop_remainder=True)
  return _with_workers(ds.to_iter_dataset(_read_options(config)), config.data.num_workers)


def eval_num_batches(config: ml_collections.ConfigDict, num_images: int, max_batches: int,
                     what: str = "the source") -> int:
  """Whole batches of distinct images, at most `max_batches`."""
  full = num_images // config.batch_size
  if full < 1:
    raise ValueError(f"config.batch_size={config.batch_size} is larger than the "
                     f"{num_images} images of {what}: evaluation needs one batch of distinct "
                     "images")
  return min(full, int(max_batches))


def eval_dataset(config: ml_collections.ConfigDict, source: ImageSource, *, max_batches: int,
                 process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """The first eval_num_batches * B images in source order, this process's blocks, batched."""
  b = local_batch_size(config.batch_size, process_count)
  n = eval_num_batches(config, len(source), max_batches, repr(source)) * config.batch_size
  ds = grain.MapDataset.source(source)[:n]
  ds = ProcessBlockDataset(ds, config.batch_size, b, process_index)
  ds = ds.map(DecodeImage(config.model.image_size, config.data.resize_filter))
  return ds.batch(b, drop_remainder=True)


def as_numpy_batch(batch: Any) -> np.ndarray:
  array = np.asarray(batch)
  if array.dtype != np.uint8:
    raise TypeError(f"input pipeline produced {array.dtype}, expected uint8")
  return array

"""Labelled splits and their grain pipelines for fine-tuning.

  train  source -> shuffle per epoch (seeded) -> repeat -> this process's block of each global
         batch -> decode + random augmentation (per-example rng from (seed, position)) -> batch
         -> grain workers -> {"image": uint8 (b, S, S), "label": float32 (b, K)}
  eval   every image of the split exactly once, in record order, padded with copies of the last
         image up to whole global batches; "valid" marks the real ones, whose logits are kept.

Like pre-training, the train order and every augmentation draw are a pure function of
(seed, stream position), so the iterator state in a checkpoint resumes the exact stream.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import ml_collections
import numpy as np

from spcl_jax.data import pipeline
from spcl_jax.data.decode import decode_image
from spcl_jax.data import splits as splits_lib
from spcl_jax.data.prepared import LabelledSource, split_file_stem

SPLIT_SCHEMES = ("paper", "official", "files")


def split_sources(config: ml_collections.ConfigDict) -> dict[str, LabelledSource]:
  """{'train', 'val', 'test'} sources of config.data.prepared for the config's split scheme."""
  out_dir, policy = config.data.prepared, config.chexpert_policy
  fraction = str(config.label_fraction)
  scheme = config.split_scheme
  if scheme not in SPLIT_SCHEMES:
    raise ValueError(f"config.split_scheme={scheme!r} must be one of {SPLIT_SCHEMES}")
  if scheme != "paper":
    raise ValueError(f"config.split_scheme={scheme!r} needs the official split files, which "
                     "this build of prepare does not write yet")
  return {"train": LabelledSource(out_dir, "train", fraction, policy),
          "val": LabelledSource(out_dir, "val", "100", policy),
          "test": LabelledSource(out_dir, "test", "100", policy)}


def split_hashes(sources: dict[str, LabelledSource]) -> dict[str, str]:
  """{split file stem: sha256} of the files the run read (prepare recorded them)."""
  hashes = {}
  for source in sources.values():
    stem = split_file_stem(source.split, source.fraction)
    hashes[stem] = splits_lib.file_sha256(source.folder.out_dir / "splits" / f"{stem}.txt")
  return hashes


def stored_image_size(source: LabelledSource) -> int:
  return int(source.folder.report["settings"]["image_size"])


@dataclasses.dataclass(frozen=True)
class TrainTransform(grain.transforms.RandomMap):
  """Record -> {"image": augmented uint8 (S, S), "label"}; rng from grain (seed, position)."""

  image_size: int
  stored_size: int
  resize_filter: str

  def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    del rng  # a plain resize until the host augmentation lands
    image = decode_image(record, self.image_size, self.resize_filter)
    return {"image": image, "label": np.asarray(record["label"], np.float32)}


@dataclasses.dataclass(frozen=True)
class EvalTransform(grain.transforms.Map):
  """Record -> {"image": uint8 (S, S), "label", "valid"}: the deterministic eval view."""

  image_size: int
  stored_size: int
  resize_filter: str

  def map(self, record: dict[str, Any]) -> dict[str, Any]:
    image = decode_image(record, self.image_size, self.resize_filter)
    return {"image": image, "label": np.asarray(record["label"], np.float32),
            "valid": np.bool_(record["valid"])}


class PaddedSource:
  """A source padded with its last record up to `length`; "valid" is False on the padding."""

  def __init__(self, source: LabelledSource, length: int):
    self.source, self.length = source, length

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self.source[min(index, len(self.source) - 1)]
    return {**record, "valid": index < len(self.source)}


def train_dataset(config: ml_collections.ConfigDict, source: LabelledSource, *,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  b = pipeline.local_batch_size(config.batch_size, process_count)
  ds = grain.MapDataset.source(source).shuffle(seed=pipeline.shuffle_seed(config)).repeat()
  ds = pipeline.ProcessBlockDataset(ds, config.batch_size, b, process_index)
  ds = ds.random_map(TrainTransform(config.model.image_size, stored_image_size(source),
                                    config.data.resize_filter),
                     seed=pipeline.shuffle_seed(config) + 1)
  ds = ds.batch(b, drop_remainder=True)
  return pipeline._with_workers(ds.to_iter_dataset(pipeline._read_options(config)),  # pylint: disable=protected-access
                                config.data.num_workers)


def eval_num_batches(config: ml_collections.ConfigDict, num_images: int) -> int:
  return -(-num_images // config.batch_size)


def eval_dataset(config: ml_collections.ConfigDict, source: LabelledSource, *,
                 process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  b = pipeline.local_batch_size(config.batch_size, process_count)
  padded = PaddedSource(source, eval_num_batches(config, len(source)) * config.batch_size)
  ds = grain.MapDataset.source(padded)
  ds = pipeline.ProcessBlockDataset(ds, config.batch_size, b, process_index)
  ds = ds.map(EvalTransform(config.model.image_size, stored_image_size(source),
                            config.data.resize_filter))
  return ds.batch(b, drop_remainder=True)


def as_batch(batch: dict[str, Any]) -> dict[str, np.ndarray]:
  """Checks the dtypes the step expects: uint8 images, float32 labels."""
  images = pipeline.as_numpy_batch(batch["image"])
  out = {"image": images, "label": np.asarray(batch["label"], np.float32)}
  if "valid" in batch:
    out["valid"] = np.asarray(batch["valid"], bool)
  return out

"""Labelled splits and their grain pipelines for fine-tuning.

  train  source -> shuffle per epoch (seeded) -> repeat -> decode + random augmentation
         (per-example rng from (seed, global stream position), lazily) -> this process's block
         of each global batch -> batch -> grain workers -> {"image": uint8 (b, S, S), "label":
         float32 (b, K)}
  eval   every image of the split exactly once, in record order, padded with copies of the last
         image up to whole global batches; "valid" marks the real ones, whose logits are kept.

Segmentation (SIIM): records carry a "mask" (stored S x S, 0/1); it goes through the same crop,
resize and flip as its image (`augment`, nearest-neighbour) and batches as uint8 (b, S, S).
`config.data.balance_train` keeps every positive training image and as many negatives, drawn
once with the run's seed (MGCA's balanced training set); val and test are never balanced.

Like pre-training, the train order and every augmentation draw are a pure function of
(seed, stream position), so the iterator state in a checkpoint resumes the exact stream.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import grain
import ml_collections
import numpy as np

from spcl_jax.data import pipeline
from spcl_jax.data.datasets.records import EncodeSettings
from spcl_jax.data.decode import decode_image
from spcl_jax.data.prepared_folder import LabelledSource
from spcl_jax.downstream import SPLIT_SCHEMES
from spcl_jax.finetune.augment import EvalTransform as EvalAugment, TrainAugment


def split_sources(config: ml_collections.ConfigDict) -> dict[str, LabelledSource]:
  """{'train', 'val', 'test'} of config.data.prepared under config.split_scheme.

  paper: the 7:2:1 patient split prepare writes; official: the download's test list as test,
  val carved by patient from its train list (splits/official_*.txt); files: the user's lists
  in config.split_files.{train,val,test}. The label fraction always subsets train only.
  """
  scheme = config.split_scheme
  if scheme not in SPLIT_SCHEMES:
    raise ValueError(f"config.split_scheme={scheme!r} must be one of {SPLIT_SCHEMES}")
  common = dict(policy=config.chexpert_policy)
  if scheme == "files":
    files = {k: str(v) for k, v in config.split_files.items()}
    empty = [k for k in ("train", "val", "test") if not files.get(k)]
    if empty:
      raise ValueError(f"config.split_scheme='files' needs config.split_files.{empty[0]} (a "
                       "text file of image names, one a line)")
    common["split_files"] = files
  else:
    common["scheme"] = scheme
  out_dir = config.data.prepared
  train = LabelledSource(out_dir, "train", str(config.label_fraction), **common)
  if config.data.get("balance_train", False):
    train = balanced(train, config.seed)
  sources = {"train": train,
             "val": LabelledSource(out_dir, "val", "100", **common),
             "test": LabelledSource(out_dir, "test", "100", **common)}
  if config.get("classes", ""):
    for source in sources.values():
      keep_classes(source, config.classes)
  return sources


def keep_classes(source: LabelledSource, classes: str) -> LabelledSource:
  """Narrows `source` to the comma-separated `classes` (config.classes), in the given order."""
  names = [name.strip() for name in classes.split(",") if name.strip()]
  unknown = [name for name in names if name not in source.label_names]
  if unknown or len(set(names)) != len(names):
    raise ValueError(f"config.classes={classes!r}: "
                     + (f"{unknown[0]!r} is not a class of this task (its classes: "
                        f"{', '.join(source.label_names)})" if unknown else "a class is repeated"))
  columns = [list(source.label_names).index(name) for name in names]
  source.targets = source.targets[:, columns]
  source.label_names = names
  return source


def balanced(source: LabelledSource, seed: int) -> LabelledSource:
  """Every positive image (any label 1) and an equal number of negatives, seeded, in order.

  Narrows `source` in place of a copy: it is a LabelledSource still (split info, targets).
  """
  positive = np.flatnonzero(source.targets.max(axis=1) > 0)
  negative = np.flatnonzero(source.targets.max(axis=1) == 0)
  if len(positive) == 0:
    raise ValueError(f"config.data.balance_train: the train split ({len(source)} images at "
                     "this label fraction) has no positive image")
  rng = np.random.default_rng(seed)
  keep_negative = rng.choice(negative, min(len(negative), len(positive)), replace=False)
  keep = np.sort(np.concatenate([positive, keep_negative]))
  source.indices = source.indices[keep]
  source.targets = source.targets[keep]
  return source


def split_hashes(sources: dict[str, LabelledSource]) -> dict[str, str]:
  """{split file stem: sha256} of the lists the run read (train: its label-fraction file)."""
  hashes = {}
  for split, source in sources.items():
    info = source.split_info
    stem = pathlib.Path(info["file"]).stem
    if info["scheme"] == "split_files" and info["fraction"] != "100":
      stem += f"_{info['fraction']}pct"  # a nested subset of the user's list (same file)
    hashes[stem] = info["sha256"]
  return hashes


def stored_image_size(source: LabelledSource) -> int:
  return int(source.folder.report["settings"]["image_size"])


def stored_image_settings(source: LabelledSource) -> dict[str, Any]:
  """How prepare stored the images (size, encoding, quality, filter): `records.EncodeSettings`."""
  settings = source.folder.report["settings"]
  return {field.name: settings[field.name] for field in dataclasses.fields(EncodeSettings)
          if field.name in settings}


class TrainTransform(grain.transforms.RandomMap):
  """Record -> {"image": augmented uint8 (S, S), "label"}; rng from grain (seed, position).

  The stored image (prepare's size) is decoded without resizing, then randomly cropped, flipped
  and RandAugmented to S x S (`augment.TrainAugment`, Medical MAE's recipe).
  """

  def __init__(self, config: ml_collections.ConfigDict, stored_size: int):
    self.stored_size = stored_size
    self.resize_filter = config.data.resize_filter
    self.augment = TrainAugment(
        config.model.image_size, scale=tuple(config.data.crop_scale), hflip=config.data.hflip,
        randaugment_magnitude=(config.data.randaugment_magnitude
                               if config.data.randaugment else None),
        magnitude_std=config.data.randaugment_magnitude_std)

  def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    image = decode_image(record, self.stored_size, self.resize_filter)
    image, mask = self.augment(image, rng, record.get("mask"))
    return _example(record, image, mask)


class EvalTransform(grain.transforms.Map):
  """Record -> {"image": uint8 (S, S), "label", "valid"}: resize, then centre crop S."""

  def __init__(self, config: ml_collections.ConfigDict, stored_size: int):
    self.stored_size = stored_size
    self.resize_filter = config.data.resize_filter
    self.transform = EvalAugment(config.model.image_size,
                                 crop_fraction=config.data.eval_crop_fraction)

  def map(self, record: dict[str, Any]) -> dict[str, Any]:
    image = decode_image(record, self.stored_size, self.resize_filter)
    image, mask = self.transform(image, record.get("mask"))
    return {**_example(record, image, mask), "valid": np.bool_(record["valid"])}


def _example(record: dict[str, Any], image: np.ndarray, mask: np.ndarray | None
             ) -> dict[str, Any]:
  example = {"image": image, "label": np.asarray(record["label"], np.float32)}
  if mask is not None:
    example["mask"] = mask
  return example


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
  # The augmentation's rng is keyed by the position in the global stream (before this
  # process's block is taken), so an image is augmented alike whatever the process count.
  ds = ds.random_map(TrainTransform(config, stored_image_size(source)),
                     seed=pipeline.shuffle_seed(config) + 1)
  ds = pipeline.ProcessBlockDataset(ds, config.batch_size, b, process_index)
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
  ds = ds.map(EvalTransform(config, stored_image_size(source)))
  return ds.batch(b, drop_remainder=True)


def as_batch(batch: dict[str, Any]) -> dict[str, np.ndarray]:
  """Checks the dtypes the step expects: uint8 images (and masks), float32 labels."""
  images = pipeline.as_numpy_batch(batch["image"])
  out = {"image": images, "label": np.asarray(batch["label"], np.float32)}
  if "mask" in batch:
    out["mask"] = pipeline.as_numpy_batch(batch["mask"])
  if "valid" in batch:
    out["valid"] = np.asarray(batch["valid"], bool)
  return out

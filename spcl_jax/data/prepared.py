"""Readers of a prepared folder (`python -m spcl_jax.data.prepare ... --out OUT_DIR`).

Pre-training: `config.data.source = "prepared:OUT_DIR[,split=S][,views=V][,fraction=F]"`
  split     all (default) | train | val | test | official_train_val | official_test (NIH), i.e.
            any OUT_DIR/splits/<split>.txt
  views     frontal (default: PA/AP only) | all (laterals too, if prepared with --views all)
  fraction  100 (default) | 10 | 1: percent of the train split (split=train only), nested
  e.g. "prepared:/data/mimic", "prepared:/data/chexpert,split=train,fraction=10".
  Records are {"name", "encoded"} (JPEG/PNG bytes of the S x S image): the pipeline decodes.
Fine-tuning: `LabelledSource(OUT_DIR, split="train", fraction=10, policy="ones")` adds
  "label" (float32 targets of the dataset's TASK_LABELS; `policy` is CheXpert's uncertainty
  policy) and, for SIIM, "mask" (S x S uint8 of 0/1). `.shard(process_index, process_count)`
  gives one process its contiguous slice for multi-host evaluation.
Both are grain random-access sources: index -> record, the same order in every process (record
order, which is the manifest order), picklable for grain's worker processes.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import pathlib
from typing import Any

import numpy as np

from spcl_jax.data import splits as splits_lib
from spcl_jax.data.datasets import dataset_module
from spcl_jax.data.datasets import manifest as mf
from spcl_jax.data.datasets import records
from spcl_jax.data.sources import register_source

_OPTIONS = {"split": "all", "views": "frontal", "fraction": "100"}
_FRACTION_FILES = {"100": "train", "10": "train_10pct", "1": "train_1pct"}


def parse_argument(argument: str) -> tuple[str, dict[str, str]]:
  """'OUT_DIR,key=value,...' -> (OUT_DIR, options with defaults filled in)."""
  out_dir, *pairs = argument.split(",")
  if not out_dir.strip():
    raise ValueError("config.data.source: 'prepared' needs a folder, e.g. 'prepared:/data/mimic'")
  options = dict(_OPTIONS)
  for pair in pairs:
    key, sep, value = pair.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or key not in _OPTIONS:
      raise ValueError(f"config.data.source: 'prepared:' option {pair!r} is not one of "
                       f"{', '.join(k + '=...' for k in _OPTIONS)}")
    options[key] = value
  return out_dir.strip(), options


def split_file_stem(split: str, fraction: str) -> str:
  fraction = fraction.rstrip("%").removesuffix("pct")
  if fraction not in _FRACTION_FILES:
    raise ValueError(f"fraction {fraction!r} is not one of {', '.join(_FRACTION_FILES)} "
                     "(percent of the train split)")
  if fraction != "100":
    if split != "train":
      raise ValueError(f"fraction={fraction} needs split=train (got split={split!r}): label "
                       "fractions are subsets of the train split")
    return _FRACTION_FILES[fraction]
  return split


class PreparedFolder:
  """The parts of OUT_DIR that every reader needs: report, records index, TFDS data source."""

  def __init__(self, out_dir: str | pathlib.Path):
    self.out_dir = pathlib.Path(out_dir).expanduser()
    report_path = self.out_dir / "report.json"
    if not report_path.is_file():
      raise ValueError(f"{str(self.out_dir)!r} is not a prepared folder (no report.json): run "
                       "python -m spcl_jax.data.prepare DATASET --src RAW --out OUT first")
    self.report = json.loads(report_path.read_text())
    if not self.report.get("complete"):
      raise ValueError(f"{str(self.out_dir)!r}: preparation did not finish; run it again")
    self.dataset = self.report["settings"]["dataset"]
    dataset_module(self.dataset)  # Fails early on an unknown dataset name.
    self.names, self.views, self.codes = self._read_index()
    self._data_source = None  # Opened lazily: cheap to pickle into grain workers.

  def _read_index(self) -> tuple[list[str], list[str], np.ndarray]:
    names, views, codes = [], [], []
    with open(self.out_dir / "records.csv", newline="", encoding="utf-8") as f:
      for row in csv.DictReader(f):
        names.append(row["name"])
        views.append(row["view"])
        codes.append([int(code) for code in row["labels"].split()])
    return names, views, np.asarray(codes, dtype=np.int8).reshape(len(names), -1)

  @property
  def module(self):
    return dataset_module(self.dataset)  # Not an attribute: modules do not pickle.

  def tfds_dir(self) -> pathlib.Path:
    name = records.builder_name(self.dataset)
    versions = sorted((self.out_dir / "tfds" / name).glob("*/dataset_info.json"))
    if not versions:
      raise ValueError(f"{str(self.out_dir)!r}: no TFDS records under tfds/{name}/")
    return versions[-1].parent

  @property
  def data_source(self):
    if self._data_source is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      builder = tfds.builder_from_directory(str(self.tfds_dir()))
      if len(self.names) != builder.info.splits[records.SPLIT].num_examples:
        raise ValueError(f"{str(self.out_dir)!r}: records.csv lists {len(self.names)} images but "
                         f"the records hold {builder.info.splits[records.SPLIT].num_examples}")
      # The pipeline's workers decode; here we only hand over the encoded bytes.
      skip = {"image": tfds.decode.SkipDecoding()}
      if "mask" in builder.info.features:
        skip["mask"] = tfds.decode.SkipDecoding()
      self._data_source = builder.as_data_source(split=records.SPLIT, decoders=skip)
    return self._data_source

  def __getstate__(self):
    return {**self.__dict__, "_data_source": None}

  def select(self, split: str, views: str, fraction: str = "100") -> np.ndarray:
    """Record indices of a split file's images with the asked views, in record order."""
    if views not in ("frontal", "all"):
      raise ValueError(f"views={views!r} is not 'frontal' or 'all'")
    split_dir = self.out_dir / "splits"
    splits_lib.verify_split_files(split_dir)
    stem = split_file_stem(split, fraction)
    if not (split_dir / f"{stem}.txt").is_file():
      known = sorted(p.stem for p in split_dir.glob("*.txt"))
      raise ValueError(f"{str(self.out_dir)!r} has no split {stem!r}; it has {', '.join(known)}")
    wanted = set(splits_lib.read_split_file(split_dir / f"{stem}.txt"))
    indices = [i for i, name in enumerate(self.names)
               if name in wanted and (views == "all" or self.views[i] in mf.FRONTAL_VIEWS)]
    missing = len(wanted) - sum(name in wanted for name in self.names)
    if missing:
      logging.warning("%s: %d of the %d images in splits/%s.txt have no record (missing or "
                      "undecodable, see report.json)", self.out_dir, missing, len(wanted), stem)
    if not indices:
      raise ValueError(f"{str(self.out_dir)!r}: split {stem!r} with views={views!r} selects no "
                       "image")
    return np.asarray(indices, dtype=np.int64)

  def record(self, index: int) -> dict[str, Any]:
    record = self.data_source[int(index)]
    name = record["name"].decode()
    if name != self.names[index]:
      raise ValueError(f"{str(self.out_dir)!r}: record {index} is {name!r} but records.csv "
                       f"says {self.names[index]!r}: the index does not match the records")
    return record


class PreparedSource:
  """Images of one split: {"name", "encoded"}; what `prepared:` gives pre-training."""

  def __init__(self, out_dir: str | pathlib.Path, split: str = "all", views: str = "frontal",
               fraction: str | int = "100", *, folder: PreparedFolder | None = None,
               indices: np.ndarray | None = None):
    self.folder = folder or PreparedFolder(out_dir)
    self.split, self.views, self.fraction = split, views, str(fraction)
    self.indices = self.folder.select(split, views, self.fraction) if indices is None else indices

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self.folder.record(self.indices[index])
    return {"name": record["name"].decode(), "encoded": record["image"]}

  def name(self, index: int) -> str:
    """Record `index`'s name from the index, without reading the record."""
    return self.folder.names[self.indices[index]]

  def shard(self, process_index: int, process_count: int):
    """This process's contiguous slice (grain's ShardOptions convention), same type."""
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    n = len(self.indices)
    start, stop = n * process_index // process_count, n * (process_index + 1) // process_count
    shard = object.__new__(type(self))
    shard.__dict__.update(self.__dict__)
    shard.indices = self.indices[start:stop]
    if hasattr(self, "targets"):
      shard.targets = self.targets[start:stop]
    return shard

  def __repr__(self) -> str:
    return (f"{type(self).__name__}({str(self.folder.out_dir)!r}, split={self.split!r}, "
            f"views={self.views!r}, fraction={self.fraction}, {len(self)} images)")


class LabelledSource(PreparedSource):
  """Images with fine-tuning targets (and SIIM masks) of one split and label fraction."""

  def __init__(self, out_dir: str | pathlib.Path, split: str = "train",
               fraction: str | int = "100", policy: str = "ones", views: str = "frontal"):
    super().__init__(out_dir, split, views, fraction)
    module = self.folder.module
    if not module.TASK_LABELS:
      raise ValueError(f"{self.folder.dataset} has no labels: use it for pre-training only")
    self.label_names = module.TASK_LABELS
    self.policy = policy
    self.targets = module.targets(self.folder.codes[self.indices], policy)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self.folder.record(self.indices[index])
    example = {"name": record["name"].decode(), "encoded": record["image"],
               "label": self.targets[index]}
    if "mask" in record:
      example["mask"] = _decode_mask(record["mask"])
    return example


def _decode_mask(data: bytes) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image, dtype=np.uint8)


def _prepared_source(argument: str) -> PreparedSource:
  out_dir, options = parse_argument(argument)
  return PreparedSource(out_dir, options["split"], options["views"], options["fraction"])


register_source("prepared", _prepared_source)

"""Readers of a prepared folder (`python -m spcl_jax.data.prepare ... --out OUT_DIR`).

Pre-training: `config.data.source = "prepared:OUT_DIR[,split=S][,views=V][,fraction=F]"`
  split     all (default) | train | val | test | official_train | official_val |
            official_test | official_train_val (NIH, CheXpert), i.e. any OUT_DIR/splits/<split>.txt
  views     frontal (default: PA/AP only) | all (laterals too, if prepared with --views all)
  fraction  100 (default) | 10 | 1: percent of the train split (split=train only), nested
  e.g. "prepared:/data/mimic", "prepared:/data/chexpert,split=train,fraction=10".
  Records are {"name", "encoded"} (JPEG/PNG bytes of the S x S image): the pipeline decodes.
Fine-tuning: `LabelledSource(OUT_DIR, split="train", fraction=10, policy="ones")` adds
  "label" (float32 targets of the dataset's TASK_LABELS; `policy` is CheXpert's uncertainty
  policy) and, for SIIM, "mask" (S x S uint8 of 0/1). `.shard(process_index, process_count)`
  gives one process its contiguous slice for multi-host evaluation.
  Which images: `scheme="paper"` (splits/train.txt, val.txt, test.txt: the 7:2:1 patient split)
  or `scheme="official"` (splits/official_*.txt: the download's own test list, validation
  carved by patient from its train list), or `split_files={"train": PATH, "val": PATH,
  "test": PATH}`: a user's own lists (see `read_split_lists`). `.split_info` names the file and
  its sha256 for results files.
Both are grain random-access sources: index -> record, the same order in every process (record
order, which is the manifest order), picklable for grain's worker processes. A source opens its
records (importing TFDS) when it is made, in the caller's thread, before any pipeline thread
reads: several data-loading threads importing tensorflow_datasets at once can deadlock. A worker
process that unpickles a source opens them again, one thread at a time (`_OPEN_LOCK`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import pathlib
import threading
from typing import Any

import numpy as np

from spcl_jax.data import splits as splits_lib
from spcl_jax.data.datasets import dataset_module
from spcl_jax.data.datasets import manifest as mf
from spcl_jax.data.datasets import records
from spcl_jax.downstream import FRACTION_SPLIT_FILES, PREPARED_SPLIT_SCHEMES
from spcl_jax.workdir_path import require_local

_OPTIONS = {"split": "all", "views": "frontal", "fraction": "100"}
_FRACTION_FILES = {str(percent): stem for percent, stem in FRACTION_SPLIT_FILES.items()}
USER_SPLITS = splits_lib.SPLIT_NAMES  # The keys config.split_files may have.
_OPEN_LOCK = threading.Lock()  # One thread at a time imports TFDS and opens a folder's records.


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


def scheme_file_stem(scheme: str, split: str, fraction: str) -> str:
  """('official', 'train', '10') -> 'official_train_10pct'; the paper scheme has no prefix."""
  if scheme not in PREPARED_SPLIT_SCHEMES:
    raise ValueError(f"split scheme {scheme!r} is not one of {', '.join(PREPARED_SPLIT_SCHEMES)}")
  stem = split_file_stem(split, fraction)
  return splits_lib.OFFICIAL_PREFIX + stem if scheme == "official" else stem


class PreparedFolder:
  """The parts of OUT_DIR that every reader needs: report, records index, TFDS data source."""

  def __init__(self, out_dir: str | pathlib.Path):
    require_local(out_dir, "prepared folder")
    self.out_dir = pathlib.Path(out_dir).expanduser()
    report_path = self.out_dir / "report.json"
    if not report_path.is_file():
      raise ValueError(f"{str(self.out_dir)!r} is not a prepared folder (no report.json): run "
                       "python -m spcl_jax.data.prepare DATASET --src RAW --out OUT first")
    self.report = json.loads(report_path.read_text())
    if not self.report.get("complete"):
      raise ValueError(f"{str(self.out_dir)!r}: preparation did not finish; run it again")
    self.dataset = self.report["settings"]["dataset"]
    dataset_module(self.dataset, self.report["settings"])  # Fails early on an unknown name.
    self.names, self.views, self.patients, self.codes = self._read_index()
    self._data_source = None  # Opened lazily: cheap to pickle into grain workers.

  def _read_index(self) -> tuple[list[str], list[str], list[str], np.ndarray]:
    names, views, patients, codes = [], [], [], []
    with open(self.out_dir / "records.csv", newline="", encoding="utf-8") as f:
      for row in csv.DictReader(f):
        names.append(row["name"])
        views.append(row["view"])
        patients.append(row["patient"])
        codes.append([int(code) for code in row["labels"].split()])
    return names, views, patients, np.asarray(codes, dtype=np.int8).reshape(len(names), -1)

  @property
  def module(self):
    # Not an attribute: modules do not pickle. A csv folder's classes come from its settings.
    return dataset_module(self.dataset, self.report["settings"])

  def tfds_dir(self) -> pathlib.Path:
    name = records.builder_name(self.dataset)
    versions = sorted((self.out_dir / "tfds" / name).glob("*/dataset_info.json"))
    if not versions:
      raise ValueError(f"{str(self.out_dir)!r}: no TFDS records under tfds/{name}/")
    return versions[-1].parent

  @property
  def data_source(self):
    return self._data_source if self._data_source is not None else self.open()

  def open(self):
    """The TFDS data source of the records, opened once (also when threads ask at once)."""
    with _OPEN_LOCK:
      if self._data_source is None:
        self._data_source = self._open_records()
    return self._data_source

  def _open_records(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = tfds.builder_from_directory(str(self.tfds_dir()))
    if len(self.names) != builder.info.splits[records.SPLIT].num_examples:
      raise ValueError(f"{str(self.out_dir)!r}: records.csv lists {len(self.names)} images but "
                       f"the records hold {builder.info.splits[records.SPLIT].num_examples}")
    # The pipeline's workers decode; here we only hand over the encoded bytes.
    skip = {"image": tfds.decode.SkipDecoding()}
    if "mask" in builder.info.features:
      skip["mask"] = tfds.decode.SkipDecoding()
    return builder.as_data_source(split=records.SPLIT, decoders=skip)

  def __getstate__(self):
    return {**self.__dict__, "_data_source": None}

  def split_file(self, stem: str) -> pathlib.Path:
    """splits/STEM.txt, checked against SHA256SUMS; a missing file is an error saying why."""
    split_dir = self.out_dir / "splits"
    splits_lib.verify_split_files(split_dir)
    path = split_dir / f"{stem}.txt"
    if not path.is_file():
      known = sorted(p.stem for p in split_dir.glob("*.txt"))
      hint = ""
      if stem.startswith(splits_lib.OFFICIAL_PREFIX):
        hint = (f" (official splits need the download's test list, e.g. NIH's test_list.txt "
                f"and train_val_list.txt; add them to the raw folder and run `python -m "
                f"spcl_jax.data.prepare {self.dataset} --out {self.out_dir} --splits-only`; "
                "RSNA has none)")
      raise ValueError(f"{str(self.out_dir)!r} has no split {stem!r}; it has "
                       f"{', '.join(known)}{hint}")
    return path

  def split_sha256(self, stem: str) -> str:
    return splits_lib.file_sha256(self.split_file(stem))

  def select(self, split: str, views: str, fraction: str = "100") -> np.ndarray:
    """Record indices of a split file's images with the asked views, in record order."""
    return self.select_stem(split_file_stem(split, fraction), views)

  def select_stem(self, stem: str, views: str) -> np.ndarray:
    path = self.split_file(stem)
    return self.select_names(splits_lib.read_split_file(path), views, f"splits/{path.name}")

  def select_names(self, names, views: str, where: str) -> np.ndarray:
    """Record indices of the named images with the asked views, in record order."""
    if views not in ("frontal", "all"):
      raise ValueError(f"views={views!r} is not 'frontal' or 'all'")
    wanted = set(names)
    indices = [i for i, name in enumerate(self.names)
               if name in wanted and (views == "all" or self.views[i] in mf.FRONTAL_VIEWS)]
    missing = len(wanted) - sum(name in wanted for name in self.names)
    if missing:
      logging.warning("%s: %d of the %d images in %s have no record (missing or undecodable, "
                      "see report.json)", self.out_dir, missing, len(wanted), where)
    if not indices:
      raise ValueError(f"{str(self.out_dir)!r}: {where} with views={views!r} selects no image")
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
    self.folder.open()  # here, in the caller's thread, before any pipeline thread reads

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


def _listed_names(path: pathlib.Path, canonical) -> list[tuple[int, str]]:
  """(line number, image name) per non-blank, non-# line: the first whitespace-separated field
  (Medical MAE's lists carry labels after the name; labels come from the metadata instead)."""
  if not path.is_file():
    raise FileNotFoundError(f"config.split_files: {str(path)!r} does not exist")
  listed = []
  for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
    fields = line.split()
    if fields and not fields[0].startswith("#"):
      listed.append((number, canonical(fields[0])))
  return listed


def read_split_lists(folder: PreparedFolder, split_files) -> dict[str, list[str]]:
  """{split: image names} from a user's lists, checked as a whole: every name must be one of
  the prepared folder's images (splits/all.txt), listed once, in one list, and no patient may
  have images in two lists. Any failure is a ValueError naming the file (and line)."""
  unknown_splits = sorted(set(split_files) - set(USER_SPLITS))
  if unknown_splits:
    raise ValueError(f"config.split_files: unknown split(s) {unknown_splits}; the keys are "
                     f"{', '.join(USER_SPLITS)}")
  known = set(splits_lib.read_split_file(folder.split_file("all")))
  canonical = getattr(folder.module, "canonical_name", str.strip)
  patient_of = dict(zip(folder.names, folder.patients))
  seen: dict[str, tuple[str, str, int]] = {}  # image -> (split, file, line)
  owner_of_patient: dict[str, tuple[str, str]] = {}  # patient -> (split, image)
  lists = {}
  for split, file_name in split_files.items():
    path = pathlib.Path(file_name).expanduser()
    listed = _listed_names(path, canonical)
    if not listed:
      raise ValueError(f"config.split_files[{split!r}]: {str(path)!r} lists no image")
    missing = [(line, name) for line, name in listed if name not in known]
    if missing:
      line, name = missing[0]
      raise ValueError(f"{str(path)!r} line {line}: image {name!r} is not in the prepared "
                       f"folder {str(folder.out_dir)!r} (not in its splits/all.txt, prepared "
                       f"with --views {folder.report['settings'].get('views')}; {len(missing)} "
                       f"of the file's {len(listed)} names are unknown)")
    for line, name in listed:
      if name in seen:
        other_split, other_file, other_line = seen[name]
        raise ValueError(f"{str(path)!r} line {line}: image {name!r} is already listed in "
                         f"{other_file!r} line {other_line} (split {other_split!r})")
      seen[name] = (split, str(path), line)
      patient = patient_of.get(name)
      owner = owner_of_patient.setdefault(patient, (split, name)) if patient else None
      if owner and owner[0] != split:
        raise ValueError(f"{str(path)!r} line {line}: patient {patient!r} of image {name!r} "
                         f"also has image {owner[1]!r} in the {owner[0]!r} list: splits must "
                         "not share patients")
    lists[split] = [name for _, name in listed]
  return lists


class LabelledSource(PreparedSource):
  """Images with fine-tuning targets (and SIIM masks) of one split and label fraction."""

  def __init__(self, out_dir: str | pathlib.Path, split: str = "train",
               fraction: str | int = "100", policy: str = "ones", views: str = "frontal",
               *, scheme: str = "paper", split_files=None):
    folder = PreparedFolder(out_dir)
    fraction = str(fraction)
    if split_files:
      if split not in split_files:
        raise ValueError(f"config.split_files has no {split!r} list (it has "
                         f"{', '.join(sorted(split_files))})")
      names = read_split_lists(folder, split_files)[split]
      stem = split_file_stem(split, fraction)
      if stem != split:  # A label fraction of the user's train list, nested like ours.
        names = splits_lib.label_fractions(names)[stem]
      path = pathlib.Path(split_files[split]).expanduser()
      indices = folder.select_names(names, views, str(path))
      self.split_info = {"scheme": "split_files", "split": split, "fraction": fraction,
                         "file": str(path.resolve()), "sha256": splits_lib.file_sha256(path)}
    else:
      stem = scheme_file_stem(scheme, split, fraction)
      indices = folder.select_stem(stem, views)
      self.split_info = {"scheme": scheme, "split": split, "fraction": fraction,
                         "file": f"splits/{stem}.txt", "sha256": folder.split_sha256(stem)}
    super().__init__(out_dir, split, views, fraction, folder=folder, indices=indices)
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


def open_prepared(argument: str) -> PreparedSource:
  """The source `config.data.source = "prepared:ARGUMENT"` names (see the module docstring)."""
  out_dir, options = parse_argument(argument)
  return PreparedSource(out_dir, options["split"], options["views"], options["fraction"])

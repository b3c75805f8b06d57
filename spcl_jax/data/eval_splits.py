"""Which images the evaluators read: held-out pre-training images, and labelled train/val splits.

Held-out images (pair retrieval): pre-training on `prepared:OUT,split=train` leaves the `val`
split unread, so the evaluator reads that; any other source has no split that training does not
read, and the evaluator falls back to the training images (and says so).

Labelled splits (linear probe, kNN), `open_labelled(data, split)`:
  "sample"                  the 16 bundled CXRs with the label in each file name: class
                            `pneumonia` (Kermany's `person<P>_bacteria_<N>`) against normal
                            (`NORMAL2-IM-<P>-<N>`). Split by patient (`person1946` has two
                            images), per class, ranked by sha256 of `0:probe:<patient>`: the first
                            half of each class's patients is `train`, the rest `val`, so both
                            classes are in both splits.
  "prepared:OUT[,views=V]"  `LabelledSource(OUT, split)`: the dataset's task labels on its
                            patient-level 7:2:1 split files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Sequence

import numpy as np

from spcl_jax.data.sources import FolderSource, ImageSource, SAMPLE_DIR, split_source_spec

SAMPLE_CLASSES = ("pneumonia",)
SAMPLE_SPLITS = ("train", "val")
_PNEUMONIA = re.compile(r"^(person\d+)_(bacteria|virus)_\d+$")
_NORMAL = re.compile(r"^((?:NORMAL\d*-)?IM-\d+)-\d+$")


def held_out_source_spec(train_spec: str) -> str | None:
  """The source of images that pre-training on `train_spec` never reads, or None."""
  kind, argument = split_source_spec(train_spec)
  if kind != "prepared":
    return None
  from spcl_jax.data import prepared_folder  # pylint: disable=g-import-not-at-top
  out_dir, options = prepared_folder.parse_argument(argument)
  if options["split"] != "train":
    return None  # 'all' contains val; the other splits have no disjoint partner we may use
  return f"prepared:{out_dir},split=val,views={options['views']}"


class Subset:
  """Some records of a source, in the given order (a grain random-access source)."""

  def __init__(self, source: ImageSource, indices: Sequence[int]):
    self.source, self.indices = source, list(indices)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int):
    return self.source[self.indices[index]]

  def name(self, index: int) -> str:
    inner = self.indices[index]
    return self.source.name(inner) if hasattr(self.source, "name") else self.source[inner]["name"]

  def __repr__(self) -> str:
    return f"Subset({self.source!r}, {len(self)} images)"


@dataclasses.dataclass(frozen=True)
class LabelledSplit:
  """Images of one split with their 0/1 labels: source[i] has labels[i] (M, K)."""

  source: ImageSource
  labels: np.ndarray
  class_names: tuple[str, ...]
  description: str


def sample_label(name: str) -> tuple[str, int]:
  """Bundled file name -> (patient, 1 for pneumonia / 0 for normal); other names are an error."""
  stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
  for pattern, label in ((_PNEUMONIA, 1), (_NORMAL, 0)):
    match = pattern.match(stem)
    if match:
      return match.group(1), label
  raise ValueError(f"{name!r}: the sample's label is read from the file name, which must be "
                   "person<P>_bacteria_<N> / person<P>_virus_<N> (pneumonia) or "
                   "NORMAL2-IM-<P>-<N> (normal)")


def _rank(patient: str) -> str:
  return hashlib.sha256(f"0:probe:{patient}".encode()).hexdigest()


def sample_split(folder: FolderSource, split: str) -> tuple[list[int], np.ndarray]:
  """(indices into the folder, (M, 1) labels) of one patient split, stratified by class."""
  if split not in SAMPLE_SPLITS:
    raise ValueError(f"split {split!r}: the sample has splits {SAMPLE_SPLITS}")
  labelled = [(i, *sample_label(folder.name(i))) for i in range(len(folder))]
  chosen = set()
  for label in (0, 1):
    patients = sorted({p for _, p, y in labelled if y == label}, key=_rank)
    half = -(-len(patients) // 2)
    chosen |= set(patients[:half] if split == "train" else patients[half:])
  indices = [i for i, patient, _ in labelled if patient in chosen]
  labels = np.asarray([[y] for _, patient, y in labelled if patient in chosen], np.int32)
  return indices, labels


def open_labelled(data: str, split: str, classes: Sequence[str] = ()) -> LabelledSplit:
  """The images and labels of `split` of a labelled data spec (see the module docstring).

  `classes` keeps only these classes, in this order (default: all of the dataset's task labels).
  """
  kind, argument = split_source_spec(data)
  if kind == "sample" and not argument:
    folder = FolderSource(SAMPLE_DIR)
    indices, labels = sample_split(folder, split)
    source, names, where = Subset(folder, indices), SAMPLE_CLASSES, f"sample, {split} patients"
  elif kind == "prepared":
    from spcl_jax.data import prepared_folder  # pylint: disable=g-import-not-at-top
    out_dir, options = prepared_folder.parse_argument(argument)
    source = prepared_folder.LabelledSource(out_dir, split=split, views=options["views"])
    labels, names = np.asarray(source.targets), tuple(source.label_names)
    where = f"{out_dir}, split {split}"
  else:
    raise ValueError(f"data={data!r}: labelled evaluation reads 'sample' or "
                     "'prepared:OUT_DIR[,views=...]'")
  labels, names = _select_classes(labels, names, classes, data)
  if not np.isin(labels, (0, 1)).all():
    raise ValueError(f"{data!r} split {split}: labels must be 0 or 1 for AUC, got values "
                     f"{sorted(set(np.unique(labels).tolist()))}")
  return LabelledSplit(source, labels.astype(np.int32), names,
                       f"{where} ({len(source)} images)")


def _select_classes(labels: np.ndarray, names: tuple[str, ...], classes: Sequence[str],
                    data: str) -> tuple[np.ndarray, tuple[str, ...]]:
  if not classes:
    return labels, names
  unknown = [c for c in classes if c not in names]
  if unknown:
    raise ValueError(f"classes {unknown} are not labels of {data!r}: it has {list(names)}")
  columns = [names.index(c) for c in classes]
  return labels[:, columns], tuple(classes)

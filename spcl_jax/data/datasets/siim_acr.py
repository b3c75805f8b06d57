"""SIIM-ACR Pneumothorax Segmentation (Kaggle, stage 1 release): DICOM images and RLE masks.

Download: https://www.kaggle.com/c/siim-acr-pneumothorax-segmentation (the stage 1 files:
train-rle.csv and dicom-images-train/, as mirrored by the "siim-train-test" Kaggle dataset).
Layout under --src: train-rle.csv and dicom-images-train/<study>/<series>/<ImageId>.dcm
(files are found by name at any depth under dicom-images-train/).
Quirks (METHOD §7): the header is "ImageId, EncodedPixels" (leading space); "-1" = no
pneumothorax; several rows of one image are several regions (united). The RLE is Kaggle's
relative, column-major variant (`spcl_jax.data.rle`). The stage 2 `stage_2_train.csv` uses
absolute run starts instead, so it is deliberately not read. There is no patient id in the
metadata: each ImageId is taken as its own patient (image-level split). All images are frontal.
"""

from __future__ import annotations

import pathlib

import numpy as np

from spcl_jax.data import rle
from spcl_jax.data.datasets import manifest as mf

NAME = "siim_acr"
LABELS = ("Pneumothorax",)
TASK_LABELS = LABELS
IMAGE_FORMAT = "dicom"
DOWNSTREAM = True
HAS_MASKS = True
RLE_CSV = "train-rle.csv"
IMAGE_DIR = "dicom-images-train"
_COLUMNS = ("ImageId", "EncodedPixels")


def _merge_rows(name: str, texts: list[str], problems: mf.Problems) -> tuple[str, ...]:
  """All RLE rows of one image -> the rows to unite ("-1" alone for an empty mask)."""
  runs = [t for t in texts if t != rle.EMPTY_MASK]
  unique_runs = list(dict.fromkeys(runs))
  if len(unique_runs) < len(runs) or (not runs and len(texts) > 1):
    problems.add("duplicate_row", name, f"{len(texts)} rows, some identical")
  if runs and len(runs) < len(texts):
    problems.add("conflicting_rows", name, f"{len(texts) - len(runs)} '-1' row(s) beside "
                 f"{len(runs)} region(s): regions kept, label 1")
  return tuple(unique_runs) or (rle.EMPTY_MASK,)


def read_manifest(src, *, check_files: bool = True) -> mf.Manifest:
  src = pathlib.Path(src)
  rle_csv = mf.find_first(src, (RLE_CSV, f"*/{RLE_CSV}"), "SIIM train-rle.csv")
  problems = mf.Problems()
  rows_of: dict[str, list[str]] = {}
  excluded: set[str] = set()  # A bad row may have been a region: the mask is unknowable.
  for line, row in mf.read_csv_rows(rle_csv, _COLUMNS):
    name, where = row["ImageId"], f"{rle_csv.name} line {line}"
    if not name:
      problems.add("bad_row", where, f"{where}: empty ImageId")
      continue
    try:
      rle.parse_runs(row["EncodedPixels"])
    except ValueError as e:
      problems.add("bad_mask", name, f"{where}: {e}; image excluded")
      excluded.add(name)
      continue
    rows_of.setdefault(name, []).append(row["EncodedPixels"].strip() or rle.EMPTY_MASK)
  on_disk = mf.files_on_disk(src / IMAGE_DIR, (".dcm",)) if check_files else {}
  path_of_name = {pathlib.PurePosixPath(rel).stem: f"{IMAGE_DIR}/{rel}" for rel in on_disk}
  entries = []
  for name, texts in rows_of.items():
    if name in excluded:
      continue
    mask_rles = _merge_rows(name, texts, problems)
    label = mf.POSITIVE if mask_rles != (rle.EMPTY_MASK,) else mf.NEGATIVE
    entries.append(mf.Entry(name=name, path=path_of_name.get(name, f"{IMAGE_DIR}/{name}.dcm"),
                            patient=name, view="FRONTAL", labels=(label,), mask_rles=mask_rles))
  if check_files:
    entries = mf.check_listed_files(src, entries, problems, set(path_of_name.values()),
                                    [IMAGE_DIR])
  return mf.Manifest(NAME, entries, problems, LABELS)


def targets(codes, policy: str = "ones") -> np.ndarray:
  del policy  # No uncertain labels here.
  return (np.asarray(codes) == mf.POSITIVE).astype(np.float32)
